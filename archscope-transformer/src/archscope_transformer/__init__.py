"""archscope backend package: Hugging Face decoder-only language models (GPT-2, Llama, Qwen, ...)."""

__version__ = "0.3.0"
