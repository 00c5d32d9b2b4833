"""SAE features on any per-token site as attribution-graph nodes.

An ordinary SAE (`archscope.methods.sae`, trained by ``train_saes`` / the ``sae`` method) reads
one vector per token at a site: a transformer's residual stream (``layer_i.residual``), an
LSTM's or GRU's ``layer_i.hidden``, any token site of one axis per token. `SiteFeatures`
presents it as a `Transcoder` that reads and writes that same site: the replacement model then
replaces the site's value by the SAE's reconstruction plus an error node per position (the
site's value − reconstruction, a constant of the prompt), as in sparse feature circuits (Marks
et al. 2024). A feature's read is its encoder row on the live value of the site, before the
replacement: what the layers below (and, on a recurrent layer, its own earlier positions)
write there.

What an edit of the site reaches is the backend's: on a transformer's residual stream every
later layer at that position and, through attention, later positions; on a unidirectional
RNN/GRU/LSTM ``layer_i.hidden`` at step t the layer's own recurrence from step t + 1 on (the
rest of the sequence is recomputed from the edited hidden state; the cell state of that step
is kept) and the next layer's input at step t. The graph's gradient runs, `check_graph`'s
interventions and the frozen model all place the same edit, so a feature at (layer, t) has
edges to the same layer's features at later positions as well as to later layers'.

On a backend that steps the site position by position (the RNN backend with an edited
``layer_i.hidden``), an edit function is called once per step and sees the positions already
edited before the current one; the live value of position t is the one it sees at step t.
The replacement model reads it there (`archscope_graphs.replacement`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from archscope.errors import ParameterError, SiteError
from archscope.sites import Site

#: sites that are a graph's input or output, not a place for features
_NOT_PLACEABLE = {"embed": "the token embeddings (the graph's input)", "logits": "the output"}


def _site_of(sae: Any) -> str:
    site = getattr(sae, "site", None)
    if not isinstance(site, str) or not site:
        raise ParameterError(
            f"SiteFeatures takes SAEs that know their site (archscope.methods.sae.SAE with "
            f".site set, as train_saes and the sae method leave it); got a "
            f"{type(sae).__name__} with site {site!r}: set sae.site = 'layer_i.<role>' or pass "
            "site=..."
        )
    return site


class SiteFeatures:
    """The SAE ``sae`` on its per-token site as a `Transcoder` reading and writing that site.

    ``sae``: an `archscope.methods.sae.SAE` (dense, rank-1, TopK, BatchTopK; any object with
    ``encode``, ``decode``, ``W_enc`` (d, n), ``W_dec`` (n, d), ``input_scale``, ``n_features``
    and ``input_dim`` will do). ``site``: the site (default: ``sae.site``). ``backend``: when
    given, the site is checked against it (a writable token site of one vector per token of
    the SAE's width); `site_features` always checks.

    ``encoder()`` is each feature's linear read of the site (the input scale folded in; the
    encoder and decoder biases are the pre-activation's constant, which no node explains),
    ``decoder(site)`` its write (decoder row / input scale), ``decode`` the reconstruction,
    decoder bias included."""

    def __init__(self, sae: Any, site: str | None = None, backend: Any = None) -> None:
        for name in ("encode", "decode", "W_enc", "W_dec", "input_scale", "n_features"):
            if not hasattr(sae, name):
                raise ParameterError(
                    f"SiteFeatures takes an SAE (archscope.methods.sae.SAE); a "
                    f"{type(sae).__name__} has no {name!r}. For write SAEs of a recurrent "
                    "layer's state writes use archscope_graphs.write_features"
                )
        if getattr(sae, "layout", None) is not None:
            raise ParameterError(
                "SiteFeatures takes SAEs of a per-token site; this is a write SAE (it has a "
                "layout over a state write): use archscope_graphs.write_features.WriteFeatures"
            )
        parsed = Site.parse(_site_of(sae) if site is None else str(site))
        self.sae = sae
        self.read_site = str(parsed)
        self.write_sites = (self.read_site,)
        self.layer = int(parsed.layer) if parsed.layer is not None else 0
        self.n_features = int(sae.n_features)
        self.site_dim = int(sae.W_dec.shape[1])
        if backend is not None:
            check_site(backend, self.read_site, self.site_dim)

    # -- the Transcoder protocol --------------------------------------------------------------
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.site_dim:
            raise ParameterError(
                f"SiteFeatures of {self.read_site}: the SAE reads vectors of "
                f"{self.site_dim}, got values of shape {tuple(x.shape)}"
            )
        weights: torch.Tensor = self.sae.W_dec
        return x.to(weights.device, weights.dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        acts: torch.Tensor = self.sae.encode(self._rows(x))
        return acts.float()

    @torch.no_grad()
    def decode(self, acts: torch.Tensor, site: str) -> torch.Tensor:
        self._check_site(site)
        weights: torch.Tensor = self.sae.W_dec
        out: torch.Tensor = self.sae.decode(acts.to(weights.device, weights.dtype))
        return out.float()

    def encoder(self) -> torch.Tensor:
        weights: torch.Tensor = self.sae.W_enc
        return (weights.detach().float().t() * float(self.sae.input_scale)).cpu()

    def decoder(self, site: str) -> torch.Tensor:
        self._check_site(site)
        weights: torch.Tensor = self.sae.W_dec
        return (weights.detach().float() / float(self.sae.input_scale)).cpu()

    def skip(self, x: torch.Tensor, site: str) -> torch.Tensor | None:
        return None

    def _check_site(self, site: str) -> None:
        if site != self.read_site:
            raise ParameterError(
                f"SiteFeatures of {self.read_site} writes only that site, not {site!r}"
            )

    def __repr__(self) -> str:
        return f"SiteFeatures({self.read_site}, {self.n_features} features)"


def check_site(backend: Any, site: str, width: int) -> None:
    """Refuse ``site`` unless ``backend`` has it as a writable token site of one vector of
    ``width`` per token (not the embeddings, not the logits)."""
    sites = backend.sites()
    per_token = [
        n
        for n, i in sites.items()
        if i.kind == "token" and len(i.shape) == 3 and i.writable and n not in _NOT_PLACEABLE
    ]
    if site not in sites:
        raise SiteError(
            f"SiteFeatures: backend {backend.name!r} has no site {site!r}; its sites of one "
            f"vector per token: {', '.join(per_token)}"
        )
    if site in _NOT_PLACEABLE:
        raise ParameterError(
            f"SiteFeatures: {site!r} is {_NOT_PLACEABLE[site]}, not a site features can "
            f"replace; place SAEs on one of {', '.join(per_token)}"
        )
    info = sites[site]
    if info.kind != "token" or len(info.shape) != 3:
        raise ParameterError(
            f"SiteFeatures: {site!r} is a {info.kind} site of shape {info.shape}, not one "
            f"vector per token (batch, seq, d); place SAEs on one of {', '.join(per_token)} "
            "(state writes: archscope_graphs.write_features)"
        )
    if not info.writable:
        raise ParameterError(
            f"SiteFeatures: backend {backend.name!r} cannot edit {site!r}, so its value "
            f"cannot be replaced; writable sites of one vector per token: {', '.join(per_token)}"
        )
    if int(info.dim) != int(width):
        raise ParameterError(
            f"SiteFeatures: the SAE of {site!r} reads vectors of {width}, but the site has "
            f"{info.dim} per token; use an SAE trained on this site of this model"
        )


def site_features(
    backend: Any, saes: Any, sites: Sequence[str] | None = None
) -> list[SiteFeatures]:
    """The `SiteFeatures` of ``saes`` (ordinary SAEs of per-token sites, one per site; their
    ``.site``, or ``sites[k]`` for ``saes[k]``), each checked against ``backend``, in layer
    order: what ``attribute(..., transcoders=...)`` and ``check_graph`` take."""
    saes = list(saes) if isinstance(saes, Sequence) else [saes]
    if not saes:
        raise ParameterError("site_features needs at least one SAE, got none")
    if sites is not None and len(sites) != len(saes):
        raise ParameterError(
            f"site_features: {len(saes)} SAEs but {len(sites)} sites; give one site per SAE "
            "or none (each SAE's own .site)"
        )
    out = [
        SiteFeatures(sae, None if sites is None else sites[k], backend)
        for k, sae in enumerate(saes)
    ]
    seen: dict[str, int] = {}
    for k, f in enumerate(out):
        if f.read_site in seen:
            raise ParameterError(
                f"site_features: SAEs {seen[f.read_site]} and {k} both sit on {f.read_site}; "
                "a site's value is replaced by one reconstruction: give one SAE per site"
            )
        seen[f.read_site] = k
    layers: dict[int, str] = {}
    for f in out:
        if f.layer in layers:
            raise ParameterError(
                f"site_features: {layers[f.layer]} and {f.read_site} are both in layer "
                f"{f.layer}; a graph's feature ids name the layer, so they would collide: "
                "give one SAE per layer"
            )
        layers[f.layer] = f.read_site
    return sorted(out, key=lambda f: f.layer)
