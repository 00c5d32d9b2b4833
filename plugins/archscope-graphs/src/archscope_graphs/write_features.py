"""Write-SAE features as attribution-graph nodes on recurrent layers.

A write SAE (`archscope.methods.write_sae`) encodes one head's per-token state write
``layer_i.state_write`` and reconstructs it from rank-1 atoms ``v_j w_jᵀ``. `WriteFeatures`
presents the write SAEs of one layer (one per head, any subset of the heads) as a `Transcoder`
that reads and writes that same site: the replacement model then replaces the layer's writes
by the SAEs' reconstruction plus an error node per position (write − reconstruction, the heads
without an SAE included), and the frozen recurrence (Δ, B, C and gates held, the write scanned
as the site gives it: `archscope_mamba.freeze`) carries each feature's write to later
positions and layers. A feature's read is its encoder row on the live write, which depends
only on the layer's input (earlier layers' writes), so the graph stays acyclic.

The site's value is flattened per position (``*head axes × rows × columns``, row-major, as
`WriteLayout.heads_view` lays it out); every vector here (encoder and decoder rows) is over
that flat site, zero outside its SAE's head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from archscope.errors import ParameterError
from archscope.sites import Site


class WriteFeatures:
    """The write SAEs ``saes`` of one layer's ``state_write`` site as one `Transcoder`.

    Features are numbered SAE after SAE in the order given (feature ``j`` of the second SAE is
    ``saes[0].n_features + j``). ``encode`` takes the site's value, flat (..., site dim) or in
    its own shape (..., *sizes); ``encoder()`` gives each feature's linear read of the flat
    site (the input scale folded in; the encoder's biases are the pre-activation's constant,
    which no node explains), ``decoder(site)`` its write (atom / input scale), ``decode`` the
    reconstruction (decoder biases included) in the flat site."""

    def __init__(self, saes: Any) -> None:
        saes = list(saes) if isinstance(saes, Sequence) else [saes]
        if not saes:
            raise ParameterError("WriteFeatures needs at least one write SAE, got none")
        layouts = [getattr(s, "layout", None) for s in saes]
        if any(layout is None for layout in layouts):
            raise ParameterError(
                "WriteFeatures takes write SAEs (archscope.methods.write_sae.WriteSAE, which "
                f"carry a layout); got {', '.join(type(s).__name__ for s in saes)}"
            )
        first = layouts[0]
        assert first is not None
        for layout in layouts[1:]:
            assert layout is not None
            if layout.site != first.site or layout.sizes != first.sizes:
                raise ParameterError(
                    f"WriteFeatures takes the write SAEs of one site; got {first.site} "
                    f"{first.sizes} and {layout.site} {layout.sizes}: make one WriteFeatures "
                    "per layer"
                )
        heads = [layout.head for layout in layouts if layout is not None]
        if len(set(heads)) < len(heads):
            raise ParameterError(
                f"WriteFeatures: two write SAEs of {first.site} read the same head ({heads}); "
                "give one SAE per head"
            )
        self.saes = saes
        self.layout = first
        self.read_site = first.site
        self.write_sites = (first.site,)
        parsed = Site.parse(first.site)
        self.layer = int(parsed.layer) if parsed.layer is not None else 0
        self.sizes = tuple(first.sizes)
        self.site_dim = math.prod(self.sizes)
        self.block = first.d_value * first.d_key
        self.heads = heads
        self.offsets = [0]
        for s in saes:
            self.offsets.append(self.offsets[-1] + int(s.n_features))
        self.n_features = self.offsets[-1]

    # -- shapes -------------------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-len(self.sizes) :]) == self.sizes:
            return x.reshape(*x.shape[: x.dim() - len(self.sizes)], self.site_dim)
        if x.shape[-1] == self.site_dim:
            return x
        raise ParameterError(
            f"WriteFeatures of {self.read_site}: expected values (..., {self.site_dim}) or "
            f"(..., {', '.join(map(str, self.sizes))}), got shape {tuple(x.shape)}"
        )

    def _span(self, head: int) -> slice:
        return slice(head * self.block, (head + 1) * self.block)

    # -- the Transcoder protocol --------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        parts = []
        for sae, head in zip(self.saes, self.heads, strict=True):
            part = flat[..., self._span(head)].to(sae.W_dec.device, sae.W_dec.dtype)
            parts.append(sae.encode(part).float())
        return torch.cat(parts, -1)

    @torch.no_grad()
    def decode(self, acts: torch.Tensor, site: str) -> torch.Tensor:
        self._check_site(site)
        out = acts.new_zeros(*acts.shape[:-1], self.site_dim, dtype=torch.float32)
        for k, (sae, head) in enumerate(zip(self.saes, self.heads, strict=True)):
            own = acts[..., self.offsets[k] : self.offsets[k + 1]].to(sae.W_dec.dtype)
            out[..., self._span(head)] = sae.decode(own).float()
        return out

    def encoder(self) -> torch.Tensor:
        out = torch.zeros(self.n_features, self.site_dim)
        for k, (sae, head) in enumerate(zip(self.saes, self.heads, strict=True)):
            w = sae.W_enc.detach().float().t() * float(sae.input_scale)
            out[self.offsets[k] : self.offsets[k + 1], self._span(head)] = w.cpu()
        return out

    def decoder(self, site: str) -> torch.Tensor:
        self._check_site(site)
        out = torch.zeros(self.n_features, self.site_dim)
        for k, (sae, head) in enumerate(zip(self.saes, self.heads, strict=True)):
            w = sae.W_dec.detach().float() / float(sae.input_scale)
            out[self.offsets[k] : self.offsets[k + 1], self._span(head)] = w.cpu()
        return out

    def skip(self, x: torch.Tensor, site: str) -> torch.Tensor | None:
        return None

    def _check_site(self, site: str) -> None:
        if site != self.read_site:
            raise ParameterError(
                f"WriteFeatures of {self.read_site} writes only that site, not {site!r}"
            )

    def __repr__(self) -> str:
        return f"WriteFeatures({self.read_site}, heads {self.heads}, {self.n_features} features)"


def write_features(saes: Any) -> list[WriteFeatures]:
    """The `WriteFeatures` of ``saes`` (write SAEs of any layers and heads), one per site, in
    layer order: what ``attribute(..., transcoders=...)`` and ``check_graph`` take."""
    saes = list(saes) if isinstance(saes, Sequence) else [saes]
    by_site: dict[str, list[Any]] = {}
    for sae in saes:
        layout = getattr(sae, "layout", None)
        if layout is None:
            raise ParameterError(
                f"write_features takes write SAEs (with a layout); got {type(sae).__name__}"
            )
        by_site.setdefault(layout.site, []).append(sae)
    out = [WriteFeatures(group) for group in by_site.values()]
    return sorted(out, key=lambda w: w.layer)
