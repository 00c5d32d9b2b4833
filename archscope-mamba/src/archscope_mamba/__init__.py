"""archscope backend package: state-space and hybrid models (Mamba, Mamba-2, Jamba, ...)."""

__version__ = "0.3.0"
