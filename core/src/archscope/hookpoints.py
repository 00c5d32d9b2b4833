"""How a backend declares its sites: where each value lives in the model (`Hookpoint`), how it
is stored there for one run (`View`), and the builder of the site table (`SiteTable`), which
fills kinds, shapes and descriptions from the role vocabulary and records forward order from the
order sites are added.

This is the one way every backend declares its sites (first-party and plugins alike)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import BackendError
from .sites import LAYER_ROLES, MODEL_ROLES, Site, SiteInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .edits import Edit
    from .runs import RunRequest

__all__ = ["ROLE_DEFAULTS", "Hookpoint", "SiteTable", "View"]


class View:
    """How a site's value is stored at its hookpoint during one run. The default view is the
    identity; subclass it for values that are not stored the way the site is defined.

    Every method receives the run (`archscope.backends.RunRequest`): its batch and sequence
    shape (``run.batch_size``, ``run.seq_len``), its attention mask, and ``run.extra``, where a
    backend keeps per-run data (e.g. a row shift decided once per run). With
    ``Hookpoint(index=None)`` the raw value is the module's whole output (e.g. a tuple).
    """

    def read(self, raw: Any, run: RunRequest) -> torch.Tensor:
        """The site's value (the tensor edits see and captures store) from the raw value."""
        return raw  # type: ignore[no-any-return]

    def write(self, value: torch.Tensor, raw: Any, run: RunRequest) -> Any:
        """The raw value that carries the edited site ``value`` (called only with edits)."""
        return value

    def edit(
        self, value: torch.Tensor, edit: Edit, info: SiteInfo, run: RunRequest
    ) -> torch.Tensor:
        """``value`` with ``edit`` applied (override when the run sees only part of the site,
        e.g. one decoding step)."""
        from .edits import apply_edit

        return apply_edit(value, edit, info, run.attention_mask)


_IDENTITY = View()


@dataclass(frozen=True)
class Hookpoint:
    """Where a site's value lives: the ``output`` (or ``input``) of ``module``.

    ``module`` is the module itself or its dotted path (resolved by `SiteTable` against the
    model it was given). ``index`` picks an element when the value is a tuple/list (block
    outputs such as ``(hidden, cache)``); ``None`` hands the whole output to the ``view``. For
    ``input``, ``index`` is the positional argument and ``arg`` the keyword name used when the
    argument is passed by keyword. ``clone`` copies the captured value (for modules whose output
    a later step modifies in place).

    Views convert values that are not stored the way the site is defined. ``to_site(raw)`` /
    ``from_site(value, raw)`` are the short form for conversions that do not depend on the run
    (without ``from_site`` the site must be read-only); ``view`` (a `View`) sees the run.
    """

    module: nn.Module | str
    io: str = "output"  # "output" | "input"
    index: int | None = 0
    arg: str = "hidden_states"
    clone: bool = False
    to_site: Callable[[Any], torch.Tensor] | None = None
    from_site: Callable[[torch.Tensor, Any], Any] | None = None
    view: View | None = None

    def __post_init__(self) -> None:
        if self.io not in ("output", "input"):
            raise BackendError(f"Hookpoint.io must be 'output' or 'input', got {self.io!r}")
        if self.index is None and self.io == "input":
            raise BackendError("Hookpoint(io='input') needs the argument's index, got None")
        if self.view is not None and (self.to_site is not None or self.from_site is not None):
            raise BackendError(
                "Hookpoint takes either a view or to_site/from_site, not both; fold the "
                "conversion into the view"
            )

    def read(self, raw: Any, run: RunRequest | None = None) -> torch.Tensor:
        """The site's value from the raw module value."""
        if self.view is not None:
            assert run is not None, "a Hookpoint with a view reads values only during a run"
            return self.view.read(raw, run)
        return self.to_site(raw) if self.to_site is not None else raw

    def write(self, value: torch.Tensor, raw: Any, run: RunRequest | None = None) -> Any:
        """The raw module value that carries the (edited) site value."""
        if self.view is not None:
            assert run is not None, "a Hookpoint with a view writes values only during a run"
            return self.view.write(value, raw, run)
        if self.from_site is not None:
            return self.from_site(value, raw)
        if self.to_site is not None:
            raise BackendError(
                "this hookpoint has a to_site view but no from_site: the site "
                "cannot be edited (declare it writable=False or give from_site)"
            )
        return value

    def edit(
        self, value: torch.Tensor, edit: Edit, info: SiteInfo, run: RunRequest
    ) -> torch.Tensor:
        """``value`` with ``edit`` applied, as the view places it."""
        return (self.view or _IDENTITY).edit(value, edit, info, run)


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
    "mlp_in": ("token", ("batch", "seq", "d_model"), True),
    "attn_pattern": ("token", ("batch", "heads", "seq", "key"), True),
    "hidden": ("token", ("batch", "seq", "d_hidden"), True),
    "cell": ("token", ("batch", "seq", "d_hidden"), True),
    "ssm_state": ("state", ("batch", "d_inner", "d_state"), False),
    "conv_state": ("state", ("batch", "channels", "kernel"), False),
    "state": ("state", ("batch", "d_state"), False),
}


class SiteTable(dict[str, tuple[SiteInfo, "Hookpoint | None"]]):
    """A backend's site table: site name → (`SiteInfo`, `Hookpoint` or None), in forward order.

    Add sites in the order the forward pass reaches them (the table records that order; stopping
    early relies on it); kind, shape, writability and the description come from the role
    vocabulary unless given. Hookpoint modules may be dotted paths under ``root``::

        table = SiteTable(model)
        table.add("embed", Hookpoint("embed"), dim=d)
        for i in range(len(model.blocks)):
            table.add(f"layer_{i}.residual", Hookpoint(f"blocks.{i}"), dim=d)
    """

    def __init__(self, root: nn.Module | None = None) -> None:
        super().__init__()
        self.root = root

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
        if where is not None and isinstance(where.module, str):
            if self.root is None:
                raise BackendError(
                    f"site {name!r}: the hookpoint names the module {where.module!r} by path, "
                    "but the SiteTable has no root model; build it as SiteTable(model)"
                )
            from .modules import get_module

            where = replace(where, module=get_module(self.root, where.module))
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

    # -- reading the table -----------------------------------------------------------------------
    def infos(self) -> dict[str, SiteInfo]:
        """Site name → `SiteInfo`, in forward order (what `Backend.sites` returns)."""
        return {name: info for name, (info, _) in self.items()}

    def info(self, name: str) -> SiteInfo:
        """The `SiteInfo` of the site ``name`` (a canonical site name)."""
        return self[name][0]

    def hookpoint(self, name: str) -> Hookpoint | None:
        """Where the site ``name`` lives (None: the backend produces it itself)."""
        return self[name][1]

    def names(self, kind: str | None = None, hooked: bool | None = None) -> list[str]:
        """Site names in forward order, optionally only of ``kind`` ("token"/"state") and only
        those with (``hooked=True``) or without (``False``) a hookpoint."""
        return [
            n
            for n, (info, hp) in self.items()
            if (kind is None or info.kind == kind)
            and (hooked is None or (hp is not None) == hooked)
        ]

    @classmethod
    def of(cls, table: Any) -> SiteTable:
        """``table`` as a `SiteTable`: a SiteTable is returned as is; a mapping of name →
        (SiteInfo, Hookpoint) pairs (0.2 backends) or of name → SiteInfo is copied in order."""
        if isinstance(table, SiteTable):
            return table
        out = cls()
        for name, entry in dict(table).items():
            info, where = (entry, None) if isinstance(entry, SiteInfo) else entry
            out[str(name)] = (info, where)
        return out
