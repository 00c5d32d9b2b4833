"""The sparse autoencoders themselves: their configuration, their parameters (named and shaped
as in SAELens so SAEs move between the libraries unchanged) and how each one encodes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ...artifacts import Artifact
from ...errors import ArtifactError, ParameterError
from ._options import SAEOptions

#: canonical sae_type -> what it is (for messages and `archscope info`)
SAE_TYPES: dict[str, str] = {
    "dense": "ReLU encoder, linear decoder, L1 penalty weighted by decoder row norms",
    "rank1": "rank-1 factored atoms outer(v_i, w_i): relu(<w_i, x>) times v_i, no biases",
    "topk": "the k largest pre-activations of each input kept (unit-norm decoder rows, AuxK)",
    "batchtopk": "the k * batch largest pre-activations of a batch kept; a threshold at inference",
}
_ALIASES = {
    "standard": "dense",
    "relu": "dense",
    "rank1_factored": "rank1",
    "factored": "rank1",
    "top_k": "topk",
    "batch_topk": "batchtopk",
}


def canonical_sae_type(sae_type: str) -> str:
    """The canonical name of ``sae_type`` (aliases such as ``standard`` accepted)."""
    name = str(sae_type).lower()
    name = _ALIASES.get(name, name)
    if name not in SAE_TYPES:
        raise ParameterError(
            f"unknown sae_type {sae_type!r}; valid types: {', '.join(SAE_TYPES)} "
            f"(aliases: {', '.join(sorted(_ALIASES))}). Pass one of them in SAEConfig.sae_type."
        )
    return name


@dataclass
class SAEConfig:
    """Hyper-parameters of a sparse autoencoder (the first six fields are those of 0.2; the
    training defaults are the ``sae`` method's, `SAEOptions`; ``sae_type`` stays "dense", 0.2's
    default, so ``build_sae(SAEConfig(d, n))`` builds the `DenseSAE` it built in 0.2).

    ``sparsity`` is the L1 coefficient of the dense and rank-1 SAEs; ``k`` the number of
    active features per input of the TopK SAE (the mean per input for BatchTopK). Inputs are
    multiplied by a power of two that brings their mean squared norm near 1 when
    ``normalize`` is on (a power of two so that folding it into the weights is exact).
    ``dead_after``: inputs seen without firing before a feature counts as dead (None: 16 x
    n_features, at least 4 batches); ``aux_k`` / ``aux_coefficient``: the AuxK loss that
    trains dead features of the TopK variants on the residual (None: input_dim // 2).
    """

    input_dim: int
    n_features: int
    sparsity: float = SAEOptions.sparsity
    sae_type: str = "dense"
    learning_rate: float = SAEOptions.learning_rate
    batch_size: int = SAEOptions.batch_size
    k: int = SAEOptions.k
    normalize: bool = True
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32
    dead_after: int | None = None
    buffer_size: int = 65536
    threshold_lr: float = 0.01
    seed: int = SAEOptions.seed

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that cannot train (a `ParameterError` naming the field, the value
        and what is valid): sizes below 1, a learning rate that is not a finite positive
        number, a negative or non-finite sparsity, and ``k`` above ``n_features`` for the
        TopK variants."""
        for name in ("input_dim", "n_features", "batch_size", "k", "buffer_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(f"SAEConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("learning_rate", "threshold_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ParameterError(
                    f"SAEConfig.{name} must be a finite number > 0, got {value!r} "
                    "(e.g. 1e-3; a non-finite rate makes every weight NaN)"
                )
        for name in ("sparsity", "aux_coefficient"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ParameterError(
                    f"SAEConfig.{name} must be a finite number >= 0, got {value!r}"
                )
        kind = canonical_sae_type(self.sae_type)
        if kind in ("topk", "batchtopk") and self.k > self.n_features:
            raise ParameterError(
                f"SAEConfig.k={self.k} active features per input but only n_features="
                f"{self.n_features} features: a {kind} SAE keeps k of its features, so give "
                f"k <= {self.n_features} or more features"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def dead_window(self) -> int:
        if self.dead_after is not None:
            return int(self.dead_after)
        return max(16 * self.n_features, 4 * self.batch_size)


def _rows_unit(rows: torch.Tensor) -> torch.Tensor:
    unit: torch.Tensor = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit


class SAE(nn.Module, Artifact):
    """Base class of every SAE: ``encode(x) -> features``, ``decode(features) -> x_hat``,
    ``forward(x) -> (x_hat, features)``, ``loss(x)`` (the training objective, a scalar).

    Parameters use SAELens's names and shapes: ``W_enc`` (input_dim, n_features), ``b_enc``,
    ``W_dec`` (n_features, input_dim), ``b_dec``. ``input_scale`` multiplies raw activations
    before encoding and divides the reconstruction, so callers always see raw activations.
    ``cfg`` is the `SAEConfig`; ``last_metrics`` holds the metrics of the last training step or
    evaluation.
    """

    sae_type: ClassVar[str] = ""
    kind: ClassVar[str] = "sae"
    input_scale: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    #: decoder rows are kept at unit norm during training (else the penalty uses their norms)
    unit_decoder: ClassVar[bool] = False
    has_biases: ClassVar[bool] = True

    def __init__(self, config: SAEConfig) -> None:
        super().__init__()
        if type(self).sae_type and canonical_sae_type(config.sae_type) != type(self).sae_type:
            config = SAEConfig.from_dict({**config.to_dict(), "sae_type": type(self).sae_type})
        self.cfg = config
        d, f = int(config.input_dim), int(config.n_features)
        if d < 1 or f < 1:
            raise ParameterError(f"input_dim and n_features must be >= 1, got {d} and {f}")
        gen = torch.Generator().manual_seed(int(config.seed))
        dec = _rows_unit(torch.randn(f, d, generator=gen))
        if not self.unit_decoder:
            dec = dec * 0.1  # small decoder, as recommended for L1-trained SAEs
        self.W_dec = nn.Parameter(dec)
        # W_enc is (d, f) like SAELens but stored feature-major: the sparse gradient of the
        # TopK variants adds whole rows of that storage.
        self.W_enc = nn.Parameter(dec.clone().contiguous().t())
        if self.has_biases:
            self.b_enc = nn.Parameter(torch.zeros(f))
            self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))
        self.last_metrics: dict[str, float] = {}
        self.fitted_on = None
        self.site: str | None = None
        #: the hook name an SAE imported from SAELens was trained on
        self.hook_name: str | None = None

    # -- shapes and bookkeeping ------------------------------------------------------------------
    @property
    def input_dim(self) -> int:
        return int(self.cfg.input_dim)

    @property
    def n_features(self) -> int:
        return int(self.cfg.n_features)

    def _bias_dec(self) -> torch.Tensor | None:
        return self.b_dec if self.has_biases else None

    # -- the maps in normalised space ------------------------------------------------------------
    def pre_activations(self, xn: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of normalised inputs (..., n_features)."""
        if not self.has_biases:
            return xn @ self.W_enc
        return (xn - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def training_target(self, xn: torch.Tensor) -> torch.Tensor:
        """What training reconstructs from normalised input rows ``xn``: the rows themselves.
        A dictionary that reads one part of each row and predicts another (a transcoder, whose
        rows are its input and output sites side by side) returns that other part."""
        return xn

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        out = z @ self.W_dec
        return out + self.b_dec if self.has_biases else out

    # -- public API (raw activations) -------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations of raw activations ``x`` (..., input_dim)."""
        self._check_input(x)
        return self.activate(self.pre_activations(x.to(self.W_dec.dtype) * self.input_scale))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in raw activation space of feature activations ``z``."""
        return self.decode_normalized(z) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, features)`` of raw activations ``x``."""
        z = self.encode(x)
        return self.decode(z), z

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw activations ``x`` (same shape)."""
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Training objective on raw activations ``x`` (n, input_dim): squared error per input
        in normalised space plus the sparsity penalty (dense, rank-1) or nothing (TopK: the
        sparsity is structural). Sets ``last_metrics`` (recon, l1, n_active)."""
        self._check_input(x)
        xn = x.reshape(-1, self.input_dim).to(self.W_dec.dtype) * self.input_scale
        z = self.activate(self.pre_activations(xn))
        recon = self.decode_normalized(z)
        mse = (recon - xn).pow(2).sum(-1).mean()
        l1 = (z @ self.W_dec.norm(dim=1)).mean()
        total = mse + self.cfg.sparsity * l1 if self.penalised else mse
        scale2 = float(self.input_scale) ** 2  # recon is reported in raw activation space
        self.last_metrics = {
            "recon": float(mse.detach()) / self.input_dim / scale2,
            "l1": float(z.detach().abs().sum(-1).mean()),
            "n_active": float((z > 0).sum(-1).float().mean()),
        }
        return total

    penalised: ClassVar[bool] = True

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.input_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ParameterError(f"the SAE takes tensors (..., {self.input_dim}); got {got}")

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale decoder rows to unit norm in place (the TopK variants after each step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # -- Artifact interface --------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers under SAELens's names, contiguous, for safetensors."""
        out = {name: t.detach().contiguous() for name, t in self.named_parameters()}
        out.update(
            {
                name: t.detach().contiguous()
                for name, t in self.named_buffers()
                if not name.startswith("_")
            }
        )
        return out

    def artifact_config(self) -> dict[str, Any]:
        """JSON configuration saved next to the tensors (hyper-parameters and site)."""
        return {"sae": self.cfg.to_dict(), "site": self.site}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> SAE:
        """The SAE saved as ``tensors`` + ``config`` (the inverse of `state_tensors` and
        `config`); the class follows the saved sae_type."""
        if not isinstance(config.get("sae"), dict):
            raise ArtifactError(
                "an SAE artifact's config needs an 'sae' entry (SAEConfig "
                f"fields); got keys {sorted(config)}"
            )
        sae = build_sae(SAEConfig.from_dict(config["sae"]))
        sae.load_tensors(tensors)
        sae.site = config.get("site")
        return sae

    def check_fits(self, backend: Any) -> None:
        """As `Artifact.check_fits`; an SAE that records no fit but knows its site is still
        refused where that site is missing or has another dimension."""
        if self.fitted_on is None and self.site:
            if self.site not in backend.sites():
                raise ArtifactError(
                    f"this SAE was trained on site {self.site!r}, which backend "
                    f"{backend.name!r} does not have"
                )
            dim = int(backend.site_info(self.site).dim)
            if dim != self.input_dim:
                raise ArtifactError(
                    f"this SAE takes {self.input_dim}-dimensional inputs but {self.site} of "
                    f"backend {backend.name!r} has dimension {dim}"
                )
        super().check_fits(backend)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (as from `state_tensors`) into this SAE, keeping its layout."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        own = {k: v for k, v in own.items() if not k.startswith("_")}
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise ArtifactError(
                f"a {self.sae_type} SAE has tensors {sorted(own)}; the saved one "
                f"lacks {missing} and has unexpected {extra}"
            )
        for name, target in own.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ArtifactError(
                    f"tensor {name!r} has shape {tuple(value.shape)}; this SAE "
                    f"needs {tuple(target.shape)} (input_dim "
                    f"{self.input_dim}, n_features {self.n_features})"
                )
            target.copy_(value)


class DenseSAE(SAE):
    """0.2's dense SAE: ``relu((x - b_dec) W_enc + b_enc)``, linear decoder, trained with an
    L1 penalty weighted by decoder row norms (so shrinking the codes by growing the decoder
    does not pay)."""

    sae_type = "dense"


class Rank1FactoredSAE(SAE):
    """0.2's rank-1 factored SAE: atom i is ``outer(v_i, w_i)``; it fires ``relu(<w_i, x>)``
    and contributes ``firing_i * v_i`` to the reconstruction. ``w`` is a column of ``W_enc``,
    ``v`` a row of ``W_dec``; there are no biases."""

    sae_type = "rank1"
    has_biases = False

    def fire(self, x: torch.Tensor) -> torch.Tensor:
        """Firing strengths ``relu(<w_i, x>)`` of raw activations ``x``."""
        return self.encode(x)


class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): per input, the ``k`` largest pre-activations pass a ReLU,
    all others are zero. Decoder rows have unit norm; dead features learn through AuxK."""

    sae_type = "topk"
    unit_decoder = True
    penalised = False

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        k = min(int(self.cfg.k), pre.shape[-1])
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())


class BatchTopKSAE(SAE):
    """BatchTopK SAE (Bussmann et al. 2024): in training, the ``k * batch`` largest positive
    pre-activations of a batch are kept; at inference each feature fires above ``threshold``
    (learned as a running mean of the smallest kept activation), like a JumpReLU."""

    sae_type = "batchtopk"
    threshold: torch.Tensor
    unit_decoder = True
    penalised = False

    def __init__(self, config: SAEConfig) -> None:
        super().__init__(config)
        self.register_buffer("threshold", torch.zeros(self.n_features))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def batch_activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The training-time activation over a batch (n, n_features)."""
        flat = pre.relu().flatten()
        n_keep = min(flat.numel(), max(1, round(float(self.cfg.k) * pre.shape[0])))
        vals, idx = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)


_CLASSES: dict[str, type[SAE]] = {
    "dense": DenseSAE,
    "rank1": Rank1FactoredSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
}


def sae_class(sae_type: str) -> type[SAE]:
    """The SAE class of ``sae_type`` (raises `ParameterError` listing the valid types)."""
    return _CLASSES[canonical_sae_type(sae_type)]


def build_sae(config: SAEConfig) -> SAE:
    """A freshly initialised (seeded) SAE of ``config.sae_type``."""
    return sae_class(config.sae_type)(config)


def power_of_two_scale(mean_sq_norm: float) -> float:
    """The power of two ``s`` that brings ``s**2 * mean_sq_norm`` nearest to 1."""
    if not math.isfinite(mean_sq_norm) or mean_sq_norm <= 0:
        return 1.0
    return float(2.0 ** round(-0.5 * math.log2(mean_sq_norm)))
