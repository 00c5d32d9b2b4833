"""`collect`: the one streaming primitive that runs a dataset through a backend in batches and
returns pooled or per-real-token activations with labels and provenance kept aligned. Every
data-driven method (probes, SAEs, lenses, the activation store) reads activations through it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .batch import pool as pool_tokens
from .batch import real_tokens
from .data import as_dataset, padding_for
from .errors import InputError, SiteError

if TYPE_CHECKING:
    import torch

    from .backends import Backend, Edit

Pooling = Literal["mean", "last"] | None


@dataclass
class Collected:
    """Activations of one or more sites over a dataset (or one batch of it).

    Pooled (``pool='mean'|'last'``): one row per text, ``doc`` = the text's index. Per token
    (``pool=None``): one row per real token, with ``doc`` (text index), ``position`` (index
    among that text's real tokens) and ``token_ids``. ``labels`` follows the rows.
    """

    activations: dict[str, torch.Tensor]
    doc: torch.Tensor
    labels: torch.Tensor | None = None
    position: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    pool: Pooling = "mean"
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, site: str) -> torch.Tensor:
        from .sites import Site

        key = str(Site.parse(site))
        if key not in self.activations:
            raise SiteError(f"{key!r} was not collected; collected: {sorted(self.activations)}")
        return self.activations[key]

    def __len__(self) -> int:
        return int(self.doc.shape[0])

    @classmethod
    def concat(cls, parts: Sequence[Collected]) -> Collected:
        """Batches of one collection, joined in order."""
        import torch

        if not parts:
            raise InputError("nothing was collected (the data was empty)")

        def cat(name: str) -> Any:
            first = getattr(parts[0], name)
            return None if first is None else torch.cat([getattr(p, name) for p in parts])

        return cls(
            activations={
                k: torch.cat([p.activations[k] for p in parts]) for k in parts[0].activations
            },
            doc=torch.cat([p.doc for p in parts]),
            labels=cat("labels"),
            position=cat("position"),
            token_ids=cat("token_ids"),
            pool=parts[0].pool,
            meta=dict(parts[0].meta),
        )


def _site_names(backend: Backend, sites: Iterable[str] | str, pool: Pooling) -> list[str]:
    if isinstance(sites, str):
        sites = [sites]
    names = []
    for site in sites:
        info = backend.site_info(site)
        if info.kind == "token" and len(info.shape) != 3:
            raise SiteError(
                f"collect reads (batch, seq, features) sites; {info.name} has axes "
                f"{info.shape}; read it with backend.run instead"
            )
        if info.kind == "state" and pool is None:
            raise SiteError(
                f"{info.name} is a state site (one value per sequence): collect it "
                "with pool='last' or pool='mean', not per token"
            )
        names.append(info.name)
    if not names:
        raise InputError("collect needs at least one site")
    return names


def iter_collect(
    backend: Backend,
    data: Any,
    sites: Iterable[str] | str,
    *,
    pool: Pooling = "mean",
    batch_size: int = 32,
    tokenizer: Any = None,
    edits: Sequence[Edit] = (),
    progress: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[Collected]:
    """`collect`, one `Collected` per batch (``doc`` holds indices into the whole dataset)."""
    import torch

    if pool not in ("mean", "last", None):
        raise InputError(f"pool must be 'mean', 'last' or None (every real token), got {pool!r}")
    dataset = as_dataset(data, tokenizer)
    if dataset.texts is not None:
        from .tokens import check_fits

        check_fits(dataset.tokenizer, backend)
    names = _site_names(backend, sites, pool)
    labels = dataset.label_tensor
    n_batches = -(-len(dataset) // max(batch_size, 1))
    batches: Iterable[tuple[list[int], dict[str, torch.Tensor]]] = dataset.batches(
        batch_size, padding_for(backend)
    )
    if progress or (progress is None and n_batches >= 20):
        from tqdm.auto import tqdm

        batches = tqdm(
            batches,
            total=n_batches,
            desc="collect",
            unit="batch",
            disable=None if progress is None else not progress,
        )
    for idx, batch in batches:
        result = backend.run(batch, capture=names, edits=list(edits))
        mask = batch["attention_mask"].to(
            result.attention_mask.device if result.attention_mask is not None else "cpu"
        )
        doc = torch.tensor(idx, dtype=torch.long)
        acts: dict[str, torch.Tensor] = {}
        for name in names:
            value = result.activations[name]
            if backend.site_info(name).kind == "state":
                value = value.reshape(value.shape[0], -1)
            elif pool is None:
                value = real_tokens(value, mask)
            else:
                value = pool_tokens(value, mask, pool)
            value = value.detach()
            acts[name] = (value.to(dtype) if dtype is not None else value).cpu()
        if pool is None:
            lengths = batch["attention_mask"].sum(1)
            rows = doc.repeat_interleave(lengths)
            position = torch.cat([torch.arange(int(n)) for n in lengths])
            token_ids = batch["input_ids"][batch["attention_mask"].bool()]
            yield Collected(
                acts, rows, None if labels is None else labels[rows], position, token_ids, pool
            )
        else:
            yield Collected(acts, doc, None if labels is None else labels[doc], pool=pool)


def collect(
    backend: Backend,
    data: Any,
    sites: Iterable[str] | str,
    *,
    pool: Pooling = "mean",
    batch_size: int = 32,
    tokenizer: Any = None,
    edits: Sequence[Edit] = (),
    progress: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Collected:
    """Run ``data`` through ``backend`` in batches and return the activations of ``sites``.

    ``data``: an `archscope.data.Dataset`, texts (with ``tokenizer``), token-id lists, a token
    batch or a tensor of ids. ``pool='mean'|'last'`` gives one vector per text over its real
    tokens (state sites: their flattened value); ``pool=None`` every real token. Padding never
    counts; every site comes from one forward pass per batch, stopped after the deepest site.
    """
    return Collected.concat(
        list(
            iter_collect(
                backend,
                data,
                sites,
                pool=pool,
                batch_size=batch_size,
                tokenizer=tokenizer,
                edits=edits,
                progress=progress,
                dtype=dtype,
            )
        )
    )
