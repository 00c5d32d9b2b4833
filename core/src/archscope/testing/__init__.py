"""The conformance kit: the tests every archscope backend must pass.

Subclass `BackendContract` in your plugin's test suite, name your backend and distribution,
and provide small models of your architecture; every inherited ``test_*`` checks one part of
the contract for each model (one pytest item per check and model) and, when it fails, says
what to fix. See docs/plugin-authors.md. Needs pytest: ``pip install 'archscope[testing]'``.

```python
from archscope.testing import BackendContract

class TestMyBackend(BackendContract):
    backend_name = "mymodel"
    distribution = "archscope-mymodel"

    def make_models(self):
        return {"tiny": build_tiny_model()}

    def reference_activations(self, model, batch):
        return {...}  # values computed without archscope, e.g. with your own forward hooks
```
"""

from __future__ import annotations

from ..errors import DependencyError

try:
    import pytest  # noqa: F401  (the kit's checks are pytest tests)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without pytest
    raise DependencyError(
        "archscope.testing is a pytest kit and pytest is not installed: "
        "pip install 'archscope[testing]'"
    ) from exc

from .backend_contract import BackendContract
from .batches import HEAVY_MODULES, padded_batch
from .freezing import check_frozen
from .methods import MethodContract, method_data
from .untouched import hook_ids, unchanged

__all__ = [
    "HEAVY_MODULES",
    "BackendContract",
    "MethodContract",
    "check_frozen",
    "hook_ids",
    "method_data",
    "padded_batch",
    "unchanged",
]
