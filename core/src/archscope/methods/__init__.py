"""The core's built-in methods and commands, registered through the same hooks as any plugin.

Each method's code lives in its own module and is imported only when the method runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..hookspecs import hookimpl
from ..registry import Method


@hookimpl
def register_commands(cli: Any) -> None:
    from ..apps.store.cli import add_commands

    add_commands(cli)


@hookimpl
def register_methods(register: Callable[..., None]) -> None:
    register(
        Method(
            name="activation-stats",
            summary="Per-site mean norm and variance over real tokens (a first look at any model)",
            function="archscope.methods.stats:activation_stats",
            requires=frozenset({"residual"}),
        )
    )
    register(
        Method(
            name="logit-lens",
            summary="Each layer's residual through the model's own final norm and unembedding",
            function="archscope.methods.lens:logit_lens_run",
            requires=frozenset({"residual", "unembed", "logits"}),
            quick={"top_k": 3},
        )
    )
    register(
        Method(
            name="tuned-lens",
            summary="Tuned lens (Belrose et al. 2023): per-layer affine translators trained on the "
            "data, held-out KL per layer next to the logit lens's",
            function="archscope.methods.lens:tuned_lens_method",
            requires=frozenset({"residual", "unembed", "logits"}),
            input="dataset",
            quick={"epochs": 2, "batch_size": 4},
        )
    )
    register(
        Method(
            name="circuits",
            summary="Induction, copy and next-token concentration scores (per-head induction and "
            "previous-token scores where attention patterns exist)",
            function="archscope.methods.circuits:circuits_method",
            requires=frozenset({"logits"}),
            input="batch",
            quick={"n_trials": 8, "n_pairs": 5, "lead_in": 2, "n_words": 3},
        )
    )
    register(
        Method(
            name="neurons",
            summary="Units whose last-token activation differs most between two prompt sets "
            "(MLP hidden units where available), to ablate or scale",
            function="archscope.methods.neurons:neurons_method",
            requires=frozenset({"residual"}),
            input="contrast",
            quick={"top_frac": 0.05},
        )
    )
    register(
        Method(
            name="diff",
            summary="Per-layer activation drift of a fine-tuned model from its base model over "
            "real tokens",
            function="archscope.methods.diff:diff_method",
            requires=frozenset({"residual"}),
            input="dataset",
            arity=2,
            quick={"top_k_units": 5},
        )
    )
    register(
        Method(
            name="probe",
            summary="Linear or MLP probe on one site of a labelled dataset; k-fold held-out AUROC",
            function="archscope.methods.probes:probe_method",
            requires=frozenset({"residual"}),
            input="dataset",
            quick={"folds": 2, "epochs": 5},
        )
    )
    register(
        Method(
            name="probe-sweep",
            summary="A probe per layer from one pass of the data; held-out AUROC per layer",
            function="archscope.methods.probes:probe_sweep",
            requires=frozenset({"residual"}),
            input="dataset",
            quick={"folds": 2, "epochs": 5},
        )
    )
    register(
        Method(
            name="transfer",
            summary="A probe trained on model A, transported to model B by ridge alignment",
            function="archscope.methods.transfer:transfer_method",
            requires=frozenset({"residual"}),
            input="dataset",
            arity=2,
            quick={"epochs": 5},
        )
    )
    register(
        Method(
            name="sae",
            summary="Train a sparse autoencoder (dense, rank-1, TopK, BatchTopK) on one site; "
            "reconstruction metrics and next-token loss with it spliced in",
            function="archscope.methods.sae:sae_method",
            input="dataset",
            arity=1,
            quick={"n_features": 64, "k": 4, "epochs": 2, "batch_size": 256},
        )
    )
    register(
        Method(
            name="patch",
            summary="Activation patching: clean activations at chosen sites and positions patched "
            "into the corrupted run; gap restored",
            function="archscope.methods.attribute.methods:patch_method",
            requires=frozenset({"edit", "logits"}),
            input="contrast",
            quick={"positions": "last"},
        )
    )
    register(
        Method(
            name="patch-sweep",
            summary="Gap restored per layer x position (or layer x component), batched patched runs",
            function="archscope.methods.attribute.methods:patch_sweep_method",
            requires=frozenset({"edit", "logits"}),
            input="contrast",
            quick={"positions": "last", "batch_size": 16},
        )
    )
    register(
        Method(
            name="attribution-patch",
            summary="Attribution patching (AtP): a whole sweep from one forward and one backward "
            "pass, optionally beside the exact sweep",
            function="archscope.methods.attribute.methods:attribution_patch_method",
            requires=frozenset({"edit", "logits"}),
            input="contrast",
            quick={"positions": "last"},
        )
    )
    register(
        Method(
            name="dim",
            summary="DIM decomposition: share of the gap carried by attention / mixer / MLP outputs",
            function="archscope.methods.attribute.methods:dim_method",
            requires=frozenset({"edit", "components", "logits"}),
            input="contrast",
            quick={"positions": "last"},
        )
    )
    register(
        Method(
            name="state-patch",
            summary="State patching: swap each layer's recurrent state (per kind) after a prefix; "
            "gap restored",
            function="archscope.methods.attribute.methods:state_patch_method",
            requires=frozenset({"state_patch", "logits"}),
            input="contrast",
        )
    )
