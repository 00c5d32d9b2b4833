"""Entry point of archscope-transformer: registers its backends with archscope (imports nothing heavy)."""
