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
