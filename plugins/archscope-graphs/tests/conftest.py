"""A tiny `Transcoder` for the tests, and a short training loop of its own.

The loop here fits transcoders on a model's own MLP inputs and outputs so that the graph tests
do not depend on the package's transcoder trainer; when that trainer is available these
fixtures should be switched to it (marked below)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Small matrices: on a shared machine torch's intra-op threads cost far more than they
    give (a training step measured 60x slower with 2 threads under load). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


class TinyTranscoder:
    """A ReLU transcoder: ``a = relu(W_enc (x − b_pre) + b_enc)``, written to each site as
    ``a W_dec[site] + b_dec[site]``, with an optional linear skip ``x W_skip[site]``."""

    def __init__(
        self,
        read_site: str,
        write_sites: tuple[str, ...],
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        w_dec: dict[str, torch.Tensor],
        b_dec: dict[str, torch.Tensor],
        w_skip: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.read_site = read_site
        self.write_sites = write_sites
        self.n_features = int(w_enc.shape[0])
        self.w_enc, self.b_enc = w_enc, b_enc
        self.w_dec, self.b_dec = w_dec, b_dec
        self.w_skip = w_skip or {}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.float() @ self.w_enc.T + self.b_enc)

    def decode(self, acts: torch.Tensor, site: str) -> torch.Tensor:
        return acts @ self.w_dec[site] + self.b_dec[site]

    def encoder(self) -> torch.Tensor:
        return self.w_enc

    def decoder(self, site: str) -> torch.Tensor:
        return self.w_dec[site]

    def skip(self, x: torch.Tensor, site: str) -> torch.Tensor | None:
        w = self.w_skip.get(site)
        return None if w is None else x.float() @ w


def random_transcoders(
    d_model: int, n_layers: int, n_features: int = 16, seed: int = 0, skip: bool = False
) -> list[TinyTranscoder]:
    """Untrained single-layer transcoders (positive encoder bias, so many features fire)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(n_layers):
        site = f"layer_{layer}.mlp"

        def r(*shape: int, scale: float = 0.3) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * scale

        out.append(
            TinyTranscoder(
                f"layer_{layer}.mlp_in",
                (site,),
                r(n_features, d_model),
                r(n_features).abs() * 0.2,
                {site: r(n_features, d_model)},
                {site: r(d_model, scale=0.05)},
                {site: r(d_model, d_model, scale=0.1)} if skip else None,
            )
        )
    return out


def train_transcoders(
    backend: Any, ids: torch.Tensor, n_features: int = 64, steps: int = 300, seed: int = 0
) -> list[TinyTranscoder]:
    """Fit one ReLU transcoder per layer on ``ids`` (the model's MLP input → MLP output), with
    an L1 penalty. (To be switched to the package's trainer once it is on this branch.)"""
    with one_thread():
        return _train(backend, ids, n_features, steps, seed)


def _train(
    backend: Any, ids: torch.Tensor, n_features: int, steps: int, seed: int
) -> list[TinyTranscoder]:
    sites = [f"layer_{i}.mlp_in" for i in range(backend.n_layers)]
    outs = [f"layer_{i}.mlp" for i in range(backend.n_layers)]
    acts = backend.run(ids, capture=[*sites, *outs]).activations
    torch.manual_seed(seed)
    result = []
    for read, write in zip(sites, outs, strict=True):
        x = acts[read].reshape(-1, acts[read].shape[-1]).float()
        y = acts[write].reshape(-1, acts[write].shape[-1]).float()
        d = x.shape[-1]
        w_enc = torch.nn.Parameter(torch.randn(n_features, d) / d**0.5)
        b_enc = torch.nn.Parameter(torch.zeros(n_features))
        w_dec = torch.nn.Parameter(torch.randn(n_features, y.shape[-1]) * 0.01)
        b_dec = torch.nn.Parameter(y.mean(0).clone())
        opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-2)
        for _ in range(steps):
            a = torch.relu(x @ w_enc.T + b_enc)
            loss = (a @ w_dec + b_dec - y).pow(2).mean() + 1e-3 * a.abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        result.append(
            TinyTranscoder(
                read,
                (write,),
                w_enc.detach(),
                b_enc.detach(),
                {write: w_dec.detach()},
                {write: b_dec.detach()},
            )
        )
    return result


@pytest.fixture(scope="session")
def tiny_llama() -> Any:
    import archscope
    from archscope_transformer.testing import tiny_model

    model = tiny_model("llama", n_layers=2)
    return archscope.Backend.for_model(model)


@pytest.fixture(scope="session")
def tiny_gpt2() -> Any:
    import archscope
    from archscope_transformer.testing import tiny_model

    model = tiny_model("gpt2", n_layers=2)
    return archscope.Backend.for_model(model)


@pytest.fixture(scope="session")
def zoo() -> Any:
    """The zoo's transformer, Mamba and LSTM: name -> (model, tokenizer, backend)."""
    import archscope_zoo

    return {name: archscope_zoo.load(name) for name in ("transformer", "mamba", "lstm")}


@pytest.fixture(scope="session")
def zoo_transcoders(zoo: Any) -> list[TinyTranscoder]:
    """Transcoders of the zoo transformer's MLPs, fitted on a few held-out documents (the
    package's own trainer should replace `train_transcoders` once it is on this branch)."""
    import archscope_zoo

    _, tokenizer, backend = zoo["transformer"]
    rows = [tokenizer.encode(t)[:40] for t in archscope_zoo.datasets("heldout", n=32)]
    rows = [r for r in rows if len(r) == 40]
    return train_transcoders(backend, torch.tensor(rows), n_features=64, steps=300)


@pytest.fixture(scope="session")
def make_transcoders() -> Any:
    """`random_transcoders` (test modules are not importable from each other)."""
    return random_transcoders


@pytest.fixture(scope="session")
def transcoder_class() -> type[TinyTranscoder]:
    return TinyTranscoder


@pytest.fixture(scope="session")
def tiny_fitted(tiny_llama: Any, tiny_gpt2: Any) -> dict[str, list[TinyTranscoder]]:
    """Transcoders fitted to the tiny llama's and gpt2's MLPs on random token ids."""
    ids = torch.randint(4, 90, (16, 24), generator=torch.Generator().manual_seed(5))
    return {
        "llama": train_transcoders(tiny_llama, ids, n_features=64, steps=200),
        "gpt2": train_transcoders(tiny_gpt2, ids, n_features=64, steps=200),
    }


@pytest.fixture(scope="session")
def tiny_hybrid() -> Any:
    """A tiny Qwen3.5 text model: gated delta nets and attention layers, dense MLPs."""
    import archscope
    from archscope_hybrid.testing import make_model, missing

    reason = missing("qwen3_5_text")
    if reason is not None:  # the oldest transformers the packages allow lacks the family
        pytest.skip(reason)
    return archscope.Backend.for_model(make_model("qwen3_5_text"))


# -- attention heads and induction prompts (shared by the head and induction tests) -------------
def zero_heads(model: Any, layer: int, heads: Any) -> Any:
    """Zero the outputs of ``heads`` (an int or several) of ``layer`` of a Hugging Face GPT-2
    or Llama model: a forward pre-hook on the output projection, whose input holds the heads'
    outputs side by side. Returns the hook's handle (``.remove()`` it)."""
    config = model.config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = [heads] if isinstance(heads, int) else list(heads)
    if hasattr(model, "transformer"):
        proj = model.transformer.h[layer].attn.c_proj
    else:
        proj = model.model.layers[layer].self_attn.o_proj

    def pre(module: Any, args: Any) -> Any:
        x = args[0].clone()
        for head in heads:
            x[..., head * dim : (head + 1) * dim] = 0
        return (x,)

    return proj.register_forward_pre_hook(pre)


class CopyingPrompt(NamedTuple):
    """An induction prompt cut ``k`` tokens into the span's second showing: ``ids`` (1, seq),
    the span's first showing at ``first`` (``length`` tokens), the token being copied at
    ``copied`` (= first + k) and its id ``target``, which the model predicts next."""

    ids: torch.Tensor
    first: int
    length: int
    copied: int
    target: int


def copying_prompts(zoo: Any, n: int = 12, k: int = 2) -> Iterator[CopyingPrompt]:
    """The zoo's induction prompts (of the first ``n``) on which the zoo transformer copies."""
    import archscope_zoo

    _, tokenizer, backend = zoo["transformer"]
    data = archscope_zoo.datasets("induction", n=n)
    for text, span, (first, second) in zip(data.texts, data.spans, data.starts, strict=True):
        if len(span) <= k:
            continue
        ids = torch.tensor([tokenizer.encode(" ".join(text.split()[: second + k]))])
        target = tokenizer.encode(span[k])[0]
        logits = backend.run(ids, capture=["logits"]).logits[0, -1]
        if int(logits.argmax()) == target:
            yield CopyingPrompt(ids, first, len(span), first + k, target)


@pytest.fixture(scope="session")
def head_zeroing() -> Any:
    """`zero_heads` (test modules are not importable from each other)."""
    return zero_heads


@pytest.fixture(scope="session")
def induction_prompts() -> Any:
    """`copying_prompts`."""
    return copying_prompts


#: the zoo LSTM's prompts for the site-feature graphs (zoo corpus words)
LSTM_PROMPTS = [
    "tom eats the bread . then tom eats the",
    "the cat sat on the mat and the dog",
    "zoe likes the wind . olga likes the season . so zoe likes the",
]


def zoo_site_features(
    zoo: Any, name: str, sites: list[str], prompts: list[str], threads: int | None = 1
) -> dict[str, Any]:
    """The zoo model ``name`` with TopK SAEs (256 features, k = 8) on ``sites``, trained by
    the core's ``train_saes`` on 60 held-out documents, as graph features
    (`archscope_graphs.site_features`): ``backend``, ``tokenizer``, ``saes``, ``features``
    (pass as ``transcoders=``), ``prompts`` (``prompts`` as (1, seq) ids). ``threads=1``
    trains on one torch thread (None: as set)."""
    import contextlib

    import archscope_zoo
    from archscope.methods.sae import train_saes
    from archscope_graphs.site_features import site_features

    _, tokenizer, backend = zoo[name]
    with one_thread() if threads == 1 else contextlib.nullcontext():
        saes = train_saes(
            backend,
            archscope_zoo.datasets("heldout", n=60),
            sites,
            sae_type="topk",
            n_features=256,
            k=8,
            epochs=3,
            tokenizer=tokenizer,
            progress=False,
        )
    return {
        "backend": backend,
        "tokenizer": tokenizer,
        "saes": saes,
        "features": site_features(backend, saes),
        "prompts": [torch.tensor([tokenizer.encode(t)]) for t in prompts],
    }


@pytest.fixture(scope="session")
def make_site_features(zoo: Any) -> Any:
    """`zoo_site_features` bound to the session's zoo models: ``make_site_features(name,
    sites, prompts, threads=1)``."""

    def make(
        name: str, sites: list[str], prompts: list[str], threads: int | None = 1
    ) -> dict[str, Any]:
        return zoo_site_features(zoo, name, sites, prompts, threads)

    return make


@pytest.fixture(scope="session")
def lstm_site_features(zoo: Any) -> dict[str, Any]:
    """The zoo LSTM with site features on ``layer_0.hidden`` and ``layer_1.hidden``
    (`zoo_site_features`), prompts `LSTM_PROMPTS`."""
    return zoo_site_features(zoo, "lstm", ["layer_0.hidden", "layer_1.hidden"], LSTM_PROMPTS)
