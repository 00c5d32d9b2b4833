"""Template archscope backend plugin for minGRU language models."""

__version__ = "0.1.0"
