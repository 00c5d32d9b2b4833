"""The ``zoo:`` model source: ``archscope.load_model("zoo:transformer")`` loads a shipped zoo
model and the shared zoo tokenizer from the package's own files (no network)."""

from __future__ import annotations

from typing import Any

from .store import ALL_MODEL_NAMES, TOKENIZER_DIR, manifest, models_dir


def load_tokenizer() -> Any:
    """The shared zoo tokenizer (a `PreTrainedTokenizerFast`, pad id 0)."""
    from transformers import PreTrainedTokenizerFast

    folder = models_dir() / TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file():
        from archscope.errors import ModelSourceError

        raise ModelSourceError(
            f"the zoo tokenizer is missing from {folder}; reinstall "
            "archscope-zoo or run `python -m archscope_zoo.train`"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def load(name: str, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``zoo:<name>``, ``name`` one of `ALL_MODEL_NAMES`; the model is
    in eval mode on ``device`` (in ``dtype`` when given)."""
    from archscope.errors import ModelSourceError

    shipped = manifest()["models"]
    if name not in ALL_MODEL_NAMES or name not in shipped:
        raise ModelSourceError(
            f"zoo:{name!r} is not a zoo model; the zoo ships "
            f"{', '.join('zoo:' + n for n in ALL_MODEL_NAMES if n in shipped)} "
            "(`archscope zoo list` shows them with sizes and losses)"
        )
    folder = models_dir() / name
    if shipped[name]["class"] == "RecurrentLM":
        from archscope_recurrent.models import RecurrentLM

        model: Any = RecurrentLM.from_pretrained(folder, dtype=dtype, device=device)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        model.to(device)
    model.eval()
    return model, load_tokenizer()
