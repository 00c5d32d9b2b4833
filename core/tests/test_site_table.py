"""The one way to declare sites: `SiteTable` with module paths, forward order from the order of
`add`, and views that see the run (its shape, per-run data and a module's whole output).

References are computed by hand from the model's own sub-modules, never through the engine.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import pytest
import torch
from torch import nn

from archscope import Edit
from archscope.backends import Backend, BackendError, RunRequest
from archscope.engine import HookBackend, Hookpoint, RunContext, SiteTable, View


class PairBlock(nn.Module):
    """Returns ``(hidden, residual)`` whose sum is the stream (as native Mamba blocks do)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> Any:
        return torch.tanh(self.lin(h)), h


class FlatMLP(nn.Module):
    """Works on (batch * seq, d), as OPT's MLP does."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, flat: torch.Tensor) -> Any:
        return self.lin(flat)


class Model(nn.Module):
    def __init__(self, vocab: int = 19, d: int = 6, n_layers: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PairBlock(d) for _ in range(n_layers))
        self.mlps = nn.ModuleList(FlatMLP(d) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor) -> Any:
        batch, seq = input_ids.shape
        h = self.emb(input_ids)
        for block, mlp in zip(self.blocks, self.mlps, strict=True):
            hidden, residual = block(h)
            h = hidden + residual
            h = h + mlp(h.reshape(batch * seq, -1)).view(batch, seq, -1)
        return self.head(h)

    def layers(self) -> list[tuple[PairBlock, FlatMLP]]:
        return [
            (cast(PairBlock, b), cast(FlatMLP, m))
            for b, m in zip(self.blocks, self.mlps, strict=True)
        ]

    def reference(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        h = self.emb(input_ids)
        for i, (block, mlp) in enumerate(self.layers()):
            h = torch.tanh(block.lin(h)) + h
            out[f"layer_{i}.mixer"] = h
            m = mlp.lin(h)
            out[f"layer_{i}.mlp"] = m
            h = h + m
        return out


class SumView(View):
    """The stream is the sum of a block's two outputs; an edit is written as (0, stream)."""

    def read(self, raw: Any, run: RunRequest) -> torch.Tensor:
        run.extra["sum_reads"] = run.extra.get("sum_reads", 0) + 1
        hidden, residual = raw
        return cast(torch.Tensor, hidden + residual)

    def write(self, value: torch.Tensor, raw: Any, run: RunRequest) -> Any:
        return (torch.zeros_like(raw[0]), value)


class Unflatten(View):
    seen: ClassVar[list[tuple[int, int]]] = []

    def read(self, raw: Any, run: RunRequest) -> torch.Tensor:
        self.seen.append((run.batch_size, run.seq_len))
        return cast(torch.Tensor, raw.view(run.batch_size, run.seq_len, raw.shape[-1]))

    def write(self, value: torch.Tensor, raw: Any, run: RunRequest) -> Any:
        return value.reshape(raw.shape)


class ViewBackend(HookBackend):
    name = "views"
    capabilities = frozenset({"components", "edit"})

    def site_table(self) -> SiteTable:
        d = self.model.emb.embedding_dim
        table = SiteTable(self.model)
        for i in range(len(self.model.blocks)):
            table.add(f"layer_{i}.mixer", Hookpoint(f"blocks.{i}", index=None, view=SumView()), d)
            table.add(f"layer_{i}.mlp", Hookpoint(f"mlps.{i}", view=Unflatten()), d)
        return table


@pytest.fixture
def model() -> Model:
    torch.manual_seed(0)
    return Model().eval()


def test_module_paths_order_and_views_see_the_run(model: Model) -> None:
    backend = ViewBackend(model)
    ids = torch.randint(0, 19, (2, 5))
    ref = model.reference(ids)
    names = list(backend.sites())
    assert names == [f"layer_{i}.{r}" for i in range(3) for r in ("mixer", "mlp")]
    assert [backend.sites()[n].order for n in names] == sorted(
        backend.sites()[n].order for n in names
    )
    hookpoint = backend.hookpoint("layer_1.mlp")
    assert hookpoint is not None and hookpoint.module is model.mlps[1]  # path resolved
    Unflatten.seen.clear()
    result = backend.run(ids, capture=names)
    for name in names:
        torch.testing.assert_close(result[name], ref[name])
    assert Unflatten.seen == [(2, 5)] * 3


def test_views_write_edits_back_in_the_raw_layout(model: Model) -> None:
    backend = ViewBackend(model)
    ids = torch.randint(0, 19, (2, 5))
    shift = torch.randn(6)
    result = backend.run(
        ids,
        capture=["layer_2.mlp"],
        edits=[Edit.add("layer_0.mixer", shift), Edit.scale("layer_1.mlp", 0.0)],
    )
    h = model.emb(ids)
    for i, (block, mlp) in enumerate(model.layers()):
        h = torch.tanh(block.lin(h)) + h + (shift if i == 0 else 0)
        m = mlp.lin(h) * (0 if i == 1 else 1)
        h = h + m
    torch.testing.assert_close(result["layer_2.mlp"], m)
    assert not any(b._forward_hooks for b in model.blocks)  # no hook left attached


def test_a_module_path_needs_a_root_and_must_exist(model: Model) -> None:
    with pytest.raises(BackendError, match=r"SiteTable\(model\)"):
        SiteTable().add("embed", Hookpoint("emb"), 6)
    with pytest.raises(BackendError, match="no module 'blocks.9'"):
        SiteTable(model).add("embed", Hookpoint("blocks.9"), 6)
    with pytest.raises(BackendError, match="either a view or to_site"):
        Hookpoint(model.emb, view=View(), to_site=lambda raw: raw)
    with pytest.raises(BackendError, match="index"):
        Hookpoint(model.emb, io="input", index=None)


def test_every_backend_returns_one_table_type_and_one_run_object(model: Model) -> None:
    class Computed(Backend):  # a backend that produces every site itself
        name = "computed"

        def site_table(self) -> SiteTable:
            table = SiteTable()
            table.add("layer_0.hidden", None, 6)
            return table

    assert isinstance(ViewBackend(model).table, SiteTable)
    assert isinstance(Computed(model).table, SiteTable)
    assert Computed(model).table.names(hooked=False) == ["layer_0.hidden"]
    assert RunContext is RunRequest
