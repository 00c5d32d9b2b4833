"""The release of the archscope core, in a module of its own so that any module can read it
without importing the package's ``__init__``."""

__version__ = "0.3.0"
