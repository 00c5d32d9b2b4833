"""What methods run on: a `Dataset` of texts or token ids (optionally labelled) and a `Contrast`
of clean/corrupted pairs. Both turn into padded token batches here, and only here."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import InputError

if TYPE_CHECKING:
    import torch

PaddingSide = Literal["right", "left"]


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
    """Token ids of each text, never cut silently: truncation only with ``max_length``, and
    then with a warning naming how many texts were cut."""
    from .tokens import encode

    ids = encode(tokenizer, texts)
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise InputError(f"texts {empty[:5]} tokenize to no tokens; give non-empty texts")
    if max_length is not None:
        cut = sum(len(row) > max_length for row in ids)
        if cut:
            warnings.warn(
                f"archscope: {cut} of {len(ids)} texts are longer than max_length="
                f"{max_length} tokens and were truncated",
                stacklevel=3,
            )
            ids = [row[:max_length] for row in ids]
    return ids


def _read_text(path: Path) -> str:
    """A data file's text, or an `InputError` when it is binary or not UTF-8."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise InputError(
            f"{path} looks like a binary file (it holds NUL bytes); a data file is text: "
            'JSONL of {"text", "label"} objects, CSV with a text column, or one text per line'
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); save it "
            "as UTF-8 (JSONL, CSV, or one text per line)"
        ) from None


def _where(items: list[int], where: list[str] | None) -> str:
    if where is None:
        return f"items {items[:5]}"
    return ", ".join(where[i] for i in items[:3])


def check_labels(values: Any, where: list[str] | None = None) -> list[int]:
    """Labels as a list of integer class indices, or an `InputError` naming the first bad
    ones: labels are ints (or whole floats / bools), never NaN, fractional, text or negative.
    ``where`` names each item for messages (e.g. ``file:line``)."""
    if isinstance(values, (str, bytes)):
        raise InputError(
            f"labels must be a list of integers, one per item; got one {type(values).__name__}"
        )
    raw = values.tolist() if hasattr(values, "tolist") else values
    try:
        raw = list(raw)
    except TypeError:
        raise InputError(
            f"labels must be a list of integers, one per item; got {type(values).__name__}"
        ) from None
    raw = [v.item() if getattr(v, "ndim", None) == 0 and hasattr(v, "item") else v for v in raw]
    text = [i for i, v in enumerate(raw) if isinstance(v, (str, bytes))]
    if text:
        shown = sorted({str(raw[i]) for i in text})[:4]
        mapping = ", ".join(f"{name!r}: {n}" for n, name in enumerate(shown))
        raise InputError(
            f"labels must be integer class indices; {len(text)} are text ({shown}, at "
            f"{_where(text, where)}): map them to integers first, e.g. {{{mapping}}}"
        )
    other = [i for i, v in enumerate(raw) if not isinstance(v, (int, float))]
    if other:
        kinds = sorted({type(raw[i]).__name__ for i in other})
        raise InputError(
            f"labels must be integer class indices; {len(other)} are {', '.join(kinds)} "
            f"(at {_where(other, where)})"
        )
    nan = [i for i, v in enumerate(raw) if isinstance(v, float) and v != v]
    if nan:
        raise InputError(
            f"{len(nan)} labels are NaN (at {_where(nan, where)}): give every item a class "
            "index, or leave the unlabelled items out"
        )
    inf = [
        i for i, v in enumerate(raw) if isinstance(v, float) and v in (float("inf"), -float("inf"))
    ]
    frac = [i for i, v in enumerate(raw) if isinstance(v, float) and i not in inf and v != int(v)]
    if inf or frac:
        bad = (inf + frac)[:5]
        raise InputError(
            f"labels must be integer class indices (0, 1, ...); {len(inf) + len(frac)} are "
            f"not ({[raw[i] for i in bad]} at {_where(bad, where)}). Fractional labels are not "
            "rounded: threshold them yourself (e.g. 1 if p >= 0.5 else 0)"
        )
    labels = [int(v) for v in raw]
    negative = [i for i, v in enumerate(labels) if v < 0]
    if negative:
        raise InputError(
            f"labels are class indices 0, 1, ...; {len(negative)} are negative "
            f"({[labels[i] for i in negative[:5]]} at {_where(negative, where)})"
        )
    return labels


def _label_of(text: str) -> Any:
    """A label cell of a CSV file as a number when it is one (else the text, refused later)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _read_jsonl(path: Path) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[Any] = []
    where: list[str] = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise InputError(f"{path}:{n}: each line needs an object with a 'text' key")
        if not isinstance(obj["text"], str):
            raise InputError(
                f"{path}:{n}: 'text' must be a string, got {type(obj['text']).__name__}"
            )
        texts.append(obj["text"])
        if "label" in obj:
            labels.append(float("nan") if obj["label"] is None else obj["label"])
            where.append(f"{path}:{n}")
    return texts, check_labels(labels, where)


def _read_csv(path: Path) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[Any] = []
    where: list[str] = []
    with io.StringIO(_read_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise InputError(
                f"{path}: a CSV data file needs a 'text' column (found {reader.fieldnames})"
            )
        for n, row in enumerate(reader, 2):
            texts.append(row["text"])
            if row.get("label") not in (None, ""):
                labels.append(_label_of(row["label"].strip()))
                where.append(f"{path}:{n}")
    return texts, check_labels(labels, where)


def pad_batch(
    rows: Sequence[Sequence[int]], side: PaddingSide = "right", pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Token-id rows of any lengths → ``{"input_ids", "attention_mask"}`` padded on ``side``."""
    import torch

    if not rows:
        raise InputError("no rows to batch: give at least one text or token sequence")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not len(row):
            raise InputError(f"row {i} has no tokens")
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def padding_for(backend: Any) -> PaddingSide:
    """The side to pad on for ``backend``: right unless it handles left padding only."""
    return "left" if getattr(backend, "padding", "both") == "left" else "right"


@dataclass
class Dataset:
    """Texts or token-id sequences, optionally with integer labels (one per item).

    Texts are tokenized with ``tokenizer`` when first needed, without truncation unless
    ``max_length`` is set (then with a warning). Labels stay aligned through every operation.
    """

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    labels: list[int] | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    max_length: int | None = None
    #: Token ids of ``texts``, filled by `ids` on first use.
    _tokenized: list[list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.texts is None) == (self.token_ids is None):
            raise InputError("a Dataset holds either texts or token_ids (exactly one of them)")
        if self.texts is not None:
            if isinstance(self.texts, str) or not all(isinstance(t, str) for t in self.texts):
                raise InputError("Dataset texts must be a list of strings")
            self.texts = list(self.texts)
        if self.token_ids is not None:
            self.token_ids = [[int(t) for t in row] for row in self.token_ids]
            empty = [i for i, row in enumerate(self.token_ids) if not row]
            if empty:
                raise InputError(f"token sequences {empty[:5]} are empty")
        if len(self) == 0:
            raise InputError("the dataset is empty: give at least one text or token sequence")
        if self.labels is not None:
            self.labels = check_labels(self.labels)
            if len(self.labels) != len(self):
                raise InputError(
                    f"{len(self.labels)} labels for {len(self)} items; give one label per text"
                )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        labels: Sequence[int] | None = None,
        tokenizer: Any = None,
        max_length: int | None = None,
    ) -> Dataset:
        return cls(
            texts=list(texts),
            labels=None if labels is None else list(labels),
            tokenizer=tokenizer,
            max_length=max_length,
        )

    @classmethod
    def from_ids(
        cls, token_ids: Sequence[Sequence[int]], labels: Sequence[int] | None = None
    ) -> Dataset:
        return cls(
            token_ids=[list(r) for r in token_ids], labels=None if labels is None else list(labels)
        )

    @classmethod
    def from_file(
        cls, path: str | Path, tokenizer: Any = None, max_length: int | None = None
    ) -> Dataset:
        """A JSONL file of ``{"text": ..., "label": ...}`` objects, a CSV file with a ``text``
        column (and optionally ``label``), or a plain text file with one text per line."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no such data file: {path}")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            texts, labels = _read_jsonl(path)
        elif suffix == ".csv":
            texts, labels = _read_csv(path)
        else:
            lines = _read_text(path).splitlines()
            texts, labels = [line for line in lines if line.strip()], []
        if labels and len(labels) != len(texts):
            raise InputError(
                f"{path}: {len(labels)} of {len(texts)} rows have a label; label every row or none"
            )
        return cls(texts=texts, labels=labels or None, tokenizer=tokenizer, max_length=max_length)

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])

    @property
    def label_tensor(self) -> torch.Tensor | None:
        import torch

        return None if self.labels is None else torch.tensor(self.labels, dtype=torch.long)

    def ids(self) -> list[list[int]]:
        """Every item as token ids (texts are tokenized once and cached)."""
        if self.token_ids is not None:
            return self.token_ids
        if self._tokenized is None:
            assert self.texts is not None
            self._tokenized = _tokenize(self.tokenizer, self.texts, self.max_length)
        return self._tokenized

    def subset(self, indices: Sequence[int]) -> Dataset:
        """The items at ``indices`` (labels kept aligned)."""
        idx = [int(i) for i in indices]
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        out = replace(
            self, texts=pick(self.texts), token_ids=pick(self.token_ids), labels=pick(self.labels)
        )
        out._tokenized = pick(self._tokenized)
        return out

    def with_labels(self, labels: Sequence[int]) -> Dataset:
        out = replace(self, labels=list(labels))
        out._tokenized = self._tokenized
        return out

    def batches(
        self, batch_size: int = 32, side: PaddingSide = "right", pad_id: int | None = None
    ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """``(indices, batch)`` pairs: consecutive items, padded on ``side``."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        rows = self.ids()
        if pad_id is None:
            pad_id = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        for start in range(0, len(rows), batch_size):
            idx = list(range(start, min(start + batch_size, len(rows))))
            yield idx, pad_batch([rows[i] for i in idx], side, pad_id)


@dataclass
class Contrast:
    """Clean / corrupted input pairs (texts or token ids), for patching and contrastive search."""

    clean: list[Any]
    corrupted: list[Any]
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.clean = [self.clean] if isinstance(self.clean, str) else list(self.clean)
        self.corrupted = (
            [self.corrupted] if isinstance(self.corrupted, str) else list(self.corrupted)
        )
        if len(self.clean) != len(self.corrupted) or not self.clean:
            raise InputError(
                f"a Contrast needs as many corrupted inputs as clean ones (at least "
                f"one); got {len(self.clean)} clean and {len(self.corrupted)} "
                "corrupted"
            )

    def datasets(self) -> tuple[Dataset, Dataset]:
        """The clean and the corrupted side, each as a `Dataset`."""
        return (as_dataset(self.clean, self.tokenizer), as_dataset(self.corrupted, self.tokenizer))

    def pairs(self) -> list[tuple[list[int], list[int]]]:
        clean, corrupted = self.datasets()
        return list(zip(clean.ids(), corrupted.ids(), strict=True))


def _rows_of_batch(batch: Mapping[str, Any]) -> list[list[int]]:
    import torch

    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    if mask is None:
        return ids.tolist()
    mask = torch.as_tensor(mask).reshape(ids.shape).bool()
    return [row[m].tolist() for row, m in zip(ids, mask, strict=True)]


def as_dataset(data: Any, tokenizer: Any = None) -> Dataset:
    """Normalise what a method accepts as data into a `Dataset`: a Dataset, texts (with a
    tokenizer), token-id lists, a token batch mapping (padding removed by its attention mask)
    or a (batch, seq) tensor of ids."""
    if isinstance(data, Dataset):
        if data.tokenizer is None and tokenizer is not None:
            return replace(data, tokenizer=tokenizer)
        return data
    if isinstance(data, str):
        return Dataset.from_texts([data], tokenizer=tokenizer)
    if isinstance(data, Mapping):
        if "input_ids" not in data:
            raise InputError(f"a token batch needs 'input_ids'; got keys {sorted(data)}")
        return Dataset.from_ids(_rows_of_batch(data), labels=data.get("labels"))
    if hasattr(data, "dim") and hasattr(data, "tolist"):
        return Dataset.from_ids(data.reshape(-1, data.shape[-1]).tolist())
    if isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)) and not data:
        raise InputError(
            f"the data is an empty {type(data).__name__}: give at least one text or token sequence"
        )
    if isinstance(data, Sequence) and data:
        if all(isinstance(t, str) for t in data):
            return Dataset.from_texts(list(data), tokenizer=tokenizer)
        if all(isinstance(r, Sequence) or hasattr(r, "tolist") for r in data):
            return Dataset.from_ids([r.tolist() if hasattr(r, "tolist") else list(r) for r in data])
    raise InputError(
        f"cannot use {type(data).__name__} as data: give an archscope.data.Dataset, a list of "
        "texts (with tokenizer=), a list of token-id lists, a token batch "
        "{'input_ids', 'attention_mask'} or a (batch, seq) tensor of ids"
    )


def as_contrast(data: Any, tokenizer: Any = None) -> Contrast:
    """A `Contrast`, or a ``(clean, corrupted)`` pair of input lists, as a `Contrast`."""
    if isinstance(data, Contrast):
        return (
            data
            if data.tokenizer is not None or tokenizer is None
            else replace(data, tokenizer=tokenizer)
        )
    if isinstance(data, tuple) and len(data) == 2:
        clean, corrupted = ([d] if isinstance(d, str) else list(d) for d in data)
        return Contrast(clean, corrupted, tokenizer=tokenizer)
    raise InputError(
        f"a contrast is an archscope.data.Contrast or a (clean, corrupted) pair of "
        f"input lists; got {type(data).__name__}"
    )
