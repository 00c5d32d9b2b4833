"""Write SAEs: sparse autoencoders whose decoder atoms are rank-1 matrices in the shape of one
layer's (and head's) per-token state write.

A layer that declares write sites (`archscope.recurrence`) adds ``W_t = v_t ⊗ k_t`` (d_value ×
d_key per head) to its state at every position. A write SAE reads one head's ``W_t``
flattened (its encoder is a full linear map of the d_value·d_key entries, so it also sees
writes that are not exactly rank-1) and reconstructs it as ``Σ_i z_i · v_i w_iᵀ + b``: every
decoder row is the flattened outer product of a unit value factor ``v_i`` and a unit key factor
``w_i``, so each atom has Frobenius norm 1 and a code ``z_i`` is the Frobenius norm of the
atom's contribution (training under matched Frobenius norm). After each optimiser step the
decoder rows are projected back onto rank-1 unit matrices (a power-iteration step from the
factors, which barely move between steps).

The training loop is the SAE one (`archscope.methods.sae.fit_sae`): TopK with AuxK for dead
features, or ReLU + L1; dead features are tracked as for the other SAEs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...artifacts import Artifact
from ...errors import ArtifactError, ParameterError, SiteError
from ..sae._models import SAE, SAEConfig, power_of_two_scale

__all__ = [
    "WRITE_SAE_TYPES",
    "WriteLayout",
    "WriteSAE",
    "build_write_sae",
    "rank1_factors",
]

#: write-SAE variant -> what it is
WRITE_SAE_TYPES: dict[str, str] = {
    "topk": "the k largest pre-activations of each write kept (AuxK trains dead atoms)",
    "l1": "ReLU codes with an L1 penalty",
}


@dataclass(frozen=True)
class WriteLayout:
    """Where one head's write sits in a ``state_write`` site's value.

    ``axes``: the site's axis names, ``("batch", "seq", *head axes, row axis, column axis)``;
    ``sizes``: the sizes after batch and seq. The write matrix's rows are called "value" and
    its columns "key" here (``d_value`` = size of ``axes[-2]``, ``d_key`` = of ``axes[-1]``),
    which is Mamba's layout (d_inner/head_dim × d_state); gated delta nets and mLSTM store
    their write as key_dim × value_dim, so there ``d_value``, `WriteSAE.value_factors` and
    ``v_i`` are along the key axis (`row_axis` / `column_axis` name them). Nothing in the
    method depends on which factor is which. The axes between ``seq`` and the last two are
    the head axes (none for a layer whose write is one matrix, e.g. Mamba-1's d_inner ×
    d_state); ``head`` indexes them flattened (row-major)."""

    site: str
    axes: tuple[str, ...]
    sizes: tuple[int, ...]
    head: int

    @classmethod
    def of(cls, site: str, axes: tuple[str, ...], sample: torch.Tensor, head: int) -> WriteLayout:
        """The layout of ``site`` (axis names ``axes``) from one captured value ``sample``."""
        if tuple(axes[:2]) != ("batch", "seq") or len(axes) < 4:
            raise SiteError(
                f"{site} has axes {axes}; a write SAE needs a token site (batch, seq, ..., "
                "value, key) whose last two axes are the write matrix"
            )
        if sample.dim() != len(axes):
            raise SiteError(
                f"{site} declares axes {axes} but its value has shape {tuple(sample.shape)}"
            )
        sizes = tuple(int(s) for s in sample.shape[2:])
        heads = math.prod(sizes[:-2])
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
            raise ParameterError(
                f"head={head!r}: {site} has {heads} head(s) (axes {axes[2:-2] or '(none)'}); "
                f"give 0..{heads - 1}"
            )
        return cls(site=site, axes=tuple(axes), sizes=sizes, head=head)

    @property
    def row_axis(self) -> str:
        """The name of the axis ``d_value`` (the atoms' ``v_i``) runs along."""
        return self.axes[-2]

    @property
    def column_axis(self) -> str:
        """The name of the axis ``d_key`` (the atoms' ``w_i``) runs along."""
        return self.axes[-1]

    @property
    def n_heads(self) -> int:
        return math.prod(self.sizes[:-2])

    @property
    def d_value(self) -> int:
        return self.sizes[-2]

    @property
    def d_key(self) -> int:
        return self.sizes[-1]

    def heads_view(self, write: torch.Tensor) -> torch.Tensor:
        """(batch, seq, n_heads, d_value, d_key): a view of a contiguous site value."""
        return write.reshape(*write.shape[:2], self.n_heads, self.d_value, self.d_key)

    def take(self, write: torch.Tensor) -> torch.Tensor:
        """The head's writes (batch, seq, d_value, d_key) of a site value."""
        return self.heads_view(write)[:, :, self.head]

    def put(self, write: torch.Tensor, head_write: torch.Tensor) -> torch.Tensor:
        """A copy of the site value ``write`` with the head's writes replaced by ``head_write``
        (batch, seq, d_value, d_key)."""
        out = write.clone()
        self.heads_view(out)[:, :, self.head] = head_write.to(out.dtype)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "axes": list(self.axes),
            "sizes": list(self.sizes),
            "head": self.head,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WriteLayout:
        return cls(
            site=str(data["site"]),
            axes=tuple(data["axes"]),
            sizes=tuple(int(s) for s in data["sizes"]),
            head=int(data["head"]),
        )


def rank1_factors(
    mats: torch.Tensor, value: torch.Tensor | None = None, iterations: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit factors ``(v, w)`` of the best rank-1 approximations of ``mats`` (n, a, b) with
    ``σ v wᵀ`` the approximation. From a previous value factor ``value`` a few power
    iterations suffice; without one an SVD gives the exact pair."""
    if value is None:
        u, _, vh = torch.linalg.svd(mats.float(), full_matrices=False)
        v, w = u[..., 0], vh[..., 0, :]
    else:
        v = value
        w = torch.zeros(mats.shape[0], mats.shape[2], dtype=mats.dtype, device=mats.device)
        for _ in range(max(1, iterations)):
            w = torch.einsum("nab,na->nb", mats, v)
            w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            v = torch.einsum("nab,nb->na", mats, w)
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return v.to(mats.dtype), w.to(mats.dtype)


class WriteSAE(SAE):
    """A write SAE (base of the TopK and L1 variants): an `SAE` on one head's flattened
    writes whose decoder rows are flattened unit rank-1 matrices ``v_i w_iᵀ``.

    ``layout``: where the head's write sits in its site (`WriteLayout`); `value_factors` and
    `key_factors` give the atoms' factors (n_features, d_value) and (n_features, d_key)."""

    kind: ClassVar[str] = "write-sae"
    unit_decoder: ClassVar[bool] = True
    write_type: ClassVar[str] = ""
    atom_value: torch.Tensor

    def __init__(self, config: SAEConfig, layout: WriteLayout) -> None:
        if config.input_dim != layout.d_value * layout.d_key:
            raise ParameterError(
                f"input_dim {config.input_dim} is not d_value·d_key = {layout.d_value}·"
                f"{layout.d_key} of {layout.site}"
            )
        super().__init__(config)
        self.layout = layout
        self.site = layout.site
        self.register_buffer("atom_value", torch.zeros(self.n_features, layout.d_value))
        self.normalize_decoder(exact=True)
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec.t())

    @property
    def d_value(self) -> int:
        return self.layout.d_value

    @property
    def d_key(self) -> int:
        return self.layout.d_key

    def atoms(self) -> torch.Tensor:
        """The atoms as matrices (n_features, d_value, d_key), unit Frobenius norm."""
        return self.W_dec.detach().reshape(self.n_features, self.d_value, self.d_key)

    def value_factors(self) -> torch.Tensor:
        """``v_i`` (n_features, d_value), unit norm (sign chosen with `key_factors`)."""
        return self.atom_value.clone()

    def key_factors(self) -> torch.Tensor:
        """``w_i`` (n_features, d_key), unit norm, with ``atom_i = v_i w_iᵀ``."""
        return torch.einsum("nab,na->nb", self.atoms(), self.atom_value)

    @torch.no_grad()
    def normalize_decoder(self, exact: bool = False) -> None:
        """Project every decoder row onto the nearest unit rank-1 matrix (after each step)."""
        mats = self.W_dec.reshape(self.n_features, self.d_value, self.d_key)
        previous = None if exact or not bool(self.atom_value.any()) else self.atom_value
        v, w = rank1_factors(mats, previous, iterations=2)
        self.atom_value.copy_(v)
        self.W_dec.copy_((v[:, :, None] * w[:, None, :]).reshape(self.n_features, -1))

    @torch.no_grad()
    def initialise_from(self, writes: torch.Tensor) -> None:
        """Input scale (a power of two), decoder bias and atoms from a sample of writes (n,
        d_value·d_key): atom i starts as the unit rank-1 part of a random sample write, the
        encoder as the decoder's transpose."""
        sample = writes.reshape(-1, self.input_dim).to(self.W_dec.device, self.W_dec.dtype)
        norms = sample.norm(dim=1)
        sample = sample[norms > 0]
        if not len(sample):
            raise ParameterError("every write in the sample is zero: nothing to train on")
        if self.cfg.normalize:
            self.input_scale.fill_(power_of_two_scale(float(sample.pow(2).sum(-1).mean())))
        self.b_dec.zero_()
        gen = torch.Generator().manual_seed(int(self.cfg.seed))
        pick = torch.randint(len(sample), (self.n_features,), generator=gen).to(sample.device)
        start = sample[pick] + 1e-3 * self.W_dec * sample.norm(dim=1).mean()
        self.W_dec.copy_(start)
        self.normalize_decoder(exact=True)
        self.W_enc.copy_(self.W_dec.t())

    # -- Artifact ----------------------------------------------------------------------------
    def artifact_config(self) -> dict[str, Any]:
        return {
            "sae": self.cfg.to_dict(),
            "site": self.site,
            "write_type": self.write_type,
            "layout": self.layout.to_dict(),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> WriteSAE:
        for key in ("sae", "layout", "write_type"):
            if key not in config:
                raise ArtifactError(
                    f"a write-SAE artifact's config needs {key!r}; got keys {sorted(config)}"
                )
        sae = build_write_sae(
            str(config["write_type"]),
            SAEConfig.from_dict(config["sae"]),
            WriteLayout.from_dict(config["layout"]),
        )
        sae.load_tensors(tensors)
        return sae

    def check_fits(self, backend: Any) -> None:
        if self.site not in backend.sites():
            raise ArtifactError(
                f"this write SAE reads {self.site!r}, which backend {backend.name!r} does not "
                "have (it declares no such write site)"
            )
        Artifact.check_fits(self, backend)  # the recorded fit, if any


class WriteTopKSAE(WriteSAE):
    """Write SAE with TopK codes: per write the ``k`` largest pre-activations pass a ReLU."""

    sae_type = "topk"
    write_type = "topk"
    penalised = False

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        k = min(int(self.cfg.k), pre.shape[-1])
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())


class WriteL1SAE(WriteSAE):
    """Write SAE with ReLU codes and an L1 penalty (``sparsity`` × Σ z_i, atoms of norm 1)."""

    sae_type = "dense"
    write_type = "l1"


_WRITE_CLASSES: dict[str, type[WriteSAE]] = {"topk": WriteTopKSAE, "l1": WriteL1SAE}


def build_write_sae(write_type: str, config: SAEConfig, layout: WriteLayout) -> WriteSAE:
    """A fresh write SAE of ``write_type`` ("topk" or "l1") for ``layout``."""
    cls = _WRITE_CLASSES.get(str(write_type).lower())
    if cls is None:
        raise ParameterError(
            f"unknown write-SAE type {write_type!r}; valid: {', '.join(WRITE_SAE_TYPES)}"
        )
    return cls(config, layout)
