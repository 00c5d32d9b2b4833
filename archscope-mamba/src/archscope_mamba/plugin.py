"""Entry point of archscope-mamba: registers its backends with archscope (imports nothing heavy)."""
