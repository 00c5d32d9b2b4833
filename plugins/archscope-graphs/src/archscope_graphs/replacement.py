"""The local replacement model of one prompt.

The model's MLPs (every site a transcoder writes) are replaced by their transcoders, with an
error node per (site, position) holding what the transcoder misses (true output − transcoder
output, a constant), and every other nonlinearity is frozen at the prompt's values through the
backend's ``freeze`` capability (`archscope.freeze`). At the prompt it reproduces the model's
logits exactly; around it, it is affine in what is written into the model: the token
embeddings (the ``embed`` site) and each written site's value.

Built with ``linearise="gradient"``, nothing is frozen: the same gradient runs go through
the live model, and are its first-order expansion at the prompt (not affine around it).

Gradient runs use "leaves": the ``embed`` site and every written site are replaced, through
edits, by tensors that hold the prompt's values and need a gradient; a skip term of a
transcoder (linear in its read site) is kept live, so the gradient also flows through it. The
gradient with respect to a leaf, dotted with a node's vector there (an embedding, a feature's
decoder row × its activation, an error), is that node's direct effect.

On backends without MLP-like sites (Mamba, LSTM) there are no transcoders to place: the graph's
nodes are the token embeddings and the logits (and any transcoder given over a site the
backend has), and edges run through the frozen recurrence from earlier positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from archscope import Edit
from archscope.errors import ParameterError, SiteError
from archscope.freeze import FrozenValues, freeze
from archscope.sites import Site
from archscope.tokens import encode_one

from .types import Transcoder


@dataclass
class Live:
    """One gradient run of the replacement model: the leaves and the live read sites."""

    logits: torch.Tensor
    leaves: dict[str, torch.Tensor]
    reads: dict[str, torch.Tensor]


@dataclass
class ReplacementModel:
    """The replacement model of ``prompt`` (token ids, (1, seq)) on ``backend``.

    ``embed`` (seq, d): the embedding site's value; ``reads[site]`` / ``writes[site]`` (seq, d):
    the transcoders' read and written sites; ``acts[k]`` (seq, n_features): transcoder k's
    feature activations; ``errors[site]`` (seq, d): true value − transcoders' reconstruction
    (decoder biases and skip terms included) at each written site; ``logits`` (seq, vocab):
    the model's own logits."""

    backend: Any
    prompt: torch.Tensor
    transcoders: list[Transcoder]
    embed: torch.Tensor
    reads: dict[str, torch.Tensor]
    writes: dict[str, torch.Tensor]
    acts: list[torch.Tensor]
    errors: dict[str, torch.Tensor]
    logits: torch.Tensor
    tokenizer: Any = None
    values: FrozenValues | None = None
    linearise: str = "frozen"
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    # -- building -----------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def build(
        cls,
        backend: Any,
        prompt: Any,
        transcoders: Sequence[Transcoder] | None = None,
        tokenizer: Any = None,
        linearise: str = "frozen",
    ) -> Iterator[ReplacementModel]:
        """The replacement model of ``prompt``, with the backend's nonlinearities frozen at
        its values until the context ends (every hook removed then). ``tokenizer`` (default:
        the backend's, if it has one) reads a text prompt and a text target.

        ``linearise="gradient"``: nothing is frozen; the gradient runs go through the live
        model (attention patterns, norms, gates, Δ/B/C differentiated), and a row of a graph
        built on it is the first-order expansion of its target at the prompt (see
        `LINEARISATIONS`)."""
        check_linearise(linearise, "ReplacementModel.build")
        tokenizer = tokenizer if tokenizer is not None else getattr(backend, "tokenizer", None)
        ids = _prompt_ids(backend, prompt, tokenizer)
        tcs = list(transcoders or [])
        _check_transcoders(backend, tcs)
        reads = sorted({t.read_site for t in tcs})
        writes = sorted({s for t in tcs for s in t.write_sites})
        capture = ["embed", *reads, *writes, "logits"]
        result = backend.run(ids, capture=list(dict.fromkeys(capture)))
        act = result.activations
        embed = act["embed"][0].detach()
        # (seq, d): a site with more axes per token (a state write: heads x rows x columns) is
        # flattened here and reshaped where the gradient runs place and read it
        read_values = {s: act[s][0].detach().float().flatten(1) for s in reads}
        write_values = {s: act[s][0].detach().float().flatten(1) for s in writes}
        acts = [t.encode(read_values[t.read_site]).detach() for t in tcs]
        errors = {}
        for site in writes:
            recon = torch.zeros_like(write_values[site])
            for t, a in zip(tcs, acts, strict=True):
                if site in t.write_sites:
                    recon = recon + t.decode(a, site).float()
                    skip = t.skip(read_values[t.read_site], site)
                    if skip is not None:
                        recon = recon + skip.float()
            errors[site] = (write_values[site] - recon).detach()
        model = cls(
            backend=backend,
            prompt=ids,
            transcoders=tcs,
            embed=embed,
            reads=read_values,
            writes=write_values,
            acts=acts,
            errors=errors,
            logits=act["logits"][0].detach().float(),
            tokenizer=tokenizer,
            linearise=linearise,
        )
        if linearise == "gradient":
            yield model
            return
        with freeze(backend, ids) as values:
            model.values = values
            yield model

    # -- gradient runs ------------------------------------------------------------------------
    @property
    def direct(self) -> dict[str, torch.Tensor]:
        """Each written site's value less the transcoders' skip terms (which the gradient
        runs compute live from the read sites): what the site's leaf holds."""
        out = {}
        for site, value in self.writes.items():
            for t in self.transcoders:
                if site in t.write_sites:
                    skip = t.skip(self.reads[t.read_site], site)
                    if skip is not None:
                        value = value - skip.float()
            out[site] = value
        return out

    @property
    def leaf_sites(self) -> list[str]:
        return ["embed", *self.writes]

    def run(self, batch: int, leaf_values: Mapping[str, torch.Tensor] | None = None) -> Live:
        """A gradient run of ``batch`` copies of the prompt in the frozen model (the live one
        when built with ``linearise="gradient"``): every leaf
        site holds ``leaf_values[site]`` (default: the prompt's value), as a tensor (batch, seq,
        d) that needs a gradient; ``reads`` are the read sites' live values."""
        ids = self.prompt.expand(batch, -1)
        defaults = {"embed": self.embed, **self.direct}
        leaves: dict[str, torch.Tensor] = {}
        for site in self.leaf_sites:
            value = defaults[site] if leaf_values is None else leaf_values.get(site, defaults[site])
            base = value if value.dim() == 3 else value.expand(batch, *value.shape)
            leaves[site] = base.detach().clone().requires_grad_(True)
        reads: dict[str, torch.Tensor] = {}
        calls: dict[str, list[torch.Tensor]] = {site: [] for site in self.reads}
        edits: list[Edit] = []
        for site in self.reads:

            def keep(x: torch.Tensor, site: str = site) -> torch.Tensor:
                reads[site] = x.flatten(2)
                calls[site].append(reads[site])
                return x

            edits.append(Edit.apply(site, keep))
        for site, leaf in leaves.items():
            skippers = [t for t in self.transcoders if site in t.write_sites]

            def place(
                x: torch.Tensor,
                leaf: torch.Tensor = leaf,
                site: str = site,
                skippers: Any = skippers,
            ) -> torch.Tensor:
                out = leaf.to(x.dtype)
                for t in skippers:  # the skip is linear in its read site: computed live
                    skip = t.skip(reads[t.read_site].float(), site)
                    if skip is not None:
                        out = out + skip.to(x.dtype)
                return out.reshape(x.shape)

            edits.append(Edit.apply(site, place))
        result = self.backend.run(ids, capture=["logits"], edits=edits, grad=True)
        reads.update({site: _live_read(site, seen) for site, seen in calls.items() if seen})
        return Live(logits=result.logits.float(), leaves=leaves, reads=reads)

    def leaf_zero_logits(self) -> torch.Tensor:
        """The frozen model's logits (seq, vocab) with every leaf set to zero: the frozen bias
        terms (what no node explains, decoder biases aside). Only a frozen replacement model
        is affine, so only its bias terms are a run at zero leaves: a ParameterError otherwise."""
        require_frozen(self.linearise, "leaf_zero_logits")
        zeros = {s: torch.zeros_like(v) for s, v in {"embed": self.embed, **self.direct}.items()}
        live = self.run(1, zeros)
        return live.logits[0].detach()


#: The two constructions of a graph's edges (`ReplacementModel.build`, ``attribute``):
#: "frozen" holds every nonlinearity at the prompt's values, so the replacement model is affine
#: and a row adds up to its target minus the frozen bias terms (an exact decomposition);
#: "gradient" differentiates the live model, so a row is the first-order part of its target
#: (the gradient dotted with each source's value) and faithful to small changes of the real
#: model, with no exact sum.
LINEARISATIONS = ("frozen", "gradient")


def check_linearise(linearise: Any, caller: str) -> None:
    """A ParameterError unless ``linearise`` is one of `LINEARISATIONS`."""
    if not isinstance(linearise, str) or linearise not in LINEARISATIONS:
        raise ParameterError(
            f"{caller}: linearise={linearise!r} is not a linearisation; use one of "
            f"{', '.join(repr(x) for x in LINEARISATIONS)} ('frozen': nonlinearities held at the "
            "prompt's values, rows add up exactly; 'gradient': first-order expansion of the "
            "live model)"
        )


def require_frozen(linearise: str, caller: str) -> None:
    """A ParameterError for what needs the exact decomposition (bias terms, an edge split by
    heads) on a "gradient" linearisation."""
    if linearise != "frozen":
        raise ParameterError(
            f"{caller} needs a graph built with linearise='frozen' (an exact decomposition: "
            f"rows add up to their targets minus the bias terms); this one is {linearise!r}, "
            "whose rows are first-order expansions of the live model (what a row misses is "
            "its metadata's 'linearisation_offset'). Build the graph with linearise='frozen' "
            f"to use {caller}"
        )


def _live_read(site: str, calls: list[torch.Tensor]) -> torch.Tensor:
    """A read site's live value from the values its edit saw: one call (the whole sequence at
    once), or one call per position on a backend that steps the site (an edited RNN layer:
    call t sees the positions before t already edited and position t as computed)."""
    if len(calls) == 1:
        return calls[0]
    seq = calls[0].shape[1]
    if len(calls) != seq:
        raise SiteError(
            f"the read site {site!r} was seen {len(calls)} times in one run of {seq} "
            "positions; a read site is seen once, or once per position where the backend "
            "steps it"
        )
    return torch.stack([c[:, t] for t, c in enumerate(calls)], 1)


def _prompt_ids(backend: Any, prompt: Any, tokenizer: Any = None) -> torch.Tensor:
    if isinstance(prompt, str):
        tokenizer = tokenizer if tokenizer is not None else getattr(backend, "tokenizer", None)
        if tokenizer is None:
            raise ParameterError(
                "attribute: the prompt is a string but no tokenizer was given (tokenizer=...) "
                "and the backend has none; pass a tokenizer or token ids (a list of ints or a "
                "(1, seq) tensor)"
            )
        prompt = encode_one(tokenizer, prompt)
    ids = torch.as_tensor(prompt)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0 or ids.is_floating_point():
        raise ParameterError(
            f"attribute: the prompt must be one sequence of token ids (a list of ints or a "
            f"(1, seq) integer tensor), got shape {tuple(ids.shape)} of {ids.dtype}; graphs "
            "explain one prompt at a time"
        )
    device = getattr(backend, "device", None)
    return ids.to(device) if device is not None else ids


def _check_transcoders(backend: Any, tcs: list[Transcoder]) -> None:
    sites = backend.sites()
    for t in tcs:
        if not isinstance(t, Transcoder):
            raise ParameterError(
                f"attribute: transcoders must implement archscope_graphs.Transcoder (read_site, "
                f"write_sites, n_features, encode, decode, encoder, decoder, skip); got "
                f"{type(t).__name__}"
            )
        for site in (t.read_site, *t.write_sites):
            if site not in sites:
                raise SiteError(
                    f"a transcoder uses the site {site!r}, which backend {backend.name!r} does "
                    f"not have; its token sites: "
                    f"{', '.join(n for n, i in sites.items() if i.kind == 'token')}"
                )
    by_layer: dict[int | None, str] = {}
    for t in tcs:  # feature nodes are "{layer}_{feature}_{pos}": one transcoder per layer
        layer = Site.parse(t.read_site).layer
        if layer in by_layer:
            raise ParameterError(
                f"attribute: two transcoders read layer {layer} ({by_layer[layer]} and "
                f"{t.read_site}); a graph's feature ids name the layer, so they would collide. "
                "Give one transcoder per layer (e.g. MLP transcoders or write features there)"
            )
        by_layer[layer] = t.read_site
    written = [s for t in tcs for s in t.write_sites]
    if "embed" in written:
        raise SiteError("a transcoder cannot write the 'embed' site (it is the graph's input)")
