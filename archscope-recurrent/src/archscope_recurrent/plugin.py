"""Entry point of archscope-recurrent: registers its backends with archscope (imports nothing heavy)."""
