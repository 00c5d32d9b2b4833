"""A toy backend for a toy model; torch is imported only when a model is built or run."""

from __future__ import annotations

from archscope.engine import HookBackend, Hookpoint, SiteTable


class ToyBackend(HookBackend):
    name = "toy"
    description = "toy residual model (test plugin)"
    capabilities = frozenset({"residual", "unembed", "logits", "edit"})

    @classmethod
    def can_handle(cls, model):
        return 0.9 if type(model).__name__ == "ToyModel" else None

    def site_table(self):
        m = self.model
        table = SiteTable(m)
        table.add("embed", Hookpoint("blocks.0", io="input", arg="h"), dim=m.d_model)
        for i in range(len(m.blocks)):
            table.add(f"layer_{i}.residual", Hookpoint(f"blocks.{i}"), dim=m.d_model)
        table.add("logits", Hookpoint("head"), dim=m.vocab)
        return table

    def input_limits(self):
        # the embed site is read at the first block's input, so the core cannot find the
        # vocabulary from it: say it here
        from archscope.guards import InputLimits

        return InputLimits(vocab_size=self.model.vocab)

    def unembed(self, residual):
        return self.model.head(residual)


def _model_class():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin = nn.Linear(d, d)

        def forward(self, h, mask=None):
            return (h + torch.tanh(self.lin(h)), None)

    class ToyModel(nn.Module):
        def __init__(self, vocab=17, d_model=8, n_layers=3):
            super().__init__()
            self.vocab, self.d_model = vocab, d_model
            self.emb = nn.Embedding(vocab, d_model)
            self.blocks = nn.ModuleList(Block(d_model) for _ in range(n_layers))
            self.head = nn.Linear(d_model, vocab)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            for block in self.blocks:
                h = block(h)[0]
            return self.head(h)

    return ToyModel


def build_toy(seed: int = 0, **kwargs):
    import torch

    torch.manual_seed(seed)
    return _model_class()(**kwargs).eval()


def load_toy(rest: str, dtype=None, device="cpu"):
    model = build_toy(int(rest.rsplit("-", 1)[-1] or 0)).to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model, None


def claims(spec: str) -> bool:
    return spec.startswith("toy-seed-")


def toy_norms(backend, inputs):
    from archscope.methods.stats import activation_stats

    return activation_stats(backend, inputs)
