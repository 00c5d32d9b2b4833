"""Lenses: read what each layer would predict. The logit lens sends a layer's residual through
the model's own final norm and unembedding (`Backend.unembed`); the tuned lens (Belrose et al.
2023) first applies a learned per-layer affine translator ``h + A h + b``.

Both work on any backend with the ``unembed`` capability (transformers, state-space models,
recurrent LMs) and count positions in real tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from ..artifacts import Artifact, ArtifactFit
from ..errors import ArtifactError, InputError, ParameterError
from ..legacy import as_backend
from ..params import Param
from ..registry import method
from ..results import Result
from .splits import held_out_split

if TYPE_CHECKING:
    import torch

    from ..backends import Backend

__all__ = [
    "LayerPrediction",
    "LensResult",
    "LogitLensRun",
    "TunedLens",
    "TunedLensReport",
    "logit_lens",
    "logit_lens_run",
    "tuned_lens_method",
]

Translate = Callable[[int, "torch.Tensor"], "torch.Tensor"]


# -- results ---------------------------------------------------------------------------------------


@dataclass
class LayerPrediction(Result):
    """What one layer predicts at the prompt's last real token.

    ``top_tokens``: ``(token_id, text, probability)``, most probable first; ``target_rank``:
    how many tokens are more probable than the target (0 = top-1); ``entropy`` and
    ``kl_to_final`` (KL(final distribution ‖ this layer's)) are in nats.
    """

    layer: int
    layer_name: str
    top_tokens: list[tuple[int, str, float]]
    target_prob: float | None
    target_rank: int | None
    entropy: float
    kl_to_final: float = 0.0


@dataclass
class LensResult(Result):
    """A lens over one prompt: per layer, the prediction at the last real token, and the
    layers x positions grids of KL to the final distribution and of the top-1 token."""

    prompt: str
    target_token: str | None
    target_token_id: int | None
    layers: list[LayerPrediction]
    method: str
    position_tokens: list[str] = field(default_factory=list)
    kl_grid: list[list[float]] = field(default_factory=list)
    top_grid: list[list[str]] = field(default_factory=list)

    def to_markdown(self) -> str:
        target = (
            f"target {self.target_token!r} (id {self.target_token_id})"
            if self.target_token_id is not None
            else "no target"
        )
        lines = [
            f"## {self.method} over {self.prompt!r}, {target}",
            "",
            "| layer | top tokens | target prob | target rank | entropy | KL to final |",
            "|---|---|---|---|---|---|",
        ]
        for p in self.layers:
            prob = "-" if p.target_prob is None else f"{p.target_prob:.4f}"
            rank = "-" if p.target_rank is None else str(p.target_rank)
            tops = ", ".join(f"{text!r} {prob:.3f}" for _, text, prob in p.top_tokens)
            lines.append(
                f"| {p.layer_name} | {tops} | {prob} | {rank} | {p.entropy:.3f} | "
                f"{p.kl_to_final:.3f} |"
            )
        return "\n".join(lines)

    def figure(self) -> Any:
        """Heat map of KL(final ‖ lens) over layers x positions, each cell labelled with the
        layer's top-1 token there."""
        return _heat_map(
            self.kl_grid,
            [p.layer_name for p in self.layers],
            self.position_tokens,
            self.top_grid,
            f"{self.method}: KL(final ‖ lens) per layer and position",
        )


def _heat_map(
    grid: list[list[float]],
    rows: list[str],
    cols: list[str],
    labels: list[list[str]] | None,
    title: str,
) -> Any:
    from ..results import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * max(len(cols), 1), 1.2 + 0.45 * len(rows)))
    image = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    if labels:
        for i, row in enumerate(labels):
            for j, text in enumerate(row):
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="tab:blue")
    fig.colorbar(image, ax=ax, label="nats")
    ax.set_title(title)
    fig.tight_layout()
    return fig


# -- helpers -----------------------------------------------------------------------------------------


def _backend(model: Any, hint: str | None = None) -> Backend:
    backend = as_backend(model, hint)
    # The core's CapabilityError, naming the backend, before any forward pass.
    backend.require("unembed")
    backend.require("logits")
    return backend


def _decode(tokenizer: Any, token_id: int) -> str:
    from ..tokens import decode

    return decode(tokenizer, token_id)


def _prompt_ids(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InputError(
                "a text prompt needs a tokenizer: pass tokenizer=, or give the "
                "prompt as a list of token ids"
            )
        from ..tokens import encode_one

        ids = encode_one(tokenizer, prompt)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise InputError(f"the prompt {prompt!r} has no tokens; give a non-empty prompt")
    return ids


def _target_id(tokenizer: Any, target: str | int | None, n_vocab: int) -> int | None:
    if target is None:
        return None
    if isinstance(target, int):
        tid = target
    else:  # one known token: an unknown or multi-token target is refused, saying why
        from ..tokens import single_token_id

        tid = single_token_id(tokenizer, target)
    if not 0 <= tid < n_vocab:
        raise InputError(f"target token id {tid} is outside the vocabulary 0..{n_vocab - 1}")
    return tid


def _layer_indices(backend: Backend, layers: Sequence[int] | None) -> list[int]:
    n = len(backend.layer_names())
    if layers is None:
        return list(range(n))
    chosen = []
    for i in layers:
        if not -n <= int(i) < n:
            raise ParameterError(
                f"layer {i} does not exist: the model has layers 0..{n - 1} "
                f"({n} of them); negative indices count from the last"
            )
        chosen.append(int(i) % n)
    return chosen


def _embed_site(backend: Backend) -> str:
    """The backend's ``embed`` site (the embedding output), or a ParameterError."""
    if "embed" not in backend.sites():
        raise ParameterError(
            f"embed=True reads the 'embed' site, which backend {backend.name!r} does not have; "
            "leave embed off"
        )
    info = backend.site_info("embed")
    width = backend.site_info(backend.layer_names()[-1]).dim
    if info.dim != width:
        raise ParameterError(
            f"embed=True: the embedding output has {info.dim} features but the unembedding "
            f"reads {width} (the layers' width), so it cannot be read through the lens; "
            "leave embed off"
        )
    return info.name


def _real_positions(
    positions: Any, lengths: torch.Tensor, position: torch.Tensor, doc: torch.Tensor
) -> torch.Tensor:
    """Which per-token rows (``position`` among its text's real tokens, ``doc`` its text) to
    keep: ``positions`` "all", "last", or real-token indices (negative from each text's last
    real token)."""
    import torch

    if positions == "all":
        return torch.ones_like(position, dtype=torch.bool)
    chosen = [-1] if positions == "last" else [int(p) for p in positions]
    from_end = position - lengths[doc]
    keep = torch.zeros_like(position, dtype=torch.bool)
    for p in chosen:
        keep |= (position == p) if p >= 0 else (from_end == p)
    return keep


def _check_positions(positions: Any) -> Any:
    if positions in ("all", "last"):
        return positions
    if isinstance(positions, str):
        try:
            positions = [int(p) for p in positions.split(",") if p.strip()]
        except ValueError:
            positions = None
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    if (
        not isinstance(positions, (list, tuple))
        or not positions
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions)
    ):
        raise ParameterError(
            f"positions={positions!r}: use 'all', 'last' or real-token indices such as [0, -1] "
            "(negative counts from each text's last real token)"
        )
    return list(positions)


def _kl(final_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(final ‖ lens) along the last axis (nats)."""
    return (final_logp.exp() * (final_logp - logp)).sum(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def _lens(
    backend: Backend,
    tokenizer: Any,
    prompt: str | Sequence[int],
    target_token: str | int | None,
    layers: Sequence[int] | None,
    top_k: int,
    translate: Translate | None,
    method: str,
    embed: bool = False,
) -> LensResult:
    """One lens pass over one prompt (the logit lens when ``translate`` is None); ``embed``
    adds the embedding output as a first row (layer -1)."""
    import torch

    if top_k < 1:
        raise ParameterError(f"top_k must be >= 1, got {top_k}")
    from ..tokens import check_fits

    check_fits(tokenizer, backend)
    ids = _prompt_ids(tokenizer, prompt)
    names = backend.layer_names()
    chosen = _layer_indices(backend, layers)
    limits = backend.input_limits()
    if limits.vocab_size is not None:  # a bad target is refused before the forward pass
        _target_id(tokenizer, target_token, limits.vocab_size)
    rows = [(i, names[i]) for i in chosen]
    if embed:
        rows.insert(0, (-1, _embed_site(backend)))
    result = backend.run([ids], capture=[*dict.fromkeys(n for _, n in rows), "logits"])
    final = torch.log_softmax(result["logits"][0].float(), -1)  # (seq, vocab)
    n_vocab = final.shape[-1]
    tid = _target_id(tokenizer, target_token, n_vocab)
    if tid is None:  # judge each layer by the model's own next-token prediction
        tid = int(final[-1].argmax())
        target_text: str | None = _decode(tokenizer, tid)
    else:
        target_text = target_token if isinstance(target_token, str) else _decode(tokenizer, tid)
    k = min(top_k, n_vocab)
    out = LensResult(
        prompt=prompt if isinstance(prompt, str) else " ".join(map(str, ids)),
        target_token=target_text,
        target_token_id=tid,
        layers=[],
        method=method,
        position_tokens=[_decode(tokenizer, i) for i in ids],
    )
    with torch.no_grad():
        for i, name in rows:
            h = result[name][0]
            if translate is not None and i >= 0:  # the embedding row: no translator
                h = translate(i, h)
            logp = torch.log_softmax(backend.unembed(h).float(), -1)  # (seq, vocab)
            last = logp[-1]
            top = last.topk(k)
            rank = int((last > last[tid]).sum())
            kl = _kl(final, logp)
            out.layers.append(
                LayerPrediction(
                    layer=i,
                    layer_name=name,
                    top_tokens=[
                        (int(t), _decode(tokenizer, int(t)), float(v.exp()))
                        for t, v in zip(top.indices, top.values, strict=True)
                    ],
                    target_prob=float(last[tid].exp()),
                    target_rank=rank,
                    entropy=float(_entropy(last)),
                    kl_to_final=float(kl[-1]),
                )
            )
            out.kl_grid.append(kl.tolist())
            out.top_grid.append([_decode(tokenizer, int(t)) for t in logp.argmax(-1)])
    return out


# -- the logit lens ------------------------------------------------------------------------------------


def logit_lens(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    target_token: str | int | None = None,
    layers: list[int] | None = None,
    backend_hint: str | None = None,
    top_k: int = 5,
    device: str = "cpu",
    *,
    embed: bool = False,
) -> LensResult:
    """Each layer's residual (``backend.layer_names()``) through the model's own final norm and
    unembedding, at every position of ``prompt``; per layer the top-k tokens, target probability
    and rank, entropy and KL to the final distribution at the last token. Without
    ``target_token`` the target is the model's own top prediction. ``embed=True`` adds the
    embedding output (site ``embed``, before any layer) as a first row, ``layer=-1``.
    ``device`` is kept for compatibility: inputs go to the model's device."""
    backend = _backend(model, backend_hint)
    return _lens(backend, tokenizer, prompt, target_token, layers, top_k, None, "logit_lens", embed)


# -- the batch method ------------------------------------------------------------------------------------


@dataclass
class LensLayer(Result):
    """One layer of a batch logit lens: per row, at the chosen real-token position."""

    layer_name: str
    top_ids: list[list[int]]
    entropy: list[float]
    kl_to_final: list[float]
    #: Per row: how many tokens this layer ranks above the row's target (0 = top-1), and the
    #: target's probability.
    target_rank: list[int] = field(default_factory=list)
    target_prob: list[float] = field(default_factory=list)


@dataclass
class LogitLensRun(Result):
    """The `logit-lens` method's result. ``position`` counts real tokens (negative: from each
    row's last real token); ``mean_kl`` is layers x real positions, averaged over the rows
    that have that position."""

    backend: str
    position: int
    layers: list[LensLayer] = field(default_factory=list)
    mean_kl: list[list[float]] = field(default_factory=list)
    #: Per row: the token each layer's rank is measured for (``target``, or the model's own
    #: top prediction at the position).
    target_ids: list[int] = field(default_factory=list)

    def to_markdown(self) -> str:
        rows = [
            f"| {ly.layer_name} | {ly.top_ids[0]} | {ly.entropy[0]:.3f} | "
            f"{ly.kl_to_final[0]:.3f} | {sum(ly.kl_to_final) / len(ly.kl_to_final):.3f} | "
            + (
                f"{ly.target_rank[0]} | {sum(ly.target_rank) / len(ly.target_rank):.2f} |"
                if ly.target_rank
                else "- | - |"
            )
            for ly in self.layers
        ]
        target = f" target ids {self.target_ids[:8]}" if self.target_ids else ""
        return "\n".join(
            [
                f"## Logit lens ({self.backend}), real-token position {self.position}{target}",
                "",
                "| layer | top ids (row 0) | entropy (row 0) | KL to final (row 0)"
                " | mean KL over rows | target rank (row 0) | mean target rank |",
                "|---|---|---|---|---|---|---|",
                *rows,
            ]
        )

    def figure(self) -> Any:
        """Heat map of the mean KL to final over layers x real-token positions."""
        width = max((len(r) for r in self.mean_kl), default=0)
        return _heat_map(
            self.mean_kl,
            [ly.layer_name for ly in self.layers],
            [str(i) for i in range(width)],
            None,
            f"logit lens ({self.backend}): mean KL(final ‖ lens)",
        )


@method(
    "logit-lens",
    "Each layer's residual through the model's own final norm and unembedding",
    requires={"residual", "unembed", "logits"},
    quick={"top_k": 3},
)
def logit_lens_run(
    backend: Any,
    data: Any,
    *,
    top_k: Annotated[int, Param(min=1, help="tokens to report per layer")] = 5,
    position: Annotated[
        int, Param(help="real-token index per row; negative counts from the row's last real token")
    ] = -1,
    target: Annotated[
        int | None,
        Param(
            min=0,
            help="token id whose rank each layer reports (default: the model's own top "
            "prediction at the position, per row)",
        ),
    ] = None,
    embed: Annotated[bool, Param(help="add the embedding output as a first row")] = False,
) -> LogitLensRun:
    """The `logit-lens` method on a token batch: each layer through ``backend.unembed``.

    ``position`` counts each row's real tokens (0 = first real token, -1 = last), so rows
    shorter than the batch never report a padding position; a position a row does not have
    is an error naming the shortest row. Each layer reports, per row, the rank and
    probability of the target token (``target``, or the model's own top prediction)."""
    import torch

    if top_k < 1:
        raise ParameterError(f"top_k must be >= 1, got {top_k}")
    backend = _backend(backend)
    names = backend.layer_names()
    if embed:
        names = [_embed_site(backend), *names]
    if isinstance(data, (list, tuple)):  # token-id rows of any lengths: pad them
        from ..data import as_dataset, pad_batch, padding_for

        data = pad_batch(as_dataset(data).ids(), padding_for(backend))
    result = backend.run(data, capture=[*dict.fromkeys(names), "logits"])
    mask = result.attention_mask
    assert mask is not None
    lengths = mask.sum(-1)
    shortest = int(lengths.min())
    if not -shortest <= position < shortest:
        raise ParameterError(
            f"position={position} is not a real token of every row: the "
            f"shortest row has {shortest} real tokens (valid: "
            f"{-shortest}..{shortest - 1})"
        )
    # Real-token index r of each row -> its column in the padded batch (left or right padding).
    first = (mask.long().cumsum(-1) == 0).sum(-1)
    rank = position if position >= 0 else lengths + position
    cols = first + rank
    rows = torch.arange(mask.shape[0], device=mask.device)
    final_all = torch.log_softmax(result["logits"].float(), -1)
    final = final_all[rows, cols]
    n_vocab = final.shape[-1]
    if target is not None and not 0 <= int(target) < n_vocab:
        raise ParameterError(f"target={target} is outside the vocabulary 0..{n_vocab - 1}")
    tids = (
        final.argmax(-1)
        if target is None
        else torch.full_like(final[:, 0], int(target), dtype=torch.long)
    )
    width = int(lengths.max())
    real_col = first.unsqueeze(1) + torch.arange(width, device=mask.device)  # (batch, width)
    present = torch.arange(width, device=mask.device) < lengths.unsqueeze(1)
    real_col = real_col.clamp(max=mask.shape[1] - 1)
    out = LogitLensRun(backend=backend.name, position=position, target_ids=tids.tolist())
    with torch.no_grad():
        for name in names:
            logp_all = torch.log_softmax(backend.unembed(result[name]).float(), -1)
            logp = logp_all[rows, cols]
            at_target = logp.gather(1, tids[:, None])
            out.layers.append(
                LensLayer(
                    layer_name=name,
                    top_ids=logp.topk(min(top_k, logp.shape[-1])).indices.tolist(),
                    entropy=_entropy(logp).tolist(),
                    kl_to_final=_kl(final, logp).tolist(),
                    target_rank=(logp > at_target).sum(-1).tolist(),
                    target_prob=at_target[:, 0].exp().tolist(),
                )
            )
            kl_grid = _kl(final_all, logp_all).gather(1, real_col)  # (batch, width)
            kl_grid = (kl_grid * present).sum(0) / present.sum(0)
            out.mean_kl.append(kl_grid.tolist())
    return out


# -- the tuned lens --------------------------------------------------------------------------------------


@dataclass
class TunedLensReport(Result):
    """Held-out KL(final ‖ lens) per layer, tuned lens next to the logit lens (nats)."""

    backend: str
    layers: list[str]
    kl_logit: list[float]
    kl_tuned: list[float]
    n_train_tokens: int
    n_eval_tokens: int
    epochs: int
    #: The real-token positions trained and evaluated on ("all", "last" or indices).
    positions: Any = "all"

    def to_markdown(self) -> str:
        rows = [
            f"| {n} | {a:.4f} | {b:.4f} |"
            for n, a, b in zip(self.layers, self.kl_logit, self.kl_tuned, strict=True)
        ]
        return "\n".join(
            [
                f"## Tuned lens ({self.backend}): held-out KL(final ‖ lens), {self.n_eval_tokens} "
                f"tokens (trained on {self.n_train_tokens}, {self.epochs} epochs; positions "
                f"{self.positions})",
                "",
                "| layer | logit lens | tuned lens |",
                "|---|---|---|",
                *rows,
            ]
        )

    def figure(self) -> Any:
        from ..results import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.kl_logit, marker="o", label="logit lens")
        ax.plot(self.kl_tuned, marker="o", label="tuned lens")
        ax.set_xticks(range(len(self.layers)), self.layers, rotation=45, ha="right")
        ax.set_ylabel("held-out KL(final ‖ lens), nats")
        ax.legend()
        fig.tight_layout()
        return fig


#: Probe inputs that fingerprint a model's final norm and unembedding (seeded, not saved).
_PROBE_SEED = 20230101
_PROBE_ROWS = 4
_PROBE_COLS = 8


def unembed_fingerprint(backend: Backend, hidden_dim: int) -> torch.Tensor:
    """A (4, 8) summary of ``backend.unembed``: fixed random residuals through the model's
    final norm and unembedding, projected on fixed random directions over the vocabulary.
    Two models share it (to float tolerance) only if their unembedding maps agree."""
    import torch

    g = torch.Generator().manual_seed(_PROBE_SEED)
    probe = torch.randn(_PROBE_ROWS, hidden_dim, generator=g)
    dtype = next(iter(backend.model.parameters()), probe).dtype
    with torch.no_grad():
        logits = backend.unembed(probe.to(device=backend.device, dtype=dtype)).float().cpu()
    directions = torch.randn(logits.shape[-1], _PROBE_COLS, generator=g) / math.sqrt(
        logits.shape[-1]
    )
    return (logits - logits.mean(-1, keepdim=True)) @ directions


class TunedLens(Artifact):
    """Per-layer affine translators ``h -> h + A h + b`` (A, b zero-initialised: an untrained
    tuned lens is the logit lens), trained so that ``unembed(translate(h))`` matches the
    model's final next-token distribution: KL(final ‖ lens) over every real token position.

    Save with `save(path)` (safetensors + JSON); `load(path, model)` refuses a model whose
    unembedding differs from the one the lens was fitted on.
    """

    kind: ClassVar[str] = "tuned-lens"

    def __init__(
        self, model: Any, n_layers: int, hidden_dim: int, backend_hint: str | None = None
    ) -> None:
        import torch

        self.backend = _backend(model, backend_hint) if model is not None else None
        if self.backend is not None:
            names = self.backend.layer_names()
            if n_layers != len(names):
                raise ParameterError(
                    f"n_layers={n_layers} but the model has {len(names)} "
                    f"layers ({names[0]} .. {names[-1]})"
                )
            dim = self.backend.site_info(names[0]).dim
            if hidden_dim != dim:
                raise ParameterError(f"hidden_dim={hidden_dim} but {names[0]} has {dim} features")
            self.layer_names = names
            self.backend_name = self.backend.name
            self.fingerprint = unembed_fingerprint(self.backend, hidden_dim)
            self.fitted_on = ArtifactFit.of(self.backend, names[0])
        else:
            self.layer_names = [f"layer_{i}" for i in range(n_layers)]
            self.backend_name = ""
            self.fingerprint = torch.zeros(_PROBE_ROWS, _PROBE_COLS)
        self.n_layers = n_layers
        self.hidden_dim = hidden_dim
        self.weight = torch.zeros(n_layers, hidden_dim, hidden_dim)
        self.bias = torch.zeros(n_layers, hidden_dim)
        self.report: TunedLensReport | None = None

    # -- applying ------------------------------------------------------------------------------
    def translate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``h + A_layer h + b_layer`` (in float32, returned in ``h``'s dtype)."""
        a = self.weight[layer].to(h.device)
        b = self.bias[layer].to(h.device)
        x = h.float()
        return (x + x @ a.T + b).to(h.dtype)

    def predict(
        self,
        model: Any,
        tokenizer: Any,
        prompt: str | Sequence[int],
        target_token: str | int | None = None,
        backend_hint: str | None = None,
        layers: list[int] | None = None,
        top_k: int = 5,
        device: str = "cpu",
        *,
        embed: bool = False,
    ) -> LensResult:
        """The tuned lens over ``prompt`` (fields as `logit_lens`). ``embed=True`` adds the
        embedding output as a first row (``layer=-1``), read without a translator (the lens
        has none for it): that row is the logit lens of the embedding."""
        backend = _backend(model, backend_hint)
        self.check_backend(backend)
        return _lens(
            backend,
            tokenizer,
            prompt,
            target_token,
            layers,
            top_k,
            self.translate,
            "tuned_lens",
            embed,
        )

    def check_backend(self, backend: Backend) -> None:
        """Refuse (`ArtifactError`) a backend whose layers or unembedding differ from the
        model the lens was fitted on."""
        import torch

        names = backend.layer_names()
        if names != self.layer_names:
            raise ArtifactError(
                f"this tuned lens was fitted on layers {self.layer_names}; the model has {names}"
            )
        dim = backend.site_info(names[0]).dim
        if dim != self.hidden_dim:
            raise ArtifactError(
                f"this tuned lens translates {self.hidden_dim}-dimensional "
                f"residuals; {names[0]} has {dim}"
            )
        now = unembed_fingerprint(backend, self.hidden_dim)
        scale = float(self.fingerprint.abs().max()) or 1.0
        if not torch.allclose(now, self.fingerprint, rtol=1e-3, atol=1e-3 * scale):
            raise ArtifactError(
                "the model's final norm / unembedding differs from the one this tuned lens was "
                f"fitted on (fingerprint distance {float((now - self.fingerprint).abs().max()):.3g}"
                f", tolerance {1e-3 * scale:.3g}); refit the lens on this model"
            )

    # -- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        model: Any,
        tokenizer: Any,
        calibration_texts: list[str],
        backend_hint: str | None = None,
        epochs: int = 30,
        lr: float = 1e-3,
        max_len: int = 64,
        device: str = "cpu",
        *,
        held_out: float = 0.2,
        batch_size: int = 16,
        seed: int = 0,
        positions: Any = "all",
        start: str = "zero",
        patience: int | None = None,
    ) -> TunedLens:
        """Fit on ``calibration_texts`` (``held_out`` of them kept aside, seeded) and report the
        held-out KL per layer against the logit lens's in ``lens.report``. ``positions``,
        ``start`` and ``patience``: as in `fit_rows`."""
        backend = _backend(model, backend_hint)
        if not calibration_texts or isinstance(calibration_texts, str):
            raise InputError("calibration_texts must be a non-empty list of texts")
        from ..data import Dataset

        rows = Dataset.from_texts(
            list(calibration_texts), tokenizer=tokenizer, max_length=max_len
        ).ids()
        return cls.fit_rows(
            backend,
            rows,
            epochs=epochs,
            lr=lr,
            held_out=held_out,
            batch_size=batch_size,
            seed=seed,
            positions=positions,
            start=start,
            patience=patience,
        )

    @classmethod
    def fit_rows(
        cls,
        backend: Backend,
        rows: list[list[int]],
        *,
        epochs: int = 30,
        lr: float = 1e-3,
        held_out: float = 0.2,
        batch_size: int = 16,
        seed: int = 0,
        eval_rows: list[list[int]] | None = None,
        progress: Callable[[int, TunedLens], None] | None = None,
        positions: Any = "all",
        start: str = "zero",
        patience: int | None = None,
    ) -> TunedLens:
        """Fit on token-id rows (``eval_rows``, or a seeded ``held_out`` share of ``rows``, is
        the held-out set). ``progress(epoch, lens)`` is called after each epoch with a lens
        holding the translators so far (e.g. to record a held-out curve with `evaluate`).

        ``positions``: the real-token positions trained and evaluated on: "all" (default),
        "last", or indices such as ``[0, -1]`` (negative from each row's last real token);
        rows without such a position contribute nothing.

        ``start``: "zero" (every translator starts at zero, i.e. at the logit lens) or "auto":
        per layer, whichever of the zero translator and a closed-form (ridge least-squares)
        translator toward the last layer's residual has the lower KL on the stopping rows
        (the closed form only where it removes at least three quarters of the zero start's
        KL there: `_CLOSED_FORM_SHARE`; where its float64 sums would pass
        `_CLOSED_FORM_MAX_BYTES`, 2 GiB, e.g. d 4096 with 8 trained layers, every layer
        starts at zero).
        ``patience``: None trains every epoch; an int stops early: the translators are
        checked on the stopping rows as they train, each layer keeps its best translator,
        and a layer that has not improved for ``patience`` checks (one, if it started from
        the closed form) stops training (all stopped: training ends). The stopping rows (a seeded ``_STOP_SHARE`` of the training
        rows, never the held-out rows) exist only with ``start="auto"`` or ``patience``."""
        positions = _check_positions(positions)
        _check_schedule(start, patience)
        if epochs < 1 or lr <= 0 or batch_size < 1:
            raise ParameterError(
                f"need epochs >= 1, lr > 0, batch_size >= 1; got epochs="
                f"{epochs}, lr={lr}, batch_size={batch_size}"
            )
        if eval_rows is None:
            if not 0 < held_out < 1:
                raise ParameterError(
                    f"held_out is the share of texts kept for evaluation, in (0, 1); got {held_out}"
                )
            if len(rows) < 2:
                raise InputError(f"need at least 2 texts (one held out), got {len(rows)}")
            kept, held = held_out_split(len(rows), held_out, seed)
            eval_rows = [rows[i] for i in held]
            rows = [rows[i] for i in kept]
        names = backend.layer_names()
        lens = cls(backend, len(names), backend.site_info(names[0]).dim)
        rows, stop = _stop_split(backend, rows, start, patience, batch_size, positions, seed)
        train = _Batches(backend, rows, batch_size, positions)
        evals = _Batches(backend, eval_rows, batch_size, positions)
        if not train.n_tokens or not evals.n_tokens:
            raise InputError(
                f"positions={positions!r} leaves no token to "
                f"{'train' if not train.n_tokens else 'evaluate'} on; choose positions the "
                "rows have"
            )

        trainer = _Trainer(backend, lens, train, stop, lr, seed, patience)
        if start == "auto":
            trainer.start_from_least_squares()
        from ..progress import bar

        for epoch in bar(range(epochs), desc="tuned lens", unit="epoch"):
            trainer.epoch()
            if progress is not None:
                lens.weight, lens.bias = trainer.current()
                progress(epoch, lens)
            if trainer.done():
                break
        lens.weight, lens.bias = trainer.current()
        epochs_run = trainer.epochs_run
        kl_logit, kl_tuned, n_eval = lens._evaluate(evals)
        lens.backend = backend
        lens.report = TunedLensReport(
            backend=backend.name,
            layers=names,
            kl_logit=kl_logit,
            kl_tuned=kl_tuned,
            n_train_tokens=train.n_tokens,
            n_eval_tokens=n_eval,
            epochs=epochs_run,
            positions=positions if isinstance(positions, str) else list(positions),
        )
        return lens

    def evaluate(
        self, rows: list[list[int]], batch_size: int = 16, positions: Any = "all"
    ) -> tuple[list[float], list[float]]:
        """Mean KL(final ‖ lens) per layer over the real tokens of ``rows`` (token-id lists) at
        ``positions`` (as in `fit_rows`): (logit lens, tuned lens)."""
        if self.backend is None:
            raise ArtifactError("this tuned lens has no model: load it with load(path, model)")
        batches = _Batches(self.backend, rows, batch_size, _check_positions(positions))
        kl_logit, kl_tuned, _ = self._evaluate(batches)
        return kl_logit, kl_tuned

    def _evaluate(self, batches: _Batches) -> tuple[list[float], list[float], int]:
        import torch

        assert self.backend is not None
        # A layer whose translator is zero is read exactly as the logit lens reads it (the
        # last layer always): its tuned KL is its logit-lens KL, computed once.
        moved = [
            i
            for i in range(self.n_layers)
            if bool(self.weight[i].any()) or bool(self.bias[i].any())
        ]
        logit = torch.zeros(self.n_layers, dtype=torch.float64)
        tuned = torch.zeros(self.n_layers, dtype=torch.float64)
        n = 0
        with torch.no_grad():
            for acts, final in batches:
                p, own = _final_terms(final)
                plain = _fused_kl(self.backend, acts, final, p, own, None, None)
                translated = plain.clone()
                if moved:
                    translated[moved] = _fused_kl(
                        self.backend,
                        [acts[i] for i in moved],
                        final,
                        p,
                        own,
                        self.weight[moved],
                        self.bias[moved],
                    )
                logit += plain.sum(-1)
                tuned += translated.sum(-1)
                n += final.shape[0]
        return (logit / n).tolist(), (tuned / n).tolist(), n

    # -- saving ----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.weight.contiguous(),
            "bias": self.bias.contiguous(),
            "unembed_fingerprint": self.fingerprint.contiguous(),
        }

    def artifact_config(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "hidden_dim": self.hidden_dim,
            "layer_names": self.layer_names,
            "backend": self.backend_name,
            "report": self.report.to_dict() if self.report is not None else None,
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> TunedLens:
        lens = cls(None, int(config["n_layers"]), int(config["hidden_dim"]))
        lens.layer_names = list(config["layer_names"])
        lens.backend_name = str(config.get("backend", ""))
        try:
            lens.weight = tensors["weight"].float()
            lens.bias = tensors["bias"].float()
            lens.fingerprint = tensors["unembed_fingerprint"].float()
        except KeyError as exc:
            raise ArtifactError(
                f"tuned-lens weights lack {exc}; the file is not a tuned lens saved by archscope"
            ) from None
        want = (lens.n_layers, lens.hidden_dim, lens.hidden_dim)
        if tuple(lens.weight.shape) != want or tuple(lens.bias.shape) != want[:2]:
            raise ArtifactError(
                f"tuned-lens weights have shapes {tuple(lens.weight.shape)} / "
                f"{tuple(lens.bias.shape)}; the config says {want}"
            )
        if config.get("report"):
            lens.report = TunedLensReport(**config["report"])
        return lens

    def check_fits(self, backend: Any) -> None:
        """The base checks (backend, site, dimension), then layers and unembedding."""
        super().check_fits(backend)
        self.check_backend(backend)

    @classmethod
    def load(
        cls, path: str | Path, backend: Any = None, backend_hint: str | None = None
    ) -> TunedLens:
        """Load a saved lens; given a model or backend, refuse it (`ArtifactError`) unless its
        layers and unembedding are those the lens was fitted on."""
        target = _backend(backend, backend_hint) if backend is not None else None
        lens = super().load(path, target)
        if target is not None:
            lens.backend = target
        return lens


#: Real tokens per optimiser step of the tuned lens.
_TOKENS_PER_STEP = 512


#: Floats of logits computed at once by the tuned lens's training and evaluation (layers x
#: tokens x vocabulary): bounds their memory whatever the vocabulary.
_LOGIT_FLOATS = 8_000_000


def _layer_groups(n_layers: int, n_tokens: int, vocab: int) -> list[slice]:
    """Consecutive groups of layers whose logits together stay within ``_LOGIT_FLOATS``."""
    per = max(1, _LOGIT_FLOATS // max(1, n_tokens * vocab))
    return [slice(i, min(i + per, n_layers)) for i in range(0, n_layers, per)]


def _translated(
    acts: list[torch.Tensor],
    index: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen tokens of several layers stacked, (layers, tokens, d) in float32, and each
    translated ``h + A h + b`` (untranslated where ``weight`` is None)."""
    import torch

    x = torch.stack([h[index.to(h.device)].float() for h in acts])
    if weight is None or bias is None:
        return x, x
    weight, bias = weight.to(x.device), bias.to(x.device)
    return x, torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2)) + x


def _final_terms(final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The final distribution's probabilities ``p`` and ``sum p log p`` per token, from its
    log-probabilities ``final`` (tokens, vocabulary)."""
    p = final.exp()
    return p, (p * final).sum(-1)


def _fused_kl(
    backend: Backend,
    acts: list[torch.Tensor],
    final: torch.Tensor,
    p: torch.Tensor,
    own: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """KL(final ‖ lens) per layer and token, (layers, tokens); ``weight`` None is the logit
    lens. Computed as ``sum p log p - sum p z + logsumexp(z)`` with ``z`` the lens's logits
    (``p``, ``own``: `_final_terms` of ``final``): two passes over each layer's logits instead
    of a log-softmax and a product with the final distribution, about half the time; the
    result equals ``sum p (log p - log_softmax(z))`` up to float32 rounding (~1e-6)."""
    import torch

    every = torch.arange(final.shape[0])
    dtype = acts[0].dtype
    out = []
    for group in _layer_groups(len(acts), final.shape[0], final.shape[-1]):
        _, x = _translated(
            acts[group],
            every,
            None if weight is None else weight[group],
            None if bias is None else bias[group],
        )
        z = backend.unembed(x.to(dtype)).float()
        out.append(own - torch.einsum("lnv,nv->ln", z, p) + _logsumexp_(z))
    return torch.cat(out)


def _logsumexp_(z: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.logsumexp(z, -1)`` computed in place in ``z`` (overwritten): no temporary
    of ``z``'s size, about half the time over a whole vocabulary. An infinite maximum is
    shifted by zero instead, as torch does. ``top``: ``z.amax(-1)`` where the caller has it
    already (not modified)."""
    m = z.amax(-1, keepdim=True) if top is None else top.unsqueeze(-1).clone()
    m.masked_fill_(m.abs() == float("inf"), 0.0)
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


def _lens_grads(
    backend: Backend,
    acts: list[torch.Tensor],
    target: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    layers: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the training loss (the sum over ``layers`` of the mean KL(final ‖ tuned
    lens) over the ``index`` tokens) with respect to ``weight`` and ``bias`` (zero for the
    other layers).

    The gradient of the KL with respect to the lens's logits is ``softmax(logits) - final``;
    it is formed directly and sent back through the unembedding, instead of differentiating
    the log-softmax and the KL over the whole vocabulary."""
    import torch

    gw = torch.zeros_like(weight)
    gb = torch.zeros_like(bias)
    p = target[index]
    dtype = acts[0].dtype
    n = len(index)
    for group in _layer_groups(len(layers), n, target.shape[-1]):
        chosen = layers[group]
        w, b = weight[chosen].detach(), bias[chosen].detach()
        w.requires_grad_(True)
        b.requires_grad_(True)
        with torch.enable_grad():
            _, x = _translated([acts[i] for i in chosen], index, w, b)
            logits = backend.unembed(x.to(dtype))
            with torch.no_grad():
                grad = torch.softmax(logits.float(), -1).sub_(p)  # the mean's 1/n: below
            dw, db = torch.autograd.grad(logits, [w, b], grad_outputs=grad.to(logits.dtype))
        gw[chosen], gb[chosen] = dw / n, db / n
    return gw, gb


def _check_schedule(start: str, patience: int | None) -> None:
    if start not in ("zero", "auto"):
        raise ParameterError(
            f"start={start!r}: use 'zero' (the logit lens) or 'auto' (per layer the better "
            "of zero and a least-squares translator)"
        )
    if patience is not None and (
        isinstance(patience, bool) or not isinstance(patience, int) or patience < 1
    ):
        raise ParameterError(
            f"patience={patience!r}: give the number of checks without improvement after "
            "which a layer stops training (an int >= 1), or None to train every epoch"
        )


def _stop_split(
    backend: Backend,
    rows: list[list[int]],
    start: str,
    patience: int | None,
    batch_size: int,
    positions: Any,
    seed: int,
) -> tuple[list[list[int]], _Batches | None]:
    """The training rows and the stop rows (a seeded ``_STOP_SHARE`` of them) where
    ``start="auto"`` or ``patience`` need them, else all rows and None."""
    if start == "zero" and patience is None:
        return rows, None
    if len(rows) < 2:
        raise InputError(
            f"start={start!r} / patience={patience!r} keep some training texts aside to choose "
            f"and stop on; {len(rows)} training text is too few: give more texts, or use "
            "start='zero', patience=None"
        )
    fit_idx, stop_idx = held_out_split(len(rows), _STOP_SHARE, seed + 1)
    stop = _Batches(backend, [rows[i] for i in stop_idx], batch_size, positions)
    if not stop.n_tokens:
        raise InputError(
            f"positions={positions!r} leaves no token in the texts kept aside to choose and "
            "stop on; choose positions the rows have"
        )
    return [rows[i] for i in fit_idx], stop


#: Share of the training texts kept aside to choose the start and stop on (``start="auto"``
#: or ``patience``); never the held-out texts the report is measured on.
_STOP_SHARE = 0.15
#: Ridge penalties tried for the closed-form start, relative to the mean squared feature.
_RIDGE = (1e-3, 1e-2, 1e-1)
#: The closed-form start is taken only where its stop KL is at most this share of the zero
#: start's (it already removes most of the logit lens's KL). Where it removed less, Adam from
#: zero ended lower than Adam from the closed form: measured on the zoo's transformer and
#: Mamba (the closed form removes 46% and 16-58% of the KL there), against the zoo's LSTM and
#: a random 6-layer GPT-2 (99% and 90-95%), where the closed-form start ends lower.
_CLOSED_FORM_SHARE = 0.25
#: The closed-form start keeps one float64 (d+1) × (d+1) Gram matrix and one (d+1) × d
#: cross product per trained layer: above this many bytes of them (e.g. d 4096 with 8 or
#: more trained layers) ``start="auto"`` leaves every layer at the zero start.
_CLOSED_FORM_MAX_BYTES = 2 * 2**30


def _closed_form_bytes(n_layers: int, d: int) -> int:
    """Bytes of the float64 sums `_closed_form_translators` keeps for ``n_layers`` layers."""
    return n_layers * (d + 1) * (2 * d + 1) * 8


def _closed_form_translators(
    batches: _Batches, layers: list[int], penalties: Sequence[float]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per penalty ``r``, the ridge least-squares translator of each of ``layers`` toward the
    last layer's residual over the tokens of ``batches``: ``A``, ``b`` minimising the mean of
    ``|h + A h + b - h_last|^2`` plus ``r * s * |A|^2`` (``s`` the layer's mean squared
    feature; ``b`` unpenalised). Returns (weights, biases): per penalty (len(layers), d, d)
    and (len(layers), d) float32."""
    import torch

    # per layer, the sums of [h, 1]^T [h, 1] and [h, 1]^T (h_last - h), added in place one
    # layer of one batch at a time (`_closed_form_bytes` of them in all)
    grams: list[torch.Tensor] = []
    crosses: list[torch.Tensor] = []
    n = 0
    for acts, _ in batches:
        last = acts[-1].double()
        ones = torch.ones(last.shape[0], 1, dtype=torch.float64, device=last.device)
        for j, i in enumerate(layers):
            a = torch.cat([acts[i].double(), ones], 1)
            g, c = a.T @ a, a.T @ (last - a[:, :-1])
            if j == len(grams):
                grams.append(g)
                crosses.append(c)
            else:
                grams[j] += g
                crosses[j] += c
        n += last.shape[0]
    weights: list[list[torch.Tensor]] = [[] for _ in penalties]
    biases: list[list[torch.Tensor]] = [[] for _ in penalties]
    for gram, cross in zip(grams, crosses, strict=True):
        gram /= n
        cross /= n
        d = gram.shape[-1] - 1
        diagonal = gram.diagonal()[:d]  # a view: the penalty is added in place (not the bias)
        features = diagonal.clone()
        scale = features.mean()  # mean squared feature
        for k, penalty in enumerate(penalties):
            diagonal.copy_(features).add_(penalty * scale)
            solution = torch.linalg.solve(gram, cross)
            weights[k].append(solution[:d].T.float().cpu())
            biases[k].append(solution[d].float().cpu())
    return [torch.stack(w) for w in weights], [torch.stack(b) for b in biases]


class _Trainer:
    """Adam on the translators of every layer but the last (which keeps the identity: its
    logit lens is the model's output), optionally choosing the start and stopping early on
    the ``stop`` rows."""

    def __init__(
        self,
        backend: Backend,
        lens: TunedLens,
        train: _Batches,
        stop: _Batches | None,
        lr: float,
        seed: int,
        patience: int | None,
    ) -> None:
        import torch

        self.backend = backend
        self.train = train
        self.stop = stop
        self.patience = patience
        self.weight = lens.weight.clone().requires_grad_(True)
        self.bias = lens.bias.clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.weight, self.bias], lr=lr)
        self.g = torch.Generator().manual_seed(seed)
        self.active = list(range(lens.n_layers - 1))
        self.epochs_run = 0
        self.best: tuple[torch.Tensor, torch.Tensor] | None = None
        self.best_kl: torch.Tensor | None = None
        self.waited = [0] * lens.n_layers
        # checks without improvement a layer may wait (one after a closed-form start)
        self.allowed = [patience or 0] * lens.n_layers
        self.since_check = 0
        if patience is not None:
            assert stop is not None
            self.best = (self.weight.detach().clone(), self.bias.detach().clone())
            self.best_kl = self._stop_kl(self.active, self.weight, self.bias)

    def _stop_kl(self, layers: list[int], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Mean KL on the stop rows of ``layers`` translated by ``weight``/``bias`` (indexed
        by layer, like the lens's): (n_layers,) float64, +inf for the other layers."""
        import torch

        out = torch.full((self.weight.shape[0],), float("inf"), dtype=torch.float64)
        out[layers] = self._stop_kl_of(layers, weight[layers], bias[layers])
        return out

    def _stop_kl_of(
        self, layers: list[int], weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Mean KL on the stop rows of each ``(layers[k], weight[k], bias[k])``: (len(layers),)
        float64. A layer may repeat (several candidate translators of one layer)."""
        import torch

        assert self.stop is not None
        total = torch.zeros(len(layers), dtype=torch.float64)
        n = 0
        with torch.no_grad():
            for acts, final in self.stop:
                p, own = self.stop.terms(final)
                total += _fused_kl(
                    self.backend,
                    [acts[i] for i in layers],
                    final,
                    p,
                    own,
                    weight.detach(),
                    bias.detach(),
                ).sum(-1)
                n += final.shape[0]
        return total / max(n, 1)

    def _stop_error(
        self, layers: list[int], weights: list[torch.Tensor], biases: list[torch.Tensor]
    ) -> torch.Tensor:
        """Mean squared distance of each candidate's translation to the last layer's residual
        over the stop rows: (candidates, len(layers))."""
        import torch

        assert self.stop is not None
        total = torch.zeros(len(weights), len(layers), dtype=torch.float64)
        n = 0
        for acts, final in self.stop:
            every = torch.arange(final.shape[0])
            last = acts[-1].float()
            for c, (w, b) in enumerate(zip(weights, biases, strict=True)):
                _, x = _translated([acts[i] for i in layers], every, w, b)
                total[c] += (x - last.to(x.device)).pow(2).sum((1, 2)).double().cpu()
            n += final.shape[0]
        return total / max(n, 1)

    def start_from_least_squares(self) -> None:
        """Per trained layer, the ridge least-squares translator toward the last layer's
        residual (``h + A h + b ≈ h_last`` on the training tokens) for each penalty in
        ``_RIDGE``, the penalty chosen by the squared error on the stop rows; the layer starts
        from it where its KL on the stop rows is below `_CLOSED_FORM_SHARE` of the zero
        start's, else from zero."""
        import torch

        layers = self.active
        if not layers or (
            _closed_form_bytes(len(layers), self.weight.shape[-1]) > _CLOSED_FORM_MAX_BYTES
        ):
            return  # nothing to train, or sums too large to keep: the zero start stays
        cand_w, cand_b = _closed_form_translators(self.train, layers, _RIDGE)
        zero_kl = (
            self.best_kl.clone()
            if self.best_kl is not None  # the zero start's, measured already
            else self._stop_kl(layers, self.weight, self.bias)
        )
        chosen_w = self.weight.detach().clone()
        chosen_b = self.bias.detach().clone()
        # each layer's penalty: the lowest squared error on the stop rows (no pass over the
        # vocabulary); then that translator's KL there, all layers in one pass
        error = self._stop_error(layers, cand_w, cand_b)  # (penalties, layers)
        pick = error.argmin(0)
        w = torch.stack([cand_w[int(c)][j] for j, c in enumerate(pick)])
        b = torch.stack([cand_b[int(c)][j] for j, c in enumerate(pick)])
        kl = self._stop_kl_of(layers, w, b)
        # a layer whose closed form is not below the bar starts at zero
        closed = (kl < zero_kl[layers] * _CLOSED_FORM_SHARE).tolist()
        best_kl = zero_kl.clone()
        for j, i in enumerate(layers):
            if closed[j]:
                chosen_w[i], chosen_b[i] = w[j], b[j]
                best_kl[i] = kl[j]
                # already near its optimum: a step of Adam that does not improve it means the
                # steps are larger than what is left to gain; one check decides
                self.allowed[i] = min(self.allowed[i], 1)
        with torch.no_grad():
            self.weight.copy_(chosen_w)
            self.bias.copy_(chosen_b)
        if self.best is not None:
            self.best = (chosen_w.clone(), chosen_b.clone())
            self.best_kl = best_kl

    def epoch(self) -> None:
        import torch

        for acts, final in self.train:
            if not self.active:
                break
            target, _ = self.train.terms(final)  # the final distribution
            # Minibatches of real tokens, shuffled across the rows of the batch.
            perm = torch.randperm(final.shape[0], generator=self.g)
            for chunk in perm.split(_TOKENS_PER_STEP):
                if not self.active:
                    break
                # Gradients of the translators only: the model's .grad stay untouched.
                self.weight.grad, self.bias.grad = _lens_grads(
                    self.backend, acts, target, chunk, self.weight, self.bias, self.active
                )
                self.opt.step()
                self.since_check += len(chunk)
                self._check()
        if self.since_check:
            self._check(force=True)  # the epoch's last steps
        self.epochs_run += 1

    def _check(self, force: bool = False) -> None:
        """With ``patience``: once as many tokens have been trained on as the stop rows hold
        (so that checking costs at most about half the training), the stop KL of the
        training layers; a better one is kept, a layer without improvement for ``patience``
        checks stops."""
        if self.patience is None:
            return
        assert self.stop is not None and self.best is not None and self.best_kl is not None
        if self.since_check < self.stop.n_tokens and not force:
            return
        self.since_check = 0
        kl = self._stop_kl(self.active, self.weight, self.bias)
        for i in list(self.active):
            if bool(kl[i] < self.best_kl[i]):
                self.best_kl[i] = kl[i]
                self.best[0][i] = self.weight.detach()[i]
                self.best[1][i] = self.bias.detach()[i]
                self.waited[i] = 0
            else:
                self.waited[i] += 1
                if self.waited[i] >= self.allowed[i]:
                    self.active.remove(i)

    def done(self) -> bool:
        return not self.active

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The translators: each layer's best on the stop rows with ``patience``, else the
        latest."""
        if self.best is not None:
            return self.best[0].clone(), self.best[1].clone()
        return self.weight.detach().clone(), self.bias.detach().clone()


class _Batches:
    """Real-token activations of every layer plus the final log-probabilities, per batch of
    rows; kept in memory when small, else recomputed on each pass."""

    #: Cache when the final log-probabilities of all tokens fit in this many floats.
    CACHE_FLOATS = 50_000_000

    def __init__(
        self, backend: Backend, rows: list[list[int]], batch_size: int, positions: Any = "all"
    ) -> None:
        import torch

        self.backend = backend
        self.rows = rows
        self.batch_size = batch_size
        self.positions = positions
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        doc = torch.arange(len(rows)).repeat_interleave(lengths)
        position = torch.cat([torch.arange(len(r)) for r in rows]) if rows else doc
        self.n_tokens = int(_real_positions(positions, lengths, position, doc).sum())
        vocab = backend.site_info("logits").dim
        self.cache: list[tuple[list[torch.Tensor], torch.Tensor]] | None = None
        if self.n_tokens * vocab <= self.CACHE_FLOATS:
            self.cache = list(self._compute())
        # `_final_terms` of each cached batch, kept where they fit in half the cache's budget
        # (the stop rows are checked several times, the training rows read every epoch)
        self._terms: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            {}
            if self.cache is not None and 2 * self.n_tokens * vocab <= self.CACHE_FLOATS
            else None
        )

    def terms(self, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_final_terms` of ``final`` (one of this object's batches), computed once per
        cached batch."""
        if self._terms is None:
            return _final_terms(final)
        key = id(final)
        if key not in self._terms:
            self._terms[key] = _final_terms(final)
        return self._terms[key]

    def _compute(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        import torch

        from ..collect import iter_collect

        names = self.backend.layer_names()
        device = self.backend.device
        lengths = torch.tensor([len(r) for r in self.rows], dtype=torch.long)
        for part in iter_collect(
            self.backend, self.rows, [*names, "logits"], pool=None, batch_size=self.batch_size
        ):
            assert part.position is not None
            keep = _real_positions(self.positions, lengths, part.position, part.doc)
            if not bool(keep.any()):
                continue
            if bool(keep.all()):  # every real token (positions="all"): no copy to select them
                acts = [part[n].to(device) for n in names]
                logits = part["logits"]
            else:
                acts = [part[n][keep].to(device) for n in names]
                logits = part["logits"][keep]
            final = torch.log_softmax(logits.to(device).float(), -1)
            yield acts, final

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        if self.cache is not None:
            return iter(self.cache)
        return self._compute()


# -- the registered method --------------------------------------------------------------------------


@method(
    "tuned-lens",
    "Tuned lens (Belrose et al. 2023): per-layer affine translators trained on the "
    "data, held-out KL per layer next to the logit lens's",
    requires={"residual", "unembed", "logits"},
    input="dataset",
    quick={"epochs": 2, "batch_size": 4},
)
def tuned_lens_method(
    backend: Any,
    data: Any,
    *,
    epochs: Annotated[int, Param(min=1, help="passes over the training texts")] = 30,
    lr: Annotated[float, Param(min=0, help="Adam learning rate")] = 1e-3,
    held_out: Annotated[
        float, Param(min=0, max=1, help="share of texts kept for the held-out KL")
    ] = 0.2,
    batch_size: Annotated[int, Param(min=1, help="texts per forward pass")] = 16,
    seed: int = 0,
    positions: Annotated[
        str,
        Param(
            help="real-token positions to train and evaluate on: all, last, or indices "
            "such as 0,-1 (negative from each text's last token)"
        ),
    ] = "all",
    start: Annotated[
        Literal["zero", "auto"],
        Param(
            help="zero: every translator starts at zero (the logit lens); auto: per layer, a "
            "ridge least-squares translator where it removes most of the KL, else zero"
        ),
    ] = "zero",
    patience: Annotated[
        int | None,
        Param(
            min=1,
            help="stop a layer after this many checks without improvement on texts kept "
            "aside from training (default: train every epoch)",
        ),
    ] = None,
) -> TunedLensReport:
    """The `tuned-lens` method: fit on the dataset's texts (a seeded ``held_out`` share kept
    aside) at ``positions`` and report the held-out KL per layer, tuned lens next to logit
    lens; ``start`` and ``patience`` as in `TunedLens.fit_rows`."""
    backend = _backend(backend)
    rows = _rows_of(data)
    lens = TunedLens.fit_rows(
        backend,
        rows,
        epochs=epochs,
        lr=lr,
        held_out=held_out,
        batch_size=batch_size,
        seed=seed,
        positions=positions,
        start=start,
        patience=patience,
    )
    assert lens.report is not None
    return lens.report


def _rows_of(data: Any) -> list[list[int]]:
    """Token-id rows (real tokens only) of anything `archscope.data.as_dataset` takes."""
    from ..data import as_dataset

    return as_dataset(data).ids()
