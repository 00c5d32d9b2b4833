"""Where site values live in a model (`Hookpoint`) and the builder of a backend's site table
(`SiteTable`), which fills kinds, shapes and descriptions from the role vocabulary and records
forward order from the order sites are added."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import BackendError
from .sites import LAYER_ROLES, MODEL_ROLES, Site, SiteInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ROLE_DEFAULTS", "Hookpoint", "SiteTable"]


@dataclass(frozen=True)
class Hookpoint:
    """Where a site's value lives: the ``output`` (or ``input``) of ``module``.

    ``index`` picks an element when the value is a tuple/list (block outputs such as
    ``(hidden, cache)``); for ``input``, ``index`` is the positional argument and ``arg`` the
    keyword name used when the argument is passed by keyword. ``clone`` copies the captured
    value (for modules whose output a later step modifies in place).

    Views convert values that are not stored the way the site is defined: ``to_site(raw)``
    turns the raw value into the site's tensor; ``from_site(value, raw)`` turns an edited site
    tensor back into the raw form (needed for edits; without it the site must be read-only).
    """

    module: nn.Module
    io: str = "output"  # "output" | "input"
    index: int = 0
    arg: str = "hidden_states"
    clone: bool = False
    to_site: Callable[[Any], torch.Tensor] | None = None
    from_site: Callable[[torch.Tensor, Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.io not in ("output", "input"):
            raise BackendError(f"Hookpoint.io must be 'output' or 'input', got {self.io!r}")

    def read(self, raw: Any) -> torch.Tensor:
        """The site's value from the raw module value."""
        return self.to_site(raw) if self.to_site is not None else raw

    def write(self, value: torch.Tensor, raw: Any) -> Any:
        """The raw module value that carries the (edited) site value."""
        if self.from_site is not None:
            return self.from_site(value, raw)
        if self.to_site is not None:
            raise BackendError(
                "this hookpoint has a to_site view but no from_site: the site "
                "cannot be edited (declare it writable=False or give from_site)"
            )
        return value


#: Role → (kind, axis names, writable) used when a backend does not give them.
ROLE_DEFAULTS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "embed": ("token", ("batch", "seq", "d_model"), True),
    "final_norm": ("token", ("batch", "seq", "d_model"), True),
    "logits": ("token", ("batch", "seq", "vocab"), False),
    "residual": ("token", ("batch", "seq", "d_model"), True),
    "attn": ("token", ("batch", "seq", "d_model"), True),
    "mlp": ("token", ("batch", "seq", "d_model"), True),
    "mixer": ("token", ("batch", "seq", "d_model"), True),
    "mlp_hidden": ("token", ("batch", "seq", "d_mlp"), True),
    "attn_pattern": ("token", ("batch", "heads", "seq", "key"), True),
    "hidden": ("token", ("batch", "seq", "d_hidden"), True),
    "cell": ("token", ("batch", "seq", "d_hidden"), True),
    "ssm_state": ("state", ("batch", "d_inner", "d_state"), False),
    "conv_state": ("state", ("batch", "channels", "kernel"), False),
    "state": ("state", ("batch", "d_state"), False),
}


class SiteTable(dict[str, tuple[SiteInfo, "Hookpoint | None"]]):
    """A backend's site table: site name → (`SiteInfo`, `Hookpoint` or None), in forward order.

    Add sites in the order the forward pass reaches them; kind, shape, writability and the
    description come from the role vocabulary unless given::

        table = SiteTable()
        table.add("embed", Hookpoint(model.embed), dim=d)
        for i, block in enumerate(model.blocks):
            table.add(f"layer_{i}.residual", Hookpoint(block), dim=d)
    """

    def add(
        self,
        site: str | Site,
        where: Hookpoint | None,
        dim: int,
        *,
        kind: str | None = None,
        shape: tuple[str, ...] | None = None,
        writable: bool | None = None,
        description: str | None = None,
        **extra: object,
    ) -> SiteInfo:
        """Add ``site`` (reached after every site added before it); returns its `SiteInfo`.
        ``where`` None means the backend produces the value itself (`read_unhooked`)."""
        parsed = Site.parse(site)
        name = str(parsed)
        if name in self:
            raise BackendError(f"site {name!r} was added to the site table twice")
        default_kind, default_shape, default_writable = ROLE_DEFAULTS.get(
            parsed.role, ("token", ("batch", "seq", "d_model"), True)
        )
        kind = kind or (default_kind if shape is None else ("token" if "seq" in shape else "state"))
        if shape is None:
            shape = default_shape if kind == default_kind else ("batch", "d_state")
        info = SiteInfo(
            parsed,
            kind,
            shape,
            int(dim),
            writable=default_writable if writable is None else writable,
            order=float(len(self)),
            description=description
            or LAYER_ROLES.get(parsed.role)
            or MODEL_ROLES.get(parsed.role, ""),
            extra=dict(extra),
        )
        self[name] = (info, where)
        return info
