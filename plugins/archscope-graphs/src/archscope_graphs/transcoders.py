"""Transcoders: sparse dictionaries that read an MLP's input and write its output.

A *single-layer* transcoder reads ``layer_l.mlp_in`` and predicts ``layer_l.mlp`` (optionally
plus a linear skip ``W_skip x``); a *cross-layer* transcoder (CLT) has features read at layer
``l`` that write every MLP output from layer ``l`` on, so the reconstruction of ``layer_m.mlp``
sums the decoders of the features of all read layers ``l <= m``.

Training uses the SAE machinery of `archscope.methods.sae` (its one training loop, `fit_sae`,
and its optimiser, dead-feature bookkeeping and shuffle buffer): a `TranscoderStack` is an
`archscope.methods.sae.SAE` whose training rows are the read sites and the written sites side by
side; it encodes the first part and reproduces the second (``SAE.training_target``).

After training the stack splits into `LayerTranscoder` objects, one per read layer, each
satisfying the `archscope_graphs.Transcoder` protocol. On disk: a folder of safetensors + JSON
(`save_transcoders` / `load_transcoders`), SAELens's transcoder layout (`export_saelens` /
`import_saelens`) and circuit-tracer's per-layer transcoder files (`export_circuit_tracer` /
`import_circuit_tracer`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archscope.errors import ArtifactError, ParameterError, SiteError

#: activation name -> what it is
ACTIVATIONS: dict[str, str] = {
    "relu": "relu(pre), trained with an L1 penalty weighted by decoder norms",
    "jumprelu": "pre where pre > a learned per-feature threshold, else 0 (straight-through "
    "estimator for the threshold, L1 penalty)",
    "topk": "the k largest pre-activations of each read layer kept (relu), no penalty",
}
#: the sites a transcoder reads and writes on every backend with an MLP-like block
READ_SITE = "layer_{}.mlp_in"
WRITE_SITE = "layer_{}.mlp"
_FORMAT = "archscope-transcoders"
_VERSION = 1


@dataclass
class TranscoderConfig:
    """What a transcoder set is: ``layers`` (the read layers, in order), ``d_in`` / ``d_out``
    (the read and written sites' dimensions), ``n_features`` per read layer, ``activation``
    (relu, jumprelu, topk; `ACTIVATIONS`), ``cross_layer`` (features write every later layer
    too), ``skip`` (a linear skip ``W_skip x`` per written layer), ``k`` (TopK), ``sparsity``
    (the L1 coefficient; unused by TopK), ``bandwidth`` (JumpReLU's straight-through window),
    ``read_site`` / ``write_site`` (site names with ``{}`` for the layer index)."""

    layers: list[int]
    d_in: int
    d_out: int
    n_features: int
    activation: str = "relu"
    cross_layer: bool = False
    skip: bool = False
    k: int = 16
    sparsity: float = 0.03
    bandwidth: float = 0.05
    initial_threshold: float = 0.01
    read_site: str = READ_SITE
    write_site: str = WRITE_SITE
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [int(v) for v in self.layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ParameterError(
                f"TranscoderConfig.layers must be distinct layer indices, got {self.layers!r}"
            )
        self.layers = sorted(self.layers)
        for name in ("d_in", "d_out", "n_features", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(
                    f"TranscoderConfig.{name} must be an integer >= 1, got {value!r}"
                )
        if self.activation not in ACTIVATIONS:
            raise ParameterError(
                f"unknown transcoder activation {self.activation!r}; valid: "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.activation == "topk" and self.k > self.n_features:
            raise ParameterError(
                f"TopK transcoder with k={self.k} but only {self.n_features} features per "
                f"layer: give k <= {self.n_features}"
            )
        for name in ("sparsity", "bandwidth", "initial_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ParameterError(
                    f"TranscoderConfig.{name} must be a finite number >= 0, got {value!r}"
                )
        for name in ("read_site", "write_site"):
            if "{}" not in getattr(self, name):
                raise ParameterError(
                    f"TranscoderConfig.{name} must contain '{{}}' for the layer index "
                    f"(e.g. {READ_SITE!r}), got {getattr(self, name)!r}"
                )

    def writes(self, layer: int) -> list[int]:
        """The layers whose MLP output the features read at ``layer`` write."""
        return [m for m in self.layers if m >= layer] if self.cross_layer else [layer]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscoderConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def _jump(pre: torch.Tensor, log_threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(pre, log_threshold, bandwidth)  # type: ignore[no-any-return]


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > θ)`` with θ = exp(log_threshold); the threshold's gradient is the
    straight-through estimate of Rajamanoharan et al. (2024): -(θ/ε)·K((pre-θ)/ε) with a
    rectangle kernel K of width ε (the bandwidth), times θ for the log parametrisation."""

    @staticmethod
    def forward(
        ctx: Any, pre: torch.Tensor, log_threshold: torch.Tensor, bandwidth: float
    ) -> torch.Tensor:
        theta = log_threshold.exp()
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        (grad,) = grads
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta)
        window = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        g_theta = -(theta / eps) * window * grad
        g_log = (g_theta.reshape(-1, theta.shape[-1]).sum(0) * theta).reshape(theta.shape)
        return grad_pre, g_log, None


def _pow2(mean_sq: float) -> float:
    from archscope.methods.sae import power_of_two_scale

    return power_of_two_scale(mean_sq)


class TranscoderStack(nn.Module):
    """Every read layer of a transcoder set in one module, the shape `fit_sae` trains.

    Parameters (normalised space; ``L`` read layers, ``f`` features each, ``n = L·f``):
    ``W_enc`` (L·d_in, n), block-diagonal (layer l's features read layer l's input only);
    ``b_enc`` (n); ``W_dec`` (n, L·d_out), block (l, m) nonzero only where layer l's features
    write layer m; ``b_dec`` (L·d_out); ``W_skip`` (L, d_out, d_in) with a skip; JumpReLU's
    ``log_threshold`` (n). Blocks that must stay zero are masked in the forward pass, so they
    get no gradient. Inputs of layer l are multiplied by ``in_scale[l]`` and outputs by
    ``out_scale[l]`` (powers of two that bring mean squared norms near 1) before training.
    Training rows are ``[x_l for l in layers] + [y_m for m in layers]`` in normalised space."""

    sae_type = "transcoder"
    kind = "transcoder"
    enc_mask: torch.Tensor
    dec_mask: torch.Tensor
    in_scale: torch.Tensor
    out_scale: torch.Tensor
    input_scale: torch.Tensor
    log_threshold: nn.Parameter
    unit_decoder = False
    has_biases = True
    penalised = True

    def __init__(self, config: TranscoderConfig, seed: int = 0) -> None:
        super().__init__()
        self.tc = config
        n_layers, f = len(config.layers), config.n_features
        d_in, d_out = config.d_in, config.d_out
        n = n_layers * f
        gen = torch.Generator().manual_seed(int(seed))
        enc_mask = torch.zeros(n_layers * d_in, n)
        dec_mask = torch.zeros(n, n_layers * d_out)
        for i, layer in enumerate(config.layers):
            enc_mask[i * d_in : (i + 1) * d_in, i * f : (i + 1) * f] = 1
            for m in config.writes(layer):
                j = config.layers.index(m)
                dec_mask[i * f : (i + 1) * f, j * d_out : (j + 1) * d_out] = 1
        self.register_buffer("enc_mask", enc_mask, persistent=False)
        self.register_buffer("dec_mask", dec_mask, persistent=False)
        dec = torch.randn(n, n_layers * d_out, generator=gen) * dec_mask
        dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12) * 0.1
        self.W_dec = nn.Parameter(dec)
        enc = torch.randn(n_layers * d_in, n, generator=gen) * enc_mask
        self.W_enc = nn.Parameter(enc / enc.norm(dim=0, keepdim=True).clamp_min(1e-12))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(n_layers * d_out))
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_out, d_in)) if config.skip else None
        if config.activation == "jumprelu":
            start = math.log(max(config.initial_threshold, 1e-8))
            self.log_threshold = nn.Parameter(torch.full((n,), start))
        self.register_buffer("in_scale", torch.ones(n_layers))
        self.register_buffer("out_scale", torch.ones(n_layers))
        # what `fit_sae` and its trainer read from an SAE
        self.register_buffer("input_scale", torch.ones(()))
        from archscope.methods.sae import SAEConfig

        self.cfg = SAEConfig(
            input_dim=n_layers * (d_in + d_out),
            n_features=n,
            sparsity=0.0 if config.activation == "topk" else float(config.sparsity),
            sae_type="dense",
            seed=int(seed),
        )
        self.last_metrics: dict[str, float] = {}
        self.fitted_on: Any = None
        self.site: str | None = None

    # -- what the SAE trainer uses -------------------------------------------------------------
    @property
    def input_dim(self) -> int:
        return int(self.cfg.input_dim)

    @property
    def n_features(self) -> int:
        return int(self.cfg.n_features)

    def _split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cut = len(self.tc.layers) * self.tc.d_in
        return rows[..., :cut], rows[..., cut:]

    def pre_activations(self, rows: torch.Tensor) -> torch.Tensor:
        x, _ = self._split(rows)
        return x @ (self.W_enc * self.enc_mask) + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        act = self.tc.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            return _jump(pre, self.log_threshold, float(self.tc.bandwidth))
        per_layer = pre.reshape(*pre.shape[:-1], len(self.tc.layers), self.tc.n_features)
        vals, idx = per_layer.topk(self.tc.k, dim=-1)
        return torch.zeros_like(per_layer).scatter(-1, idx, vals.relu()).reshape(pre.shape)

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return z @ (self.W_dec * self.dec_mask) + self.b_dec

    def skip_normalized(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.W_skip is None:
            return None
        n_layers, d_in = len(self.tc.layers), self.tc.d_in
        xs = x.reshape(*x.shape[:-1], n_layers, d_in)
        return torch.einsum("...li,loi->...lo", xs, self.W_skip).reshape(*x.shape[:-1], -1)

    def training_target(self, rows: torch.Tensor) -> torch.Tensor:
        """The part of the written sites the features must explain: the outputs, less the skip
        term where there is one (so the loss is that of the whole prediction)."""
        x, y = self._split(rows)
        skip = self.skip_normalized(x)
        return y if skip is None else y - skip

    def normalize_decoder(self) -> None:  # pragma: no cover - unit_decoder is False
        raise NotImplementedError

    # -- the per-read-layer views ----------------------------------------------------------------
    def split(self) -> list[LayerTranscoder]:
        """One `LayerTranscoder` per read layer, weights in raw activation space (copies)."""
        tc = self.tc
        n_layers, f, d_in, d_out = len(tc.layers), tc.n_features, tc.d_in, tc.d_out
        out = []
        with torch.no_grad():
            w_enc = self.W_enc * self.enc_mask
            w_dec = self.W_dec * self.dec_mask
            for i, layer in enumerate(tc.layers):
                s_in = float(self.in_scale[i])
                rows = slice(i * f, (i + 1) * f)
                decoders = {}
                for m in tc.writes(layer):
                    j = tc.layers.index(m)
                    decoders[tc.write_site.format(m)] = (
                        w_dec[rows, j * d_out : (j + 1) * d_out] / float(self.out_scale[j])
                    ).clone()
                b_dec = self.b_dec[i * d_out : (i + 1) * d_out] / float(self.out_scale[i])
                skip = None
                if self.W_skip is not None:
                    skip = (self.W_skip[i] * s_in / float(self.out_scale[i])).clone()
                threshold = None
                if tc.activation == "jumprelu":
                    threshold = self.log_threshold[rows].exp().clone()
                out.append(
                    LayerTranscoder(
                        layer=layer,
                        W_enc=(w_enc[i * d_in : (i + 1) * d_in, rows] * s_in).clone(),
                        b_enc=self.b_enc[rows].clone(),
                        W_dec=decoders,
                        b_dec=b_dec.clone(),
                        W_skip=skip,
                        threshold=threshold,
                        activation=tc.activation,
                        k=tc.k,
                        read_site=tc.read_site.format(layer),
                    )
                )
        _ = n_layers
        return out


class LayerTranscoder(nn.Module):
    """The features read at one layer: a single-layer transcoder, or one read layer of a
    cross-layer transcoder (a CLT is a list of these). Satisfies `archscope_graphs.Transcoder`.

    Raw activation space, SAELens's orientation: ``W_enc`` (d_in, n_features), ``b_enc``,
    ``W_dec`` {written site: (n_features, d_out)}, ``b_dec`` (d_out) — the bias of the MLP
    output at this same layer, included by ``decode`` of this layer's own site only, so the
    reconstruction of ``layer_m.mlp`` is the sum of ``decode`` over the read layers ``l <= m``
    plus the skip — ``W_skip`` (d_out, d_in) of this layer's own site, ``threshold``
    (JumpReLU)."""

    def __init__(
        self,
        *,
        layer: int,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: dict[str, torch.Tensor],
        b_dec: torch.Tensor,
        W_skip: torch.Tensor | None = None,
        threshold: torch.Tensor | None = None,
        activation: str = "relu",
        k: int = 16,
        read_site: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ParameterError(
                f"unknown transcoder activation {activation!r}; valid: {', '.join(ACTIVATIONS)}"
            )
        if activation == "jumprelu" and threshold is None:
            raise ParameterError("a JumpReLU transcoder needs its per-feature thresholds")
        self.layer = int(layer)
        #: the training run's last metrics (set by `train_transcoders`)
        self.fit_metrics: dict[str, float] = {}
        self.activation = activation
        self.k = int(k)
        self.read_site = read_site or READ_SITE.format(layer)
        self.write_sites = tuple(W_dec)
        self.W_enc = nn.Parameter(W_enc.detach().clone(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.detach().clone(), requires_grad=False)
        self._dec = nn.ParameterDict(
            {
                str(i): nn.Parameter(w.detach().clone(), requires_grad=False)
                for i, w in enumerate(W_dec.values())
            }
        )
        self.b_dec = nn.Parameter(b_dec.detach().clone(), requires_grad=False)
        self.W_skip = (
            None if W_skip is None else nn.Parameter(W_skip.detach().clone(), requires_grad=False)
        )
        self.threshold = (
            None
            if threshold is None
            else nn.Parameter(threshold.detach().clone(), requires_grad=False)
        )
        d_in, f = self.W_enc.shape
        for site, w in W_dec.items():
            if tuple(w.shape) != (f, self.d_out):
                raise ArtifactError(
                    f"decoder of {site!r} has shape {tuple(w.shape)}; it must be "
                    f"(n_features={f}, d_out={self.d_out})"
                )
        if tuple(self.b_enc.shape) != (f,):
            raise ArtifactError(f"b_enc has shape {tuple(self.b_enc.shape)}; it must be ({f},)")
        if self.W_skip is not None and tuple(self.W_skip.shape) != (self.d_out, d_in):
            raise ArtifactError(
                f"W_skip has shape {tuple(self.W_skip.shape)}; it must be ({self.d_out}, {d_in})"
            )

    @property
    def n_features(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.b_dec.shape[0])

    @property
    def own_site(self) -> str:
        """The written site of this read layer (the single layer's MLP output)."""
        return self.write_sites[0]

    def _site_index(self, site: str) -> int:
        if site not in self.write_sites:
            raise SiteError(
                f"the transcoder read at {self.read_site!r} writes {list(self.write_sites)}; "
                f"it has no decoder for {site!r}"
            )
        return self.write_sites.index(site)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ParameterError(
                f"the transcoder read at {self.read_site!r} takes (..., {self.d_in}) "
                f"inputs; got {tuple(x.shape)}"
            )
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold)
        vals, idx = pre.topk(min(self.k, self.n_features), dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def decoder(self, site: str) -> torch.Tensor:
        weight: torch.Tensor = self._dec[str(self._site_index(site))]
        return weight

    def encoder(self) -> torch.Tensor:
        return self.W_enc.t()

    def decode(self, acts: torch.Tensor, site: str) -> torch.Tensor:
        out = acts.to(self.W_enc.dtype) @ self.decoder(site)
        return out + self.b_dec if site == self.own_site else out

    def skip(self, x: torch.Tensor, site: str) -> torch.Tensor | None:
        self._site_index(site)
        if self.W_skip is None or site != self.own_site:
            return None
        return x.to(self.W_skip.dtype) @ self.W_skip.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction of this layer's own MLP output from its input (single-layer use)."""
        out = self.decode(self.encode(x), self.own_site)
        sk = self.skip(x, self.own_site)
        return out if sk is None else out + sk


def reconstruct(
    transcoders: Sequence[LayerTranscoder], inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The reconstruction of every written site from the read sites' values ``inputs``
    ({read site: (..., d_in)}): features of all read layers summed into each written site,
    plus the skip terms."""
    out: dict[str, torch.Tensor] = {}
    for tc in transcoders:
        x = inputs[tc.read_site]
        z = tc.encode(x)
        for site in tc.write_sites:
            part = tc.decode(z, site)
            sk = tc.skip(x, site)
            if sk is not None:
                part = part + sk
            out[site] = out[site] + part if site in out else part
    return out


# -- training ------------------------------------------------------------------------------------
def _layers_of(backend: Any, read_site: str, write_site: str) -> list[int]:
    sites = set(backend.sites())
    layers = []
    for i in range(int(backend.n_layers)):
        if read_site.format(i) in sites and write_site.format(i) in sites:
            layers.append(i)
    return layers


def transcoder_layers(
    backend: Any, read_site: str = READ_SITE, write_site: str = WRITE_SITE
) -> list[int]:
    """The layers of ``backend`` that have both an MLP input and an MLP output site."""
    layers = _layers_of(backend, read_site, write_site)
    if not layers:
        raise SiteError(
            f"backend {backend.name!r} has no layer with both {read_site.format('i')!r} and "
            f"{write_site.format('i')!r}: transcoders need an MLP-like block; its sites "
            f"include {sorted(backend.sites())[:12]}"
        )
    return layers


@dataclass
class TranscoderMetrics:
    """How good a transcoder set is over some text. Per written site: ``explained_variance``
    (1 - SSE / total sum of squares about the mean of the MLP output); per read site: ``l0``
    (mean active features per token) and ``dead_fraction`` (features that never fired);
    ``loss``: next-token loss of the clean model, with every MLP output replaced by its
    reconstruction (computed from the replaced model's own MLP inputs), and with every MLP
    output zeroed; ``loss_recovered`` = (zero - replaced) / (zero - clean)."""

    explained_variance: dict[str, float]
    l0: dict[str, float]
    dead_fraction: dict[str, float]
    clean_loss: float
    replaced_loss: float
    zero_ablated_loss: float
    loss_recovered: float
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _activations(
    backend: Any,
    data: Any,
    sites: list[str],
    in_memory: bool,
    batch_size: int,
    tokenizer: Any,
) -> Callable[[], Iterator[dict[str, torch.Tensor]]]:
    """A function giving, per call, the activations of ``sites`` over ``data`` in chunks
    ({site: (tokens, dim)}): one chunk collected once (``in_memory``) or a fresh
    `archscope.iter_collect` pass per call (the model runs again every epoch)."""
    from archscope import collect, iter_collect

    if in_memory:
        got = collect(backend, data, sites, pool=None, batch_size=batch_size, tokenizer=tokenizer)
        held = {s: got[s] for s in sites}
        return lambda: iter([held])

    def epoch() -> Iterator[dict[str, torch.Tensor]]:
        for part in iter_collect(
            backend, data, sites, pool=None, batch_size=batch_size, tokenizer=tokenizer
        ):
            yield {s: part[s] for s in sites}

    return epoch


def _rows(chunk: dict[str, torch.Tensor], stack: TranscoderStack) -> torch.Tensor:
    """Training rows of ``stack``: its read sites then its written sites, each scaled."""
    tc = stack.tc
    xs = [
        chunk[tc.read_site.format(m)].float() * float(stack.in_scale[i])
        for i, m in enumerate(tc.layers)
    ]
    ys = [
        chunk[tc.write_site.format(m)].float() * float(stack.out_scale[i])
        for i, m in enumerate(tc.layers)
    ]
    return torch.cat(xs + ys, dim=-1)


def train_transcoders(
    backend: Any,
    data: Any,
    *,
    n_features: int = 512,
    layers: Sequence[int] | None = None,
    activation: str = "relu",
    cross_layer: bool = False,
    skip: bool = False,
    k: int = 16,
    sparsity: float = 0.03,
    epochs: int = 5,
    learning_rate: float = 1e-3,
    batch_size: int = 256,
    collect_batch_size: int = 16,
    seed: int = 0,
    tokenizer: Any = None,
    read_site: str = READ_SITE,
    write_site: str = WRITE_SITE,
    in_memory: bool = True,
    progress: bool | None = None,
) -> list[LayerTranscoder]:
    """Train transcoders on ``backend`` over ``data`` (texts with ``tokenizer``, token ids or an
    `archscope.data.Dataset`; activations come from `archscope.iter_collect`, every real
    token) and return one `LayerTranscoder` per read layer.

    Single-layer transcoders (``cross_layer=False``) are trained one layer at a time; a
    cross-layer transcoder is trained as one dictionary over all ``layers`` (its features
    write every later layer's MLP output). Both go through `archscope.methods.sae.fit_sae`.
    ``in_memory``: collect the activations once and keep them (tokens x 2 x layers x d
    floats); False streams them, running the model again for every epoch and layer.
    ``progress``: one bar over all epochs (None: only on a terminal)."""
    from archscope.methods.sae import SAEConfig, fit_sae
    from archscope.progress import bar

    if not isinstance(epochs, int) or epochs < 1:
        raise ParameterError(f"epochs must be an integer >= 1, got {epochs!r}")
    available = transcoder_layers(backend, read_site, write_site)
    chosen = list(available if layers is None else layers)
    missing = [i for i in chosen if i not in available]
    if missing:
        raise SiteError(
            f"layers {missing} of backend {backend.name!r} lack {read_site!r} or "
            f"{write_site!r}; layers with both: {available}"
        )
    d_in = int(backend.site_info(read_site.format(chosen[0])).dim)
    d_out = int(backend.site_info(write_site.format(chosen[0])).dim)
    groups = [chosen] if cross_layer else [[i] for i in chosen]
    sites = [read_site.format(i) for i in chosen] + [write_site.format(i) for i in chosen]
    chunks = _activations(backend, data, sites, in_memory, collect_batch_size, tokenizer)
    result: list[LayerTranscoder] = []
    runs = bar(total=len(groups) * epochs, desc="transcoders", unit="epoch", enabled=progress)
    try:
        for group in groups:
            config = TranscoderConfig(
                layers=group,
                d_in=d_in,
                d_out=d_out,
                n_features=n_features,
                activation=activation,
                cross_layer=cross_layer,
                skip=skip,
                k=k,
                sparsity=sparsity,
                read_site=read_site,
                write_site=write_site,
            )
            stack = TranscoderStack(config, seed=seed)
            first = next(chunks(), None)
            if first is None or not len(next(iter(first.values()))):
                raise ParameterError("train_transcoders got no tokens (empty data)")
            _initialise(stack, first)
            stack.cfg = SAEConfig.from_dict(
                {**stack.cfg.to_dict(), "learning_rate": learning_rate, "batch_size": batch_size}
            )
            source: Any
            if in_memory:
                source = _rows(first, stack)
            else:
                source = partial(_stream_rows, chunks, stack)

            def tick(epoch: int, metrics: dict[str, float]) -> None:
                runs.set_postfix(
                    l0=f"{metrics['l0']:.1f}", ev=f"{metrics['explained_variance']:.3f}"
                )
                runs.update(1)

            fit_sae(source, stack.cfg, epochs=epochs, sae=stack, progress=tick)  # type: ignore[arg-type]
            parts = stack.split()
            for part in parts:
                part.fit_metrics = dict(stack.last_metrics)
            result.extend(parts)
    finally:
        runs.close()
    return result


def _stream_rows(
    chunks: Callable[[], Iterator[dict[str, torch.Tensor]]], stack: TranscoderStack
) -> Iterator[torch.Tensor]:
    for chunk in chunks():
        yield _rows(chunk, stack)


@torch.no_grad()
def _initialise(stack: TranscoderStack, chunk: dict[str, torch.Tensor]) -> None:
    """Scales (powers of two) and the decoder bias from a chunk of activations."""
    tc = stack.tc
    for i, m in enumerate(tc.layers):
        x = chunk[tc.read_site.format(m)].float()
        y = chunk[tc.write_site.format(m)].float()
        stack.in_scale[i] = _pow2(float(x.pow(2).sum(-1).mean()))
        stack.out_scale[i] = _pow2(float(y.pow(2).sum(-1).mean()))
        d = tc.d_out
        stack.b_dec[i * d : (i + 1) * d] = y.mean(0) * stack.out_scale[i]


# -- metrics -------------------------------------------------------------------------------------
@torch.no_grad()
def transcoder_metrics(
    transcoders: Sequence[LayerTranscoder],
    backend: Any,
    data: Any,
    *,
    batch_size: int = 8,
    tokenizer: Any = None,
) -> TranscoderMetrics:
    """`TranscoderMetrics` of a transcoder set over ``data``. The replaced run swaps every
    written MLP output for its reconstruction from the read sites' values *in that same run*
    (an `archscope.Edit` on each read site records it, one on each written site replaces it),
    so later layers see the replaced model's activations, as in a replacement model."""
    from archscope import Edit, iter_collect
    from archscope.data import as_dataset, padding_for
    from archscope.methods.sae import next_token_loss

    tcs = list(transcoders)
    if not tcs:
        raise ParameterError("transcoder_metrics needs at least one transcoder")
    reads = [t.read_site for t in tcs]
    writes = sorted({s for t in tcs for s in t.write_sites}, key=_layer_key)
    sse = dict.fromkeys(writes, 0.0)
    sumsq = dict.fromkeys(writes, 0.0)
    total = {s: torch.zeros(tcs[0].d_out, dtype=torch.float64) for s in writes}
    active = dict.fromkeys(reads, 0.0)
    fired = {t.read_site: torch.zeros(t.n_features, dtype=torch.bool) for t in tcs}
    n = 0
    for part in iter_collect(
        backend, data, reads + writes, pool=None, batch_size=batch_size, tokenizer=tokenizer
    ):
        inputs = {s: part[s].float() for s in reads}
        recon = reconstruct(tcs, inputs)
        for s in writes:
            y = part[s].double()
            sse[s] += float((recon[s].double() - y).pow(2).sum())
            sumsq[s] += float(y.pow(2).sum())
            total[s] += y.sum(0)
        for t in tcs:
            z = t.encode(inputs[t.read_site])
            active[t.read_site] += float((z != 0).sum())
            fired[t.read_site] |= (z != 0).any(0).cpu()
        n += len(part)
    if n == 0:
        raise ParameterError("transcoder_metrics got no tokens")
    ev = {}
    for s in writes:
        centred = sumsq[s] - float(total[s].pow(2).sum()) / n
        ev[s] = 1.0 - sse[s] / centred if centred > 0 else float("nan")

    dataset = as_dataset(data, tokenizer)
    losses = [0.0, 0.0, 0.0]
    count = 0
    for _, batch in dataset.batches(batch_size, padding_for(backend)):
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        seen: dict[str, torch.Tensor] = {}

        def record(
            t: torch.Tensor, site: str, seen: dict[str, torch.Tensor] = seen
        ) -> torch.Tensor:
            seen[site] = t
            return t

        def replace(
            t: torch.Tensor, site: str, seen: dict[str, torch.Tensor] = seen
        ) -> torch.Tensor:
            return _site_recon(tcs, seen, site, t)

        runs = (
            [Edit.apply(s, _identity) for s in writes],
            [Edit.apply(s, partial(record, site=s)) for s in reads]
            + [Edit.apply(s, partial(replace, site=s)) for s in writes],
            [Edit.scale(s, 0.0) for s in writes],
        )
        for i, edits in enumerate(runs):
            seen.clear()
            logits = backend.run(batch, capture=["logits"], edits=edits).logits
            loss, count_i = next_token_loss(logits, ids, mask)
            losses[i] += loss
        count += count_i
    if count == 0:
        raise ParameterError("transcoder_metrics needs texts of at least two tokens")
    clean, replaced, zero = (v / count for v in losses)
    gap = zero - clean
    return TranscoderMetrics(
        explained_variance=ev,
        l0={s: v / n for s, v in active.items()},
        dead_fraction={s: float((~f).float().mean()) for s, f in fired.items()},
        clean_loss=clean,
        replaced_loss=replaced,
        zero_ablated_loss=zero,
        loss_recovered=(zero - replaced) / gap if gap != 0 else float("nan"),
        n_tokens=n,
    )


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _site_recon(
    tcs: Sequence[LayerTranscoder], seen: dict[str, torch.Tensor], site: str, like: torch.Tensor
) -> torch.Tensor:
    out = None
    for t in tcs:
        if site not in t.write_sites:
            continue
        x = seen[t.read_site].reshape((*like.shape[:-1], t.d_in))
        part = t.decode(t.encode(x), site)
        sk = t.skip(x, site)
        part = part if sk is None else part + sk
        out = part if out is None else out + part
    assert out is not None
    return out.to(like.dtype)


def _layer_key(site: str) -> tuple[int, str]:
    head = site.split(".")[0]
    digits = head.rsplit("_", 1)[-1]
    return (int(digits) if digits.isdigit() else 10**9, site)


# -- save / load ---------------------------------------------------------------------------------
def _meta(tc: LayerTranscoder) -> dict[str, Any]:
    return {
        "layer": tc.layer,
        "activation": tc.activation,
        "k": tc.k,
        "read_site": tc.read_site,
        "write_sites": list(tc.write_sites),
        "d_in": tc.d_in,
        "d_out": tc.d_out,
        "n_features": tc.n_features,
        "skip": tc.W_skip is not None,
    }


def save_transcoders(transcoders: Sequence[LayerTranscoder], path: str | Path, **info: Any) -> Path:
    """Write a transcoder set to the folder ``path``: ``transcoders.json`` (what each read
    layer is, plus ``info``) and one ``layer_<l>.safetensors`` per read layer (``W_enc``,
    ``b_enc``, ``W_dec.<site>``, ``b_dec``, ``W_skip``, ``threshold``)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for tc in transcoders:
        tensors: dict[str, torch.Tensor] = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
        for site in tc.write_sites:
            tensors[f"W_dec.{site}"] = tc.decoder(site)
        if tc.W_skip is not None:
            tensors["W_skip"] = tc.W_skip
        if tc.threshold is not None:
            tensors["threshold"] = tc.threshold
        name = f"layer_{tc.layer}.safetensors"
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / name)
        )
        entries.append({**_meta(tc), "file": name})
    doc = {"format": _FORMAT, "version": _VERSION, "transcoders": entries, "info": info}
    (folder / "transcoders.json").write_text(json.dumps(doc, indent=2) + "\n")
    return folder


def load_transcoders(path: str | Path) -> list[LayerTranscoder]:
    """Read a folder written by `save_transcoders`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    index = folder / "transcoders.json"
    if not index.is_file():
        raise ArtifactError(
            f"{folder} is not a transcoder folder (no transcoders.json); write one with "
            "save_transcoders, or read other layouts with import_saelens / import_circuit_tracer"
        )
    doc = json.loads(index.read_text())
    if doc.get("format") != _FORMAT:
        raise ArtifactError(f"{index} has format {doc.get('format')!r}, expected {_FORMAT!r}")
    out = []
    for entry in doc["transcoders"]:
        try:
            t = load_file(str(folder / entry["file"]))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"cannot read {folder / entry['file']}: {exc}") from None
        out.append(
            LayerTranscoder(
                layer=entry["layer"],
                W_enc=t["W_enc"],
                b_enc=t["b_enc"],
                W_dec={s: t[f"W_dec.{s}"] for s in entry["write_sites"]},
                b_dec=t["b_dec"],
                W_skip=t.get("W_skip"),
                threshold=t.get("threshold"),
                activation=entry["activation"],
                k=entry.get("k", 16),
                read_site=entry["read_site"],
            )
        )
    return out


# -- SAELens ------------------------------------------------------------------------------------
_SAELENS_ARCH = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
}


def _single(tc: LayerTranscoder, what: str) -> None:
    if len(tc.write_sites) != 1:
        raise ParameterError(
            f"{what} holds single-layer transcoders; the one read at {tc.read_site!r} writes "
            f"{len(tc.write_sites)} sites (a cross-layer transcoder): save it with "
            "save_transcoders instead"
        )


def export_saelens(tc: LayerTranscoder, path: str | Path, *, model_name: str | None = None) -> Path:
    """Write one single-layer transcoder in SAELens's transcoder layout: ``cfg.json``
    (``architecture`` transcoder / skip_transcoder / jumprelu_transcoder, ``d_in``, ``d_sae``,
    ``d_out``, ``metadata.hook_name`` / ``hook_name_out``) and ``sae_weights.safetensors``
    (``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_out), ``b_dec``, ``W_skip``
    (d_out, d_in), ``threshold``). TopK and JumpReLU-with-skip transcoders have no SAELens
    architecture and are refused."""
    from safetensors.torch import save_file

    _single(tc, "SAELens's transcoder layout")
    arch = _SAELENS_ARCH.get((tc.activation, tc.W_skip is not None))
    if arch is None:
        raise ParameterError(
            f"SAELens has no transcoder architecture for a {tc.activation} transcoder "
            f"{'with' if tc.W_skip is not None else 'without'} a skip; it has "
            "transcoder (relu), skip_transcoder (relu + skip), jumprelu_transcoder. "
            "Use save_transcoders for this one."
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": tc.W_enc,
        "b_enc": tc.b_enc,
        "W_dec": tc.decoder(tc.own_site),
        "b_dec": tc.b_dec,
    }
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip
    if tc.threshold is not None:
        tensors["threshold"] = tc.threshold
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(folder / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": arch,
        "d_in": tc.d_in,
        "d_sae": tc.n_features,
        "d_out": tc.d_out,
        "dtype": str(tc.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": tc.read_site,
            "hook_name_out": tc.own_site,
        },
        "archscope_layer": tc.layer,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def import_saelens(path: str | Path, layer: int | None = None) -> LayerTranscoder:
    """Read a transcoder in SAELens's layout (architectures transcoder, skip_transcoder,
    jumprelu_transcoder). ``layer`` defaults to the one recorded or parsed from the hook name."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_file, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ArtifactError(
            f"{folder} is not an SAELens folder (it needs cfg.json and sae_weights.safetensors)"
        )
    cfg = json.loads(cfg_file.read_text())
    arch = cfg.get("architecture")
    known = {v: k for k, v in _SAELENS_ARCH.items()}
    if arch not in known:
        raise ArtifactError(
            f"SAELens architecture {arch!r} is not a transcoder; readable: {', '.join(known)}"
        )
    t = load_file(str(weights))
    meta = cfg.get("metadata") or {}
    hook_in = meta.get("hook_name", cfg.get("hook_name"))
    hook_out = meta.get("hook_name_out", cfg.get("hook_name_out"))
    if layer is None:
        layer = cfg.get("archscope_layer", _layer_key(str(hook_in or ""))[0])
        if layer == 10**9:
            layer = 0
    activation, _ = known[arch]
    return LayerTranscoder(
        layer=int(layer),
        W_enc=t["W_enc"],
        b_enc=t["b_enc"],
        W_dec={hook_out or WRITE_SITE.format(layer): t["W_dec"]},
        b_dec=t["b_dec"],
        W_skip=t.get("W_skip"),
        threshold=t.get("threshold"),
        activation=activation,
        read_site=hook_in or READ_SITE.format(layer),
    )


# -- circuit-tracer -----------------------------------------------------------------------------
def export_circuit_tracer(transcoders: Sequence[LayerTranscoder], path: str | Path) -> list[Path]:
    """Write single-layer transcoders as circuit-tracer's per-layer files
    ``layer_<l>.safetensors``, the layout of its ``SingleLayerTranscoder.to_safetensors`` and
    ``load_relu_transcoder`` (circuit-tracer 0.5): ``W_enc`` (d_sae, d_model), ``W_dec``
    (d_sae, d_model), ``b_enc``, ``b_dec``, optionally ``W_skip`` (d_model, d_model, applied as
    ``x @ W_skip.T``) and, for JumpReLU, ``activation_function.threshold``. circuit-tracer has
    one ``d_model`` for input and output and ReLU / JumpReLU activations: other transcoders are
    refused."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for tc in transcoders:
        _single(tc, "circuit-tracer's transcoder files")
        if tc.activation == "topk":
            raise ParameterError(
                "circuit-tracer reads ReLU and JumpReLU transcoders, not TopK; save this one "
                "with save_transcoders"
            )
        if tc.d_in != tc.d_out:
            raise ParameterError(
                f"circuit-tracer's transcoders read and write d_model; this one reads "
                f"{tc.d_in} and writes {tc.d_out} dimensions"
            )
        tensors = {
            "W_enc": tc.W_enc.t(),
            "b_enc": tc.b_enc,
            "W_dec": tc.decoder(tc.own_site),
            "b_dec": tc.b_dec,
        }
        if tc.W_skip is not None:
            tensors["W_skip"] = tc.W_skip
        if tc.threshold is not None:
            tensors["activation_function.threshold"] = tc.threshold
        file = folder / f"layer_{tc.layer}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(file))
        written.append(file)
    return written


def import_circuit_tracer(path: str | Path, layer: int) -> LayerTranscoder:
    """Read one of circuit-tracer's per-layer transcoder files (as `export_circuit_tracer`
    writes them; the threshold under ``activation_function.threshold`` or ``threshold``).
    Files of circuit-tracer's first releases, whose ``W_dec`` was stored (d_model, d_sae), are
    recognised by that shape where d_model differs from d_sae."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read circuit-tracer transcoder {path}: {exc}") from None
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in t]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}; it holds {sorted(t)}")
    f, d_out = int(t["b_enc"].shape[0]), int(t["b_dec"].shape[0])
    w_enc = t["W_enc"]
    if tuple(w_enc.shape) != (f, d_out):
        raise ArtifactError(
            f"{path}: W_enc has shape {tuple(w_enc.shape)}; circuit-tracer stores "
            f"(d_sae={f}, d_model={d_out})"
        )
    w_dec = t["W_dec"]
    if tuple(w_dec.shape) == (d_out, f) and d_out != f:
        w_dec = w_dec.t()
    threshold = t.get("activation_function.threshold", t.get("threshold"))
    return LayerTranscoder(
        layer=layer,
        W_enc=w_enc.t(),
        b_enc=t["b_enc"],
        W_dec={WRITE_SITE.format(layer): w_dec},
        b_dec=t["b_dec"],
        W_skip=t.get("W_skip"),
        threshold=threshold,
        activation="jumprelu" if threshold is not None else "relu",
    )


__all__ = [
    "ACTIVATIONS",
    "LayerTranscoder",
    "TranscoderConfig",
    "TranscoderMetrics",
    "TranscoderStack",
    "export_circuit_tracer",
    "export_saelens",
    "import_circuit_tracer",
    "import_saelens",
    "load_transcoders",
    "reconstruct",
    "save_transcoders",
    "train_transcoders",
    "transcoder_layers",
    "transcoder_metrics",
]
