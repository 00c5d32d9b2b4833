"""What the store extracts from: DATA of ``archscope extract`` (and of Ray extraction) read as an
`archscope.data.Dataset`. Kept apart from the commands so that the extraction engines do not
depend on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_data(
    path: str | Path,
    tokenizer: Any,
    *,
    text_column: str = "text",
    split: str | None = None,
    max_length: int | None = None,
) -> Any:
    """DATA of ``archscope extract`` as an `archscope.data.Dataset`: a text file (one text per
    line), a JSONL file of ``{"text": ...}`` objects, a CSV file with a ``text`` column, or a
    folder written by Hugging Face ``datasets``' ``save_to_disk`` (needs ``archscope[datasets]``;
    ``split`` picks one split of a DatasetDict, ``text_column`` the column)."""
    from ...data import Dataset
    from ...errors import InputError

    path = Path(path)
    if path.is_file():
        return Dataset.from_file(path, tokenizer=tokenizer, max_length=max_length)
    if not path.is_dir():
        raise InputError(f"no such data file or folder: {path}")
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"{path} is a folder, read as a Hugging Face dataset saved with "
            "save_to_disk; that needs the datasets package: pip install "
            "'archscope[datasets]'"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise InputError(
            f"{path} is not a dataset saved with save_to_disk ({exc}); give a "
            "text file, a JSONL file or such a folder"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            if len(names) != 1:
                raise InputError(f"{path} holds splits {names}: choose one with --split")
            split = names[0]
        if split not in loaded:
            raise InputError(f"{path} has no split {split!r}; it has {names}")
        loaded = loaded[split]
    if text_column not in loaded.column_names:
        raise InputError(
            f"{path} has no column {text_column!r}; its columns are "
            f"{loaded.column_names} (choose one with --text-column)"
        )
    texts = [str(t) for t in loaded[text_column] if str(t).strip()]
    return Dataset.from_texts(texts, tokenizer=tokenizer, max_length=max_length)
