"""Behavioural circuit tests that run on any architecture with next-token logits: induction
(a random sequence repeated), verbatim copy of a word list, next-token concentration, and,
where a backend exposes per-head attention, per-head induction and previous-token scores.

Per-head attention is a layer's softmax pattern (``layer_i.attn_pattern``, on backends with
the ``attention_patterns`` capability) or, on a layer without one, its effective attention
(``layer_i.effective_attention``: the implicit attention of a linear-recurrence mixer, see
`archscope.recurrence`). Effective attention rows do not sum to one (they can be negative, or
sum to less or more than one), so each row is divided by the sum of its absolute values
before scoring (`normalised_attention`): a score is then the share of the row's weight at the
scored key, in [-1, 1], and on a softmax pattern (rows of non-negative numbers summing to one)
the division changes nothing.

Every test draws token ids from the model's own vocabulary (special ids of a tokenizer left
out), batches its trials (one forward pass per batch) and is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from ..errors import CapabilityError, InputError, ParameterError
from ..legacy import as_backend
from ..params import Param
from ..registry import method
from ..results import Result

if TYPE_CHECKING:
    import torch

    from ..backends import Backend

__all__ = [
    "CircuitReport",
    "CircuitScore",
    "circuits_method",
    "copy_score",
    "early_token_attention",
    "induction_head_score",
    "normalised_attention",
    "pattern_sites",
    "run_all_circuits",
]

#: Site roles the per-head scores read: softmax attention, and a linear-recurrence mixer's
#: effective attention where a layer has no softmax attention.
PATTERN_ROLES = ("attn_pattern", "effective_attention")


@dataclass
class CircuitScore(Result):
    """The score of one circuit test.

    ``score``: the test's metric (see each test); ``baseline``: its chance value; ``relative``:
    ``score / baseline``; ``raw``: the detailed numbers (per-head scores among them).
    """

    name: str
    score: float
    baseline: float
    relative: float
    raw: dict[str, Any] = field(default_factory=dict)


# -- shared helpers ------------------------------------------------------------------------------


def _backend(model: Any, hint: str | None = None) -> Backend:
    """The backend of ``model`` (a model, or a backend already)."""
    return as_backend(model, hint)


def _logit_vocab(backend: Backend) -> int:
    """Size of the model's output vocabulary, from its ``logits`` site."""
    if "logits" not in backend.capabilities or "logits" not in backend.sites():
        raise CapabilityError(
            f"circuit tests read next-token logits, but backend {backend.name!r} has no "
            f"'logits' capability (it has: {', '.join(sorted(backend.capabilities))})"
        )
    return int(backend.site_info("logits").dim)


def candidate_ids(
    backend: Backend, tokenizer: Any = None, vocab_size: int | None = None
) -> torch.Tensor:
    """Token ids a test may draw: ``0 .. V-1`` of the model's own vocabulary (``vocab_size``
    narrows it; a tokenizer's length narrows it to ids it can decode), without the
    tokenizer's special ids (padding, BOS/EOS, unknown)."""
    import torch

    n_logits = _logit_vocab(backend)
    limit = n_logits
    if vocab_size is not None:
        if not 1 <= vocab_size <= n_logits:
            raise ParameterError(
                f"vocab_size={vocab_size} is outside the model's vocabulary "
                f"of {n_logits} ids; give 1..{n_logits} or None (all)"
            )
        limit = vocab_size
    if tokenizer is not None:
        try:
            limit = min(limit, len(tokenizer))
        except TypeError:
            pass
    ids = torch.arange(limit)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            special.add(value)
    if special:
        ids = ids[~torch.isin(ids, torch.tensor(sorted(special), dtype=torch.long))]
    if len(ids) < 2:
        raise InputError(
            f"only {len(ids)} usable token id(s) (vocabulary {n_logits}, special "
            f"ids {sorted(special)}); the circuit tests need at least 2"
        )
    return ids


def _random_distinct(
    generator: torch.Generator, pool: torch.Tensor, rows: int, k: int
) -> torch.Tensor:
    """``rows`` x ``k`` ids from ``pool``, distinct within each row (needs k <= len(pool))."""
    import torch

    order = torch.rand(rows, len(pool), generator=generator).argsort(dim=-1)[:, :k]
    return pool[order]


def _pad(
    rows: Sequence[Sequence[int]], backend: Backend
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Token-id rows as one batch padded as ``backend`` allows, and where each row's first
    real token sits."""
    from ..data import pad_batch, padding_for

    batch = pad_batch(rows, padding_for(backend))
    width = batch["input_ids"].shape[1]
    left = padding_for(backend) == "left"
    return batch, [width - len(r) if left else 0 for r in rows]


def pattern_sites(backend: Backend) -> list[str]:
    """The per-head attention site of every layer that has one, in layer order: its
    ``layer_i.attn_pattern`` (when the backend has the ``attention_patterns`` capability),
    else its ``layer_i.effective_attention`` (read-only, computed only when captured)."""
    chosen: dict[int, tuple[int, str]] = {}
    softmax = "attention_patterns" in backend.capabilities
    for name, info in backend.sites().items():
        role, layer = info.site.role, info.site.layer
        if layer is None or role not in PATTERN_ROLES:
            continue
        if role == "attn_pattern" and not softmax:
            continue
        rank = PATTERN_ROLES.index(role)
        if layer not in chosen or rank < chosen[layer][0]:
            chosen[layer] = (rank, name)
    return [chosen[layer][1] for layer in sorted(chosen)]


def normalised_attention(value: torch.Tensor, role: str) -> torch.Tensor:
    """A per-head attention value (batch, heads, query, key) as the scores read it: a softmax
    pattern as it is, an effective attention with each row divided by the sum of its absolute
    values (rows of zeros stay zero)."""
    value = value.float()
    if role == "attn_pattern":
        return value
    total = value.abs().sum(-1, keepdim=True)
    return value / total.masked_fill(total == 0, 1.0)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ParameterError(f"{name} must be a positive integer, got {value}")


# -- induction -------------------------------------------------------------------------------------


def _logits_at(
    backend: Backend,
    batch: Any,
    read: torch.Tensor,
    capture: Sequence[str] = (),
    keep: torch.Tensor | None = None,
) -> tuple[Any, torch.Tensor]:
    """(the run, the logits at positions ``read``: (rows, k) indices, one row per batch row,
    giving (rows, k, vocab)). A backend that can unembed runs to its last layer's main site
    only and unembeds just those positions (the model's own final norm and head, as the
    patching readout does); otherwise they are read from the full logits. ``keep`` (rows, k)
    bool: only the positions it marks, row by row, giving (marked, vocab); the others (a
    ragged read's padding) are never unembedded."""
    import torch

    fast = "unembed" in backend.capabilities
    final = backend.layer_names()[-1] if fast else "logits"
    result = backend.run(batch, capture=[*capture, final])
    hidden = result[final]
    rows = torch.arange(read.shape[0], device=hidden.device).unsqueeze(1)
    picked = hidden[rows, read.to(hidden.device)]
    if keep is not None:
        picked = picked[keep.to(picked.device)]
    if not fast:
        return result, picked
    with torch.no_grad():
        return result, backend.unembed(picked)


def _is_top1(z: torch.Tensor, targets: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``z.argmax(-1) == targets`` for logits ``z`` (..., vocab), ``targets`` (...) and their
    maxima ``top = z.amax(-1)``, without argmax's pass over the vocabulary (several times
    slower on CPU than the maximum's): a target is the top-1 where its logit is the maximum
    and no other id ties with it; rows with a tie or a NaN (where argmax takes the first
    such id) are decided by argmax itself."""
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    hit = picked == top
    odd = top.isnan()
    if bool(hit.any()):  # a tie for the maximum matters only where the target reaches it
        odd[hit] |= (z[hit] == top[hit].unsqueeze(-1)).sum(-1) > 1
    if bool(odd.any()):
        hit[odd] = z[odd].argmax(-1) == targets[odd]
    return hit


def induction_head_score(
    model: Any,
    n_pairs: int = 20,
    seq_len: int = 6,
    n_trials: int = 50,
    vocab_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    *,
    tokenizer: Any = None,
    backend_hint: str | None = None,
    batch_size: int = 64,
    candidates: Sequence[int] | None = None,
) -> CircuitScore:
    """Induction: a random block of ``n_pairs + 1`` distinct tokens is shown twice after a
    random lead-in of ``seq_len`` other tokens; the score is the mean probability of the correct
    next token at the ``n_pairs`` positions of the second repeat whose continuation appeared in
    the first (chance: 1/vocabulary; ``relative`` = score x vocabulary).

    ``raw`` holds the same probability on the first repeat (where it cannot be known), top-1
    accuracy and, where layers have per-head attention (`pattern_sites`: softmax patterns, or
    the effective attention of linear-recurrence mixers, rows normalised as
    `normalised_attention` says), each head's induction score (attention from a token of the
    second repeat to the token after its first occurrence) and previous-token score (attention
    to the position before), read from the same forwards.
    ``candidates`` restricts the token ids drawn (e.g. the words a corpus repeats); chance
    stays 1/vocabulary. ``device`` is kept for compatibility: inputs go to the model's own
    device.
    """
    import torch

    from .lens import _logsumexp_

    _check_positive(n_pairs=n_pairs, n_trials=n_trials, batch_size=batch_size)
    if seq_len < 0:
        raise ParameterError(f"seq_len (the lead-in length) must be >= 0, got {seq_len}")
    backend = _backend(model, backend_hint)
    n_vocab = _logit_vocab(backend)
    pool = candidate_ids(backend, tokenizer, vocab_size)
    if candidates is not None:
        chosen = torch.as_tensor(list(candidates), dtype=torch.long)
        outside = chosen[~torch.isin(chosen, pool)].tolist()
        if outside:
            raise InputError(
                f"candidates {outside[:5]} are special or outside the model's "
                f"vocabulary of {n_vocab} ids"
            )
        pool = chosen.unique()
    block = n_pairs + 1
    if block > len(pool):
        raise ParameterError(
            f"n_pairs={n_pairs} needs {block} distinct token ids but the "
            f"vocabulary has {len(pool)} usable ids; lower n_pairs"
        )
    g = torch.Generator().manual_seed(seed)
    drawn = _random_distinct(g, pool, n_trials, min(len(pool), block + seq_len))
    blocks = drawn[:, :block]
    if drawn.shape[1] >= block + seq_len:  # lead-in from tokens outside the block
        lead = drawn[:, block : block + seq_len]
    else:  # small vocabulary: the lead-in may share tokens with the block
        lead = pool[torch.randint(len(pool), (n_trials, seq_len), generator=g)]
    ids = torch.cat([lead, blocks, blocks], dim=1)
    first = seq_len  # position of the block's first token, first repeat
    second = seq_len + block  # ... second repeat
    steps = torch.arange(n_pairs)
    patterns = pattern_sites(backend)

    p_second, p_first, top1 = [], [], []
    induction: dict[str, list[torch.Tensor]] = {s: [] for s in patterns}
    previous: dict[str, list[torch.Tensor]] = {s: [] for s in patterns}
    n_forwards = 0
    for start in range(0, n_trials, batch_size):
        chunk = ids[start : start + batch_size]
        # the logits of the positions read: the block on its first, then its second showing
        read = torch.cat([first + steps, second + steps]).expand(len(chunk), -1)
        result, logits = _logits_at(backend, chunk, read, patterns)
        n_forwards += 1
        targets = chunk[:, 1:][:, first + steps]  # the continuation in the block
        # the targets' log-probabilities only, as their logits minus the logsumexp (no
        # log-softmax over the whole vocabulary at every position read)
        z = logits.float()
        both = torch.cat([targets, targets], 1).to(z.device)  # first showing, then second
        picked = z.gather(-1, both.unsqueeze(-1)).squeeze(-1)
        top = z.amax(-1)  # shared by the top-1 test and the logsumexp
        top1.append(_is_top1(z[:, n_pairs:], both[:, n_pairs:], top[:, n_pairs:]).cpu())
        logp = (picked - _logsumexp_(z, top)).cpu()  # z is overwritten
        p_second.append(logp[:, n_pairs:].exp())
        p_first.append(logp[:, :n_pairs].exp())
        for site in patterns:
            role = backend.site_info(site).site.role
            pattern = normalised_attention(result[site], role).cpu()  # (batch, head, query, key)
            queries = second + steps
            induction[site].append(pattern[:, :, queries, first + steps + 1].mean(-1))
            pos = torch.arange(1, ids.shape[1])
            previous[site].append(pattern[:, :, pos, pos - 1].mean(-1))

    score = float(torch.cat(p_second).mean())
    baseline = 1.0 / n_vocab
    raw: dict[str, Any] = {
        "second_repeat_prob": score,
        "first_repeat_prob": float(torch.cat(p_first).mean()),
        "top1_accuracy": float(torch.cat(top1).float().mean()),
        "n_trials": n_trials,
        "n_pairs": n_pairs,
        "lead_in": seq_len,
        "vocab_size": n_vocab,
        "candidate_ids": len(pool),
        "n_forwards": n_forwards,
    }
    if patterns:
        raw["heads"] = _head_table(
            {s: torch.cat(v).mean(0) for s, v in induction.items()},
            {s: torch.cat(v).mean(0) for s, v in previous.items()},
            backend,
        )
    return CircuitScore("induction_head", score, baseline, score / baseline, raw)


def _head_table(
    induction: dict[str, torch.Tensor], previous: dict[str, torch.Tensor], backend: Backend
) -> dict[str, Any]:
    """Per-head scores keyed by layer (``layer_i``), plus the heads ranked by induction score."""
    by_layer = {}
    ranked = []
    for site, scores in induction.items():
        layer = backend.site_info(site).site.layer
        by_layer[f"layer_{layer}"] = {
            "induction": scores.tolist(),
            "previous_token": previous[site].tolist(),
            "site": site,
        }
        ranked += [(layer, h, float(s)) for h, s in enumerate(scores)]
    ranked.sort(key=lambda t: -t[2])
    return {
        "per_layer": by_layer,
        "top_induction": [{"layer": la, "head": h, "score": s} for la, h, s in ranked[:5]],
    }


# -- copy ------------------------------------------------------------------------------------------


def repeated_span_score(
    model: Any,
    rows: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int, int]],
    *,
    backend_hint: str | None = None,
    batch_size: int = 32,
) -> CircuitScore:
    """Induction on given documents: each row of token ids repeats a span, ``(first, second,
    length)`` = where its two copies start and how long it is. The score is the mean
    probability of the right token at tokens 2..length of the second copy (predictable only
    by copying); chance is 1/vocabulary. One forward per batch of rows."""
    import torch

    from ..data import pad_batch, padding_for

    backend = _backend(model, backend_hint)
    n_vocab = _logit_vocab(backend)
    if len(rows) != len(spans) or not rows:
        raise InputError(
            f"give one (first, second, length) span per row; got {len(rows)} rows "
            f"and {len(spans)} spans"
        )
    for row, (first, second, length) in zip(rows, spans, strict=True):
        if not (
            0 <= first and first + length <= second and second + length <= len(row) and length >= 2
        ):
            raise InputError(
                f"span ({first}, {second}, {length}) does not fit a row of "
                f"{len(row)} tokens with two copies of at least 2 tokens"
            )
    probs = []
    side = padding_for(backend)
    for start in range(0, len(rows), batch_size):
        chunk = [list(r) for r in rows[start : start + batch_size]]
        batch = pad_batch(chunk, side)
        logp = backend.run(batch, capture=["logits"])["logits"].float().log_softmax(-1)
        width = batch["input_ids"].shape[1]
        for i, (row, (_, second, length)) in enumerate(
            zip(chunk, spans[start : start + batch_size], strict=True)
        ):
            offset = 0 if side == "right" else width - len(row)
            at = torch.arange(second, second + length - 1) + offset
            targets = batch["input_ids"][i, at + 1]
            probs.append(logp[i, at].gather(-1, targets[:, None]).exp()[:, 0])
    score = float(torch.cat(probs).mean())
    return CircuitScore(
        "repeated_span",
        score,
        1.0 / n_vocab,
        score * n_vocab,
        {"n_rows": len(rows), "n_tokens": int(sum(len(p) for p in probs))},
    )


def copy_score(
    model: Any,
    tokenizer: Any = None,
    n_trials: int = 30,
    n_words: int = 5,
    device: str = "cpu",
    seed: int = 0,
    *,
    max_word_tokens: int = 3,
    backend_hint: str | None = None,
    batch_size: int = 64,
) -> CircuitScore:
    """Verbatim copy of a word list: ``S w1 .. wn S w1 .. wn`` where each word is 1 to
    ``max_word_tokens`` random tokens of the vocabulary and ``S`` a separator token. The score
    is top-1 accuracy over every token of every word in the second list, given the true prefix
    (a greedy decoder copies the list exactly iff all are right); chance is 1/vocabulary.

    ``raw`` also has word accuracy (all tokens of a word right), list accuracy, and the
    first-token-of-each-word accuracy. ``tokenizer`` (optional) removes special ids from the
    draw and decodes the example words in ``raw``.
    """
    import torch

    _check_positive(
        n_trials=n_trials, n_words=n_words, max_word_tokens=max_word_tokens, batch_size=batch_size
    )
    backend = _backend(model, backend_hint)
    n_vocab = _logit_vocab(backend)
    pool = candidate_ids(backend, tokenizer)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_word_tokens + 1, (n_trials, n_words), generator=g)
    need = int(lengths.sum(1).max()) + 1
    distinct = need <= len(pool)  # every token of a trial distinct, when the vocabulary allows
    trials = []
    for t in range(n_trials):
        if distinct:
            toks = _random_distinct(g, pool, 1, need)[0]
        else:
            toks = pool[torch.randint(len(pool), (need,), generator=g)]
        sep, rest = int(toks[0]), toks[1:].tolist()
        words, k = [], 0
        for n in lengths[t].tolist():
            words.append(rest[k : k + n])
            k += n
        trials.append((sep, words))

    tok_hits, word_hits, list_hits, first_hits = [], [], [], []
    n_forwards = 0
    for start in range(0, n_trials, batch_size):
        chunk = trials[start : start + batch_size]
        rows = []
        for sep, words in chunk:
            flat = [x for w in words for x in w]
            rows.append([sep, *flat, sep, *flat])
        batch, offsets = _pad(rows, backend)
        # the positions read: each token of the second list is predicted at the one before
        flat_len = [sum(len(w) for w in words) for _sep, words in chunk]
        read = torch.tensor(
            [
                [offsets[r] + 1 + n + t if t < n else offsets[r] for t in range(max(flat_len))]
                for r, n in enumerate(flat_len)
            ],
            dtype=torch.long,
        )
        # only the positions that predict a word token: the ragged rows' padding is never
        # unembedded; the logits come row by row, in the order of the words' tokens
        keep = torch.arange(max(flat_len)) < torch.tensor(flat_len).unsqueeze(1)
        _, logits = _logits_at(backend, batch, read, keep=keep)
        n_forwards += 1
        wanted = torch.tensor(
            [x for _sep, words in chunk for w in words for x in w],
            dtype=torch.long,
            device=logits.device,
        )
        # top-1 given the true prefix (teacher forcing), one flag per word token
        correct = _is_top1(logits, wanted, logits.amax(-1)).cpu().tolist()
        pos = 0  # index into the word tokens of the chunk
        for _sep, words in chunk:
            list_ok = True
            for w in words:
                hits = correct[pos : pos + len(w)]
                pos += len(w)
                tok_hits += hits
                word_hits.append(all(hits))
                first_hits.append(hits[0])
                list_ok = list_ok and all(hits)
            list_hits.append(list_ok)

    score = sum(tok_hits) / len(tok_hits)
    baseline = 1.0 / n_vocab
    example = trials[0][1]
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        example = [tokenizer.decode(w) for w in example]
    raw = {
        "token_accuracy": score,
        "word_accuracy": sum(word_hits) / len(word_hits),
        "list_accuracy": sum(list_hits) / len(list_hits),
        "first_token_accuracy": sum(first_hits) / len(first_hits),
        "n_trials": n_trials,
        "n_words": n_words,
        "max_word_tokens": max_word_tokens,
        "tokens_scored": len(tok_hits),
        "vocab_size": n_vocab,
        "n_forwards": n_forwards,
        "example_words": example,
    }
    return CircuitScore("copy_circuit", score, baseline, score / baseline, raw)


# -- next-token concentration ----------------------------------------------------------------------

#: Prompts used when a tokenizer is given and no texts are.
DEFAULT_TEXTS = (
    "The river ran past the old",
    "After the storm the village",
    "She opened the letter and",
    "The first rule of the game is",
    "Two plus three equals",
    "In the morning the market",
    "He put the book back on the",
    "The results of the experiment",
)


def early_token_attention(
    model: Any,
    tokenizer: Any = None,
    texts: list[str] | None = None,
    device: str = "cpu",
    *,
    n_random: int = 16,
    random_len: int = 12,
    seed: int = 0,
    backend_hint: str | None = None,
    batch_size: int = 64,
) -> CircuitScore:
    """Next-token concentration: the entropy (nats) of the next-token distribution after each
    text's last real token (``score``), against the uniform distribution's log(vocabulary)
    (``baseline``); ``relative`` = score / baseline (1 = uniform, lower = concentrated).

    Texts: ``texts`` with ``tokenizer``; without texts, built-in prompts when a tokenizer is
    given, else ``n_random`` random sequences of the vocabulary. ``raw`` adds the entropy over
    every real position and, where layers have per-head attention (`pattern_sites`), each
    layer's mean attention on the first real token (the "early token" of the name).
    """
    import torch

    _check_positive(batch_size=batch_size, n_random=n_random, random_len=random_len)
    backend = _backend(model, backend_hint)
    n_vocab = _logit_vocab(backend)
    if texts is not None and tokenizer is None:
        raise InputError(
            "early_token_attention got texts but no tokenizer: pass tokenizer= "
            "(or texts=None to use random token sequences)"
        )
    if tokenizer is not None:
        chosen = list(texts) if texts is not None else list(DEFAULT_TEXTS)
        from ..data import Dataset

        rows = Dataset.from_texts(chosen, tokenizer=tokenizer).ids()
        source = "texts" if texts is not None else "built-in prompts"
    else:
        pool = candidate_ids(backend)
        g = torch.Generator().manual_seed(seed)
        rows = pool[torch.randint(len(pool), (n_random, random_len), generator=g)].tolist()
        source = "random token sequences"
    patterns = pattern_sites(backend)
    last_h, all_h = [], []
    first_attn: dict[str, list[torch.Tensor]] = {s: [] for s in patterns}
    from ..batch import last_real_index

    for start in range(0, len(rows), batch_size):
        batch, offsets = _pad(rows[start : start + batch_size], backend)
        result = backend.run(batch, capture=[*patterns, "logits"])
        mask = result.attention_mask
        assert mask is not None
        logp = torch.log_softmax(result["logits"].float(), -1)
        ent = -(logp.exp() * logp).sum(-1)  # (batch, seq)
        idx = torch.arange(len(offsets))
        last_h.append(ent[idx, last_real_index(mask)].cpu())
        all_h.append(ent[mask.bool()].cpu())
        first = torch.as_tensor(offsets, device=mask.device)
        for site in patterns:
            role = backend.site_info(site).site.role
            pattern = normalised_attention(result[site], role)  # (batch, head, query, key)
            to_first = pattern[idx, :, :, first]  # (batch, head, query)
            m = mask.unsqueeze(1).to(to_first.dtype)
            first_attn[site].append(((to_first * m).sum(-1) / m.sum(-1)).mean(-1).cpu())
    score = float(torch.cat(last_h).mean())
    baseline = math.log(n_vocab)
    raw: dict[str, Any] = {
        "per_text_entropy": torch.cat(last_h).tolist(),
        "all_positions_entropy": float(torch.cat(all_h).mean()),
        "max_entropy": baseline,
        "concentration": 1.0 - score / baseline,
        "inputs": source,
        "n_texts": len(rows),
    }
    if patterns:
        raw["first_token_attention"] = {
            f"layer_{backend.site_info(s).site.layer}": float(torch.cat(v).mean())
            for s, v in first_attn.items()
        }
    return CircuitScore("early_token_concentration", score, baseline, score / baseline, raw)


def run_all_circuits(
    model: Any,
    tokenizer: Any = None,
    device: str = "cpu",
    *,
    backend_hint: str | None = None,
    seed: int = 0,
) -> dict[str, CircuitScore]:
    """Every circuit test, keyed by name (``induction_head``, ``copy_circuit``,
    ``early_token_concentration``). All run without a tokenizer (random token ids)."""
    backend = _backend(model, backend_hint)
    return {
        "induction_head": induction_head_score(backend, tokenizer=tokenizer, seed=seed),
        "copy_circuit": copy_score(backend, tokenizer, seed=seed),
        "early_token_concentration": early_token_attention(backend, tokenizer, seed=seed),
    }


# -- the registered method ---------------------------------------------------------------------------


@dataclass
class CircuitReport(Result):
    """The `circuits` method's result: every circuit score of one backend."""

    backend: str
    scores: dict[str, CircuitScore]

    def to_markdown(self) -> str:
        lines = [
            f"## Circuit scores ({self.backend})",
            "",
            "| test | score | baseline | relative |",
            "|---|---|---|---|",
        ]
        for s in self.scores.values():
            lines.append(f"| {s.name} | {s.score:.4g} | {s.baseline:.4g} | {s.relative:.4g} |")
        heads = self.scores["induction_head"].raw.get("heads") if self.scores else None
        if heads:
            lines += [
                "",
                "Top induction heads: "
                + ", ".join(
                    f"layer {h['layer']} head {h['head']} ({h['score']:.2f})"
                    for h in heads["top_induction"][:3]
                ),
            ]
        return "\n".join(lines)

    def figure(self) -> Any:
        """Per-head induction and previous-token scores (layers x heads) where layers have
        per-head attention (softmax or effective), else the relative scores as bars. Layers
        may have different numbers of heads (a hybrid): missing cells are blank."""
        from ..results import pyplot

        plt = pyplot()
        heads = self.scores["induction_head"].raw.get("heads")
        if heads:
            layers = sorted(heads["per_layer"], key=lambda k: int(k.split("_")[1]))
            fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.5 * len(layers)))
            for ax, key in zip(axes, ("induction", "previous_token"), strict=True):
                rows = [heads["per_layer"][la][key] for la in layers]
                width = max(len(r) for r in rows)
                grid = [r + [math.nan] * (width - len(r)) for r in rows]
                signed = any(v < 0 for r in rows for v in r)  # effective attention can be
                im = ax.imshow(
                    grid,
                    aspect="auto",
                    cmap="RdBu_r" if signed else "viridis",
                    vmin=-1 if signed else 0,
                    vmax=1,
                )
                ax.set_yticks(range(len(layers)), layers)
                ax.set_xticks(range(width))
                ax.set_xlabel("head")
                ax.set_title(f"{key.replace('_', ' ')} score")
                fig.colorbar(im, ax=ax)
        else:
            fig, ax = plt.subplots(figsize=(6, 3))
            names = list(self.scores)
            ax.bar(names, [self.scores[n].relative for n in names])
            ax.set_ylabel("score / chance")
        fig.suptitle(f"circuits ({self.backend})")
        fig.tight_layout()
        return fig


@method(
    "circuits",
    "Induction, copy and next-token concentration scores (per-head induction and "
    "previous-token scores on softmax or effective attention)",
    requires={"logits"},
    input="batch",
    quick={"n_trials": 8, "n_pairs": 5, "lead_in": 2, "n_words": 3},
)
def circuits_method(
    backend: Any,
    data: Any = None,
    *,
    n_trials: Annotated[int, Param(min=1, help="induction and copy trials")] = 50,
    n_pairs: Annotated[int, Param(min=1, help="scored predictions per induction trial")] = 20,
    lead_in: Annotated[int, Param(min=0, help="random tokens before the repeated block")] = 6,
    n_words: Annotated[int, Param(min=1, help="words per copy list")] = 5,
    batch_size: Annotated[int, Param(min=1, help="trials per forward pass")] = 64,
    seed: int = 0,
) -> CircuitReport:
    """The `circuits` method: induction (with per-head scores on every layer with softmax or
    effective attention), copy and next-token concentration. ``data`` (optional token batch) replaces the random
    sequences of the concentration test."""
    scores = {
        "induction_head": induction_head_score(
            backend,
            n_pairs=n_pairs,
            seq_len=lead_in,
            n_trials=n_trials,
            seed=seed,
            batch_size=batch_size,
        ),
        "copy_circuit": copy_score(
            backend, None, n_trials=n_trials, n_words=n_words, seed=seed, batch_size=batch_size
        ),
    }
    if data is None:
        scores["early_token_concentration"] = early_token_attention(
            backend, seed=seed, batch_size=batch_size
        )
    else:
        scores["early_token_concentration"] = _concentration_of_batch(backend, data)
    return CircuitReport(backend=backend.name, scores=scores)


def _concentration_of_batch(backend: Any, data: Any) -> CircuitScore:
    """Next-token concentration on a given token batch (last real token of each row)."""
    import torch

    from ..batch import last_real_index

    result = backend.run(data, capture=["logits"])
    mask = result.attention_mask
    logp = torch.log_softmax(result["logits"].float(), -1)
    ent = -(logp.exp() * logp).sum(-1)
    rows = torch.arange(ent.shape[0])
    last = ent[rows, last_real_index(mask)].cpu()
    baseline = math.log(logp.shape[-1])
    score = float(last.mean())
    return CircuitScore(
        "early_token_concentration",
        score,
        baseline,
        score / baseline,
        {
            "per_text_entropy": last.tolist(),
            "all_positions_entropy": float(ent[mask.bool()].mean()),
            "max_entropy": baseline,
            "concentration": 1 - score / baseline,
            "inputs": "given batch",
            "n_texts": int(ent.shape[0]),
        },
    )
