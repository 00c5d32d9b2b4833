"""The one way archscope calls a tokenizer. Every method and command turns text into token ids
here, through the single call docs/plugin-authors.md promises a tokenizer supports::

    tok(texts, return_tensors="pt", padding=True)  ->  {"input_ids", "attention_mask"}

``texts`` is always a list of strings (never one bare string), padding is removed with the
attention mask, and nothing else is assumed: ``add_special_tokens=False`` is passed only when
the tokenizer's call accepts it, ``decode``, ``unk_token_id``, ``pad_token_id`` and ``len()``
are used when present. The checks that catch a tokenizer which is not the model's (most tokens
unknown, a vocabulary much smaller than the model's) live here too.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

from .errors import InputError

__all__ = [
    "check_fits",
    "decode",
    "encode",
    "encode_one",
    "pad_id",
    "single_token_id",
    "unknown_id",
]

#: Texts per tokenizer call (padding is to the longest text of one call, so memory stays bounded).
CHUNK = 1024
#: Share of unknown tokens above which a call warns that the tokenizer may not fit the texts.
UNKNOWN_SHARE = 0.5


def _accepts(tokenizer: Any, name: str) -> bool:
    """Whether ``tokenizer(...)`` takes the keyword ``name`` (or any keyword)."""
    try:
        params = inspect.signature(tokenizer).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _rows(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if getattr(tokenizer, "pad_token", "") is None:
        # a Hugging Face tokenizer without a pad token refuses padding=True: one text per
        # call needs no padding
        return [r for t in texts for r in _call(tokenizer, [t], special, padding=False)]
    return _call(tokenizer, texts, special, padding=True)


def _call(tokenizer: Any, texts: list[str], special: bool, padding: bool) -> list[list[int]]:
    import torch

    kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": padding}
    if not special and _accepts(tokenizer, "add_special_tokens"):
        kwargs["add_special_tokens"] = False
    try:
        enc = tokenizer(texts, **kwargs)
    except Exception as exc:
        raise InputError(
            f"the tokenizer ({type(tokenizer).__name__}) failed on {len(texts)} texts: "
            f"{type(exc).__name__}: {exc}. archscope calls a tokenizer as tok(texts, "
            'return_tensors="pt", padding=True) with a list of strings and reads input_ids and '
            "attention_mask (docs/plugin-authors.md)"
        ) from exc
    try:
        ids = torch.as_tensor(enc["input_ids"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"the tokenizer ({type(tokenizer).__name__}) returned no usable 'input_ids' "
            f"({type(exc).__name__}: {exc}); it must return a mapping with an (n_texts, seq) "
            "'input_ids' tensor and an 'attention_mask' of the same shape"
        ) from None
    if ids.dim() == 1 and len(texts) == 1:
        ids = ids.unsqueeze(0)
    mask_value = enc.get("attention_mask") if hasattr(enc, "get") else None
    mask = torch.ones_like(ids) if mask_value is None else torch.as_tensor(mask_value)
    if ids.dim() != 2 or ids.shape[0] != len(texts) or mask.shape != ids.shape:
        raise InputError(
            f"the tokenizer ({type(tokenizer).__name__}) returned input_ids of shape "
            f"{tuple(ids.shape)} and attention_mask of shape {tuple(mask.shape)} for "
            f"{len(texts)} texts; both must be (n_texts, seq)"
        )
    keep = mask.bool()
    return [row[m].tolist() for row, m in zip(ids, keep, strict=True)]


def _strip_special(tokenizer: Any, row: list[int]) -> list[int]:
    """A row without the BOS/EOS a tokenizer adds around a text (for tokenizers that cannot be
    told not to add them)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if row and bos is not None and row[0] == bos:
        row = row[1:]
    if row and eos is not None and row[-1] == eos:
        row = row[:-1]
    return row


def unknown_id(tokenizer: Any) -> int | None:
    """The id the tokenizer gives words it does not know, when it has one distinct from its
    padding and end-of-text ids (byte-level tokenizers such as GPT-2's know every text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if not isinstance(unk, int):
        return None
    others = {getattr(tokenizer, a, None) for a in ("eos_token_id", "bos_token_id")}
    return None if unk in others else unk


def _warn_unknown(tokenizer: Any, texts: Sequence[str], rows: list[list[int]]) -> None:
    unk = unknown_id(tokenizer)
    if unk is None:
        return
    total = sum(len(r) for r in rows)
    n_unk = sum(t == unk for r in rows for t in r)
    if total and n_unk / total > UNKNOWN_SHARE:
        bad = [repr(t) for t, r in zip(texts, rows, strict=True) if unk in r][:3]
        warnings.warn(
            f"{n_unk} of {total} tokens are unknown to the tokenizer (id {unk}, "
            f"{decode(tokenizer, unk)!r}), e.g. in {', '.join(bad)}: the model sees the same "
            "unknown token for all those words. Use words from the model's vocabulary, or "
            "check that this is the model's tokenizer",
            stacklevel=3,
        )


def encode(
    tokenizer: Any, texts: Sequence[str], *, special: bool = True, warn_unknown: bool = True
) -> list[list[int]]:
    """The token ids of each text (padding removed), from batched calls of the one contract.

    ``special=False`` asks for no BOS/EOS (passed as ``add_special_tokens=False`` when the
    tokenizer takes it, else stripped from the ends). Warns when most tokens are unknown."""
    if tokenizer is None:
        raise InputError(
            "these inputs are texts, but no tokenizer was given: pass tokenizer=... "
            "(load_model returns one) or give token ids"
        )
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(
            f"texts must be strings; items {bad[:5]} are "
            f"{', '.join(sorted({type(texts[i]).__name__ for i in bad}))}"
        )
    rows: list[list[int]] = []
    for start in range(0, len(texts), CHUNK):
        rows += _rows(tokenizer, texts[start : start + CHUNK], special)
    if not special:  # also when asked not to add them: a tokenizer may not listen
        rows = [_strip_special(tokenizer, r) for r in rows]
    if warn_unknown:
        _warn_unknown(tokenizer, texts, rows)
    return rows


def encode_one(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    """The token ids of one text (`encode` of a one-item list)."""
    return encode(tokenizer, [text], special=special)[0]


def decode(tokenizer: Any, token_id: int) -> str:
    """The text of one token id (the id itself when the tokenizer cannot decode)."""
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        try:
            return str(tokenizer.decode([int(token_id)]))
        except Exception:  # a tokenizer that cannot decode this id: show the id
            return str(int(token_id))
    return str(int(token_id))


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad id, else 0 (padding is masked out anyway)."""
    value = getattr(tokenizer, "pad_token_id", None)
    return int(value) if isinstance(value, int) else 0


def single_token_id(tokenizer: Any, target: str, what: str = "target_token") -> int:
    """The id of ``target`` when it is exactly one known token of the tokenizer; otherwise an
    `InputError` that says how it tokenizes and what to give instead."""
    if tokenizer is None:
        raise InputError(f"{what} as text needs a tokenizer (or give its id)")
    ids = encode(tokenizer, [target], special=False, warn_unknown=False)[0]
    if not ids:
        raise InputError(
            f"{what} {target!r} tokenizes to nothing; give a token the vocabulary has "
            "(e.g. ' Paris' with its leading space for GPT-2-style tokenizers)"
        )
    pieces = [decode(tokenizer, i) for i in ids]
    unk = unknown_id(tokenizer)
    if unk is not None and unk in ids:
        raise InputError(
            f"{what} {target!r} is not in the tokenizer's vocabulary (it tokenizes to "
            f"{pieces}, the unknown token {decode(tokenizer, unk)!r}); give a word the "
            "vocabulary has, or a token id"
        )
    if len(ids) > 1:
        raise InputError(
            f"{what} {target!r} is {len(ids)} tokens ({pieces}, ids {ids}); a lens tracks one "
            f"token: give one of them (e.g. {pieces[0]!r}) or its id ({ids[0]})"
        )
    return int(ids[0])


def _model_vocab(backend: Any) -> int | None:
    try:
        limits = backend.input_limits()
    except Exception:  # a backend without limits: nothing to compare with
        return None
    vocab = getattr(limits, "vocab_size", None)
    return vocab if isinstance(vocab, int) and vocab > 0 else None


#: tokenizer -> ids of the backends it was already checked against (one warning per pair)
_CHECKED: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()


def check_fits(tokenizer: Any, backend: Any) -> None:
    """Warn (once per tokenizer and backend) when ``tokenizer`` cannot be the model's: its
    vocabulary is less than half the model's (models pad their embedding tables a little,
    never to twice the tokenizer)."""
    if tokenizer is None or backend is None:
        return
    try:
        seen = _CHECKED.setdefault(tokenizer, set())
    except TypeError:  # a tokenizer that cannot be weakly referenced: check every time
        seen = set()
    if id(backend) in seen:
        return
    seen.add(id(backend))
    try:
        n_tok = len(tokenizer)
    except TypeError:
        return
    vocab = _model_vocab(backend)
    if vocab is None or not n_tok or n_tok * 2 > vocab:
        return
    warnings.warn(
        f"the tokenizer has {n_tok} tokens but the model's vocabulary has {vocab}: it is "
        "probably not the model's tokenizer, so the ids it gives mean other words to the "
        "model. Use the tokenizer the model was trained with (load_model returns it)",
        stacklevel=3,
    )


def contract_problems(tokenizer: Any) -> list[str]:
    """What keeps ``tokenizer`` from the one contract of docs/plugin-authors.md (empty when it
    follows it): ``tok(texts, return_tensors="pt", padding=True)`` on a list of texts of
    different lengths returns ``input_ids`` and an ``attention_mask`` of 0/1, both
    ``(n_texts, seq)``, and one text alone gives the same ids as in the batch."""
    import torch

    texts = ["a b c d", "a"]
    if getattr(tokenizer, "pad_token", "") is None:  # Hugging Face style: padding needs one
        if not any(getattr(tokenizer, t, None) for t in ("eos_token", "unk_token")):
            return ["it has no pad_token, and no eos_token or unk_token to pad with"]
        try:
            encode(tokenizer, texts, warn_unknown=False)
        except InputError as exc:
            return [str(exc)]
        return []
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
    except Exception as exc:
        return [
            f'tok({texts!r}, return_tensors="pt", padding=True) raised {type(exc).__name__}: {exc}'
        ]
    problems = []
    keys = set(enc.keys()) if hasattr(enc, "keys") else set()
    for key in ("input_ids", "attention_mask"):
        if key not in keys:
            problems.append(f"the result has no {key!r} (keys: {sorted(keys)})")
    if problems:
        return problems
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for key, value in (("input_ids", ids), ("attention_mask", mask)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != 2:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"{key} must be a (2, seq) tensor for 2 texts, got {shape}")
    if problems:
        return problems
    return problems + _mask_problems(tokenizer, texts, ids, mask)


def _mask_problems(tokenizer: Any, texts: list[str], ids: Any, mask: Any) -> list[str]:
    problems: list[str] = []
    if mask.shape != ids.shape:
        problems.append(
            f"attention_mask {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}"
        )
    elif not bool(((mask == 0) | (mask == 1)).all()):
        problems.append("attention_mask must hold 0 (padding) and 1 (token) only")
    elif int(mask[0].sum()) <= int(mask[1].sum()):
        problems.append(
            "the mask does not mark padding: a 4-word text has no more tokens than a 1-word one"
        )
    else:
        try:
            alone = encode(tokenizer, texts[1:], warn_unknown=False)[0]
        except InputError as exc:
            return [str(exc)]
        if alone != ids[1][mask[1].bool()].tolist():
            problems.append(
                "a text alone gives other ids than in a padded batch: padding must not change "
                "the tokens"
            )
    return problems
