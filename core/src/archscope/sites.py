"""The site vocabulary: how places inside a model are named, parsed and described.

`Site.parse` / `str(site)` are the only code that reads or writes site strings such as
``layer_5.residual`` or ``embed``. Backends describe their sites with `SiteInfo`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from .errors import SiteError

#: Model-level sites (no layer index).
MODEL_ROLES: dict[str, str] = {
    "embed": "embedding output = residual stream before block 0",
    "final_norm": "final normalised residual stream (input of the unembedding)",
    "logits": "output logits",
}

#: Per-layer roles with a documented meaning. Backends may add roles of their own (any
#: lower-case identifier); these are the ones every method understands.
LAYER_ROLES: dict[str, str] = {
    "residual": "residual stream after block i",
    "attn": "attention sub-layer output added to the residual",
    "mlp": "MLP sub-layer output added to the residual",
    "mlp_hidden": "MLP hidden units after the non-linearity (input of the output projection)",
    "mixer": "sequence-mixer output of a non-attention block (SSM, time-mix)",
    "attn_pattern": "attention probabilities per head (batch, heads, query, key)",
    "ssm_state": "recurrent SSM state after the last real position",
    "conv_state": "causal-conv state after the last real position",
    "hidden": "RNN hidden output of layer i at every step",
    "cell": "cell state of a gated recurrent layer i at every step",
    "state": "recurrent state of a block after the last real position",
}

#: Capabilities with a fixed meaning (backends declare them, methods require them).
CAPABILITIES: dict[str, str] = {
    "residual": "per-layer residual stream sites (layer_i.residual, embed)",
    "components": "attention/MLP (or mixer/MLP) sub-layer outputs",
    "mlp_hidden": "MLP hidden units (neurons)",
    "unembed": "backend.unembed(residual) through the model's own final norm and head",
    "logits": "the forward pass produces next-token logits",
    "recurrent_state": "recurrent state sites (ssm/conv state, RNN hidden/cell, block state)",
    "state_patch": "runs can start from, or swap in, a given recurrent state",
    "attention_patterns": "per-head attention probabilities (layer_i.attn_pattern)",
    "edit": "sites can be patched, ablated, steered or scaled during a run",
    "freeze": "nonlinearities can be held at a prompt's values (archscope.freeze)",
}

_LAYER_RE = re.compile(r"^layer_(\d+)\.([a-z][a-z0-9_]*)$")
_ROLE_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Site:
    """One addressable place in a model: ``layer_{layer}.{role}`` or a model-level role."""

    role: str
    layer: int | None = None

    def __post_init__(self) -> None:
        if not _ROLE_RE.match(self.role):
            raise SiteError(f"invalid site role {self.role!r}: roles are lower-case identifiers")
        if self.layer is None and self.role not in MODEL_ROLES:
            raise SiteError(
                f"{self.role!r} is not a model-level site; model-level sites are "
                f"{', '.join(MODEL_ROLES)}; per-layer sites look like 'layer_0.{self.role}'"
            )
        if self.layer is not None and self.layer < 0:
            raise SiteError(f"layer index must be >= 0, got {self.layer}")

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """Parse ``'layer_3.residual'`` or ``'embed'``; a `Site` is returned unchanged."""
        if isinstance(text, Site):
            return text
        if not isinstance(text, str):
            raise SiteError(
                f"a site is a string such as 'layer_0.residual' or 'embed', got {type(text).__name__}"
            )
        name = text.strip()
        if name in MODEL_ROLES:
            return cls(role=name)
        match = _LAYER_RE.match(name)
        if match is None and _ROLE_RE.match(name):
            raise SiteError(
                f"{name!r} is not a model-level site (those are {', '.join(MODEL_ROLES)}); "
                f"per-layer sites need a layer index, e.g. 'layer_0.{name}'"
            )
        if match is None:
            raise SiteError(
                f"cannot parse site name {text!r}: expected 'layer_<i>.<role>' "
                f"(e.g. 'layer_0.residual', 'layer_2.mlp') or one of {', '.join(MODEL_ROLES)}"
            )
        return cls(role=match.group(2), layer=int(match.group(1)))

    def __str__(self) -> str:
        return self.role if self.layer is None else f"layer_{self.layer}.{self.role}"

    @property
    def name(self) -> str:
        return str(self)


SiteKind = Literal["token", "state"]


@dataclass(frozen=True)
class SiteInfo:
    """What a backend says about one of its sites.

    ``kind`` is ``"token"`` for sites aligned with input positions (shape starts with batch,
    seq) and ``"state"`` for one value per sequence (a recurrent state). ``shape`` names each
    axis; ``dim`` is the size of the feature (last) axis; ``writable`` says whether runs may
    edit it. ``order`` is the position of the site in the forward pass (used to stop early).
    """

    site: Site
    kind: str  # SiteKind
    shape: tuple[str, ...]
    dim: int
    writable: bool = True
    order: float = 0.0
    description: str = ""
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("token", "state"):
            raise SiteError(
                f"SiteInfo for {self.site}: kind must be 'token' or 'state', got {self.kind!r}"
            )
        if self.kind == "token" and "seq" not in self.shape:
            raise SiteError(
                f"SiteInfo for {self.site}: a token site's shape must name a 'seq' "
                f"axis, got {self.shape}"
            )

    @property
    def name(self) -> str:
        return str(self.site)


def format_valid(names: Iterable[str], limit: int = 12) -> str:
    """A short list of valid site names for error messages."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def resolve(name: str | Site, available: dict[str, SiteInfo], backend: str) -> SiteInfo:
    """Look a site up in a backend's site table, with an error listing valid names."""
    site = Site.parse(name)
    info = available.get(str(site))
    if info is None:
        layer_roles = sorted({i.site.role for i in available.values() if i.site.layer is not None})
        model_level = [n for n, i in available.items() if i.site.layer is None]
        n_layers = 1 + max(
            (i.site.layer for i in available.values() if i.site.layer is not None), default=-1
        )
        raise SiteError(
            f"site {str(site)!r} does not exist for backend {backend!r}. "
            f"This model has layers 0..{n_layers - 1} with roles {', '.join(layer_roles) or '(none)'}"
            f" and model-level sites {', '.join(model_level) or '(none)'}; "
            f"e.g. {format_valid(available)}"
        )
    return info
