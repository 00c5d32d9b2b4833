"""The registered patching methods (``patch``, ``patch-sweep``, ``attribution-patch``, ``dim``,
``state-patch``): a `Contrast` of clean/corrupted inputs in, a result out, with the default
metric `LogitDiff` (clean top token minus corrupted top token at the last real position)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from ...data import Contrast, pad_batch, padding_for
from ...params import Param
from ...registry import method
from ._patch import activation_patch, dim_decompose, patch_sweep
from ._qk import attention_node_sweep
from ._results import DIMResult, PatchResult, PatchSweep, StatePatchResult
from ._state import state_patch_sweep

Positions = Annotated[
    str,
    Param(
        help="all, last, or real-token indices such as 0,3,-1 "
        "(counted among real tokens; -1 = last)"
    ),
]
Layers = Annotated[list[int] | None, Param(help="layer indices (default: every layer)")]
Role = Annotated[
    str | None,
    Param(
        help="site role to patch: residual, attn, mlp, mixer, "
        "hidden, cell, ... (default: the main per-layer site)"
    ),
]
BatchSize = Annotated[int, Param(min=1, help="rows per patched forward pass")]


def batches(backend: Any, data: Contrast) -> tuple[dict[str, Any], dict[str, Any]]:
    """The clean and corrupted sides as token batches padded for ``backend``."""
    side = padding_for(backend)
    clean, corrupted = data.datasets()
    pad = int(getattr(data.tokenizer, "pad_token_id", None) or 0)
    return pad_batch(clean.ids(), side, pad), pad_batch(corrupted.ids(), side, pad)


@method(
    "patch",
    "Activation patching: clean activations at chosen sites and positions patched "
    "into the corrupted run; gap restored",
    requires={"edit", "logits"},
    input="contrast",
    quick={"positions": "last"},
)
def patch_method(
    backend: Any,
    data: Contrast,
    *,
    layers: Layers = None,
    site: Role = None,
    positions: Positions = "all",
) -> PatchResult:
    """Patch the clean run's activations at ``site`` of ``layers`` (all together) into the
    corrupted run."""
    clean, corrupted = batches(backend, data)
    chosen = list(range(backend.n_layers)) if layers is None else layers
    return activation_patch(backend, clean, corrupted, chosen, None, site=site, positions=positions)


@method(
    "patch-sweep",
    "Gap restored per layer x position (or layer x component), batched patched runs",
    requires={"edit", "logits"},
    input="contrast",
    quick={"positions": "last", "batch_size": 16},
)
def patch_sweep_method(
    backend: Any,
    data: Contrast,
    *,
    layers: Layers = None,
    axis: Literal["position", "component"] = "position",
    site: Role = None,
    embed: Annotated[bool, Param(help="add the embedding row")] = False,
    positions: Positions = "all",
    attribution: bool = False,
    batch_size: BatchSize = 64,
) -> PatchSweep:
    """Gap restored per layer × position (or layer × component), each cell patched alone."""
    clean, corrupted = batches(backend, data)
    return patch_sweep(
        backend,
        clean,
        corrupted,
        layers=layers,
        axis=axis,
        site=site,
        embed=embed,
        positions=positions,
        attribution=attribution,
        batch_size=batch_size,
    )


@method(
    "attribution-patch",
    "Attribution patching (AtP): a whole sweep from one forward and one backward "
    "pass, optionally beside the exact sweep",
    requires={"edit", "logits"},
    input="contrast",
    quick={"positions": "last"},
)
def attribution_patch_method(
    backend: Any,
    data: Contrast,
    *,
    layers: Layers = None,
    axis: Literal["position", "component"] = "position",
    site: Role = None,
    embed: Annotated[bool, Param(help="add the embedding row")] = False,
    positions: Positions = "all",
    exact: bool = False,
    batch_size: BatchSize = 64,
    node: Annotated[
        Literal["site", "key", "query"],
        Param(help="what a cell patches: the site, or an attention layer's keys or queries"),
    ] = "site",
    estimator: Annotated[
        Literal["atp", "atp*"],
        Param(
            help="atp*: the attention softmax of patched query-key logits exact (node key/query)"
        ),
    ] = "atp",
    grad_drop: Annotated[
        bool, Param(help="GradDrop: mean |estimate| over passes with one layer's gradient dropped")
    ] = False,
) -> PatchSweep:
    """Attribution patching (AtP): every cell from one forward and one backward pass;
    ``exact`` adds the exact sweep and the correlation of the two. ``node`` key or query:
    the cells are an attention layer's keys or queries per position (``estimator`` atp* for
    AtP*'s exact softmax); ``grad_drop`` adds GradDrop (estimates magnitudes)."""
    clean, corrupted = batches(backend, data)
    if node != "site":
        if axis != "position" or site is not None or embed:
            from ...errors import InputError

            raise InputError(
                f"node={node!r} sweeps attention layers x positions: leave axis, site and "
                "embed at their defaults"
            )
        return attention_node_sweep(
            backend,
            clean,
            corrupted,
            node=node,
            estimator=estimator,
            grad_drop=grad_drop,
            layers=layers,
            positions=positions,
            exact=exact,
            batch_size=batch_size,
        )
    if estimator != "atp":
        from ...errors import InputError

        raise InputError(
            f"estimator={estimator!r} recomputes the attention softmax of patched query-key "
            "logits, so it needs node='key' or node='query'; a site cell's estimate is plain "
            "AtP (add grad_drop=True for GradDrop)"
        )
    return patch_sweep(
        backend,
        clean,
        corrupted,
        layers=layers,
        axis=axis,
        site=site,
        embed=embed,
        positions=positions,
        exact=exact,
        attribution=True,
        batch_size=batch_size,
        grad_drop=grad_drop,
    )


@method(
    "dim",
    "DIM decomposition: share of the gap carried by attention / mixer / MLP outputs",
    requires={"edit", "components", "logits"},
    input="contrast",
    quick={"positions": "last"},
)
def dim_method(
    backend: Any,
    data: Contrast,
    *,
    layers: Layers = None,
    components: Annotated[
        list[str] | None, Param(help="attention, mixer, mlp (default: those the layers have)")
    ] = None,
    positions: Positions = "all",
) -> DIMResult:
    """Share of the clean−corrupted gap carried by each component's outputs at ``layers``."""
    clean, corrupted = batches(backend, data)
    chosen = list(range(backend.n_layers)) if layers is None else layers
    return dim_decompose(
        backend,
        clean,
        corrupted,
        chosen,
        None,
        tuple(components) if components else ("attention", "mlp"),
        positions=positions,
    )


@method(
    "state-patch",
    "State patching: swap each layer's recurrent state (per kind) after a prefix; gap restored",
    requires={"state_patch", "logits"},
    input="contrast",
)
def state_patch_method(
    backend: Any,
    data: Contrast,
    *,
    suffix_tokens: Annotated[
        int | None,
        Param(
            min=1,
            help="last real tokens of the corrupted input run after the state swap (default 1)",
        ),
    ] = None,
    after: Annotated[
        int | None,
        Param(min=0, help="swap after this real-token position instead (0 = the first token)"),
    ] = None,
    layers: Layers = None,
    batch_size: BatchSize = 64,
) -> StatePatchResult:
    """Swap each layer's recurrent state (per kind) from the clean prefix into the corrupted
    one and continue on the shared suffix."""
    clean, corrupted = batches(backend, data)
    return state_patch_sweep(
        backend,
        clean,
        corrupted,
        suffix_tokens=suffix_tokens,
        after=after,
        layers=layers,
        batch_size=batch_size,
    )
