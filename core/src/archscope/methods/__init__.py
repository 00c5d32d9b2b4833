"""The core's built-in methods, registered through the same hook as any method plugin.

Each method's code lives in its own module and is imported only when the method runs.
"""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import Method


@hookimpl
def register_methods(register: Callable[..., None]) -> None:
    register(Method(
        name="activation-stats",
        summary="Per-site mean norm and variance over real tokens (a first look at any model)",
        function="archscope.methods.stats:activation_stats",
        requires=frozenset({"residual"}),
    ))
    register(Method(
        name="logit-lens",
        summary="Each layer's residual through the model's own final norm and unembedding",
        function="archscope.methods.lens:logit_lens_run",
        requires=frozenset({"residual", "unembed"}),
        quick={"top_k": 3},
    ))
    register(Method(
        name="patch",
        summary="Activation patching: clean activations at chosen sites and positions patched "
                "into the corrupted run; gap restored",
        function="archscope.attribute.methods:patch_method",
        requires=frozenset({"edit", "logits"}),
        input="contrast",
        quick={"positions": "last"},
    ))
    register(Method(
        name="patch-sweep",
        summary="Gap restored per layer x position (or layer x component), batched patched runs",
        function="archscope.attribute.methods:patch_sweep_method",
        requires=frozenset({"edit", "logits"}),
        input="contrast",
        quick={"positions": "last", "batch_size": 16},
    ))
    register(Method(
        name="attribution-patch",
        summary="Attribution patching (AtP): a whole sweep from one forward and one backward "
                "pass, optionally beside the exact sweep",
        function="archscope.attribute.methods:attribution_patch_method",
        requires=frozenset({"edit", "logits"}),
        input="contrast",
        quick={"positions": "last"},
    ))
    register(Method(
        name="dim",
        summary="DIM decomposition: share of the gap carried by attention / mixer / MLP outputs",
        function="archscope.attribute.methods:dim_method",
        requires=frozenset({"edit", "components", "logits"}),
        input="contrast",
        quick={"positions": "last"},
    ))
    register(Method(
        name="state-patch",
        summary="State patching: swap each layer's recurrent state (per kind) after a prefix; "
                "gap restored",
        function="archscope.attribute.methods:state_patch_method",
        requires=frozenset({"state_patch", "logits"}),
        input="contrast",
    ))
