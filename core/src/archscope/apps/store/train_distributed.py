"""Sparse-autoencoder training from an activation store with torch.distributed: each rank
streams its own shards (`StoreReader` with ``rank``/``world_size``) and DDP all-reduces the
gradients, so a step sees the global batch. Run it with torchrun::

    torchrun --nproc_per_node=2 -m archscope.apps.store.train_distributed STORE --site layer_6.residual \\
        --batch-size 4096 --steps 10000 --d-sae 16384 --k 32 --out sae_dir

(gloo on CPU, NCCL on GPUs). `train` is the same loop in one process; fed `global_batches`
it reproduces a distributed run, which is how the two are checked against each other.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .format import StoreError
from .reader import ActivationStore, StoreReader


@dataclass
class TrainConfig:
    """What a run trains: the site, the *global* batch size (split evenly over ranks), the
    number of optimiser steps, the SAE's width and k, Adam's learning rate, the seed, the
    reader's buffer, and the SAE factory (``"module:function"``, called as
    ``function(input_dim, config)``; it returns a module with ``loss(x)`` and optionally
    ``normalize_decoder()``)."""

    site: str
    batch_size: int = 4096
    steps: int = 1000
    d_sae: int = 4096
    k: int = 32
    lr: float = 1e-3
    seed: int = 0
    buffer_size: int = 65536
    chunk_size: int = 8192
    sae: str = "archscope.apps.store.train_distributed:default_sae"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StoreError(f"unknown training settings {unknown}; valid: {sorted(known)}")
        return cls(**data)


def default_sae(input_dim: int, config: TrainConfig) -> Any:
    """A TopK SAE from `archscope.methods.sae`, without input normalisation (a data-dependent scale
    would differ between ranks)."""
    from ...methods.sae import SAEConfig, build_sae

    return build_sae(
        SAEConfig(
            input_dim=input_dim,
            n_features=config.d_sae,
            sae_type="topk",
            k=config.k,
            learning_rate=config.lr,
            normalize=False,
            seed=config.seed,
        )
    )


def rank_batches(
    store: ActivationStore, config: TrainConfig, rank: int, world_size: int
) -> Iterator[Any]:
    """``config.steps`` batches of ``batch_size // world_size`` rows of ``rank``'s shards,
    epoch after epoch (each epoch reshuffled); every rank yields the same number."""
    if config.batch_size % world_size:
        raise StoreError(
            f"the global batch size {config.batch_size} must divide evenly over {world_size} ranks"
        )
    reader = StoreReader(
        store,
        config.site,
        config.batch_size // world_size,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        drop_last=True,
        buffer_size=config.buffer_size,
        chunk_size=config.chunk_size,
    )
    if reader.steps() == 0:
        raise StoreError(
            f"a rank's part of the store holds fewer than "
            f"{reader.batch_size} tokens: use a smaller batch or fewer ranks"
        )
    done, epoch = 0, 0
    while done < config.steps:
        reader.set_epoch(epoch)
        steps = reader.steps()
        for step, batch in enumerate(reader):
            if step == steps or done == config.steps:
                break  # every rank stops at the same step, whatever its token count
            yield batch
            done += 1
        epoch += 1


def global_batches(store: ActivationStore, config: TrainConfig, world_size: int) -> Iterator[Any]:
    """The global batches of a ``world_size``-rank run, in one process: each is the ranks'
    batches of that step, concatenated in rank order."""
    import torch

    streams = [rank_batches(store, config, r, world_size) for r in range(world_size)]
    for parts in zip(*streams, strict=True):
        yield torch.cat(parts)


def _factory(spec: str) -> Any:
    from ...registry import _resolve

    try:
        return _resolve(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise StoreError(
            f"cannot import the SAE factory {spec!r} ({exc}); give "
            "'package.module:function' importable in every rank"
        ) from None


def _objective(sae: Any) -> Any:
    """The SAE's loss as a module's forward, so that DDP prepares its gradient all-reduce."""
    import torch

    class Objective(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.sae = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            loss: torch.Tensor = self.sae.loss(x)
            return loss

    return Objective(sae)


def train(
    batches: Iterable[Any], input_dim: int, config: TrainConfig, device: Any = "cpu"
) -> tuple[Any, list[float]]:
    """Train an SAE on ``batches``; under torch.distributed, with gradients all-reduced
    (DDP) and the reported loss averaged over ranks. Returns the SAE and the loss per step."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(config.seed)  # the same initial weights in every rank
    sae = _factory(config.sae)(input_dim, config).to(device)
    objective = _objective(sae)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(
            objective, device_ids=None if str(device) == "cpu" else [device]
        )
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    losses: list[float] = []
    for batch in batches:
        loss = objective(batch.to(device, torch.float32))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(sae, "normalize_decoder"):
            sae.normalize_decoder()
        value = loss.detach().clone()
        if distributed:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(float(value))
    return sae, losses


def main(argv: list[str] | None = None) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(
        prog="archscope.apps.store.train_distributed", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("store")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default=None, help="TrainConfig as JSON (overrides flags)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {int: int, float: float}.get(type(f.default), str)
        parser.add_argument(flag, type=kind, default=None)
    args = parser.parse_args(argv)
    settings = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    if args.config:
        settings.update(json.loads(args.config))
    if "site" not in settings:
        parser.error("give --site (or site in --config)")
    config = TrainConfig.from_dict(settings)

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device: Any = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    store = ActivationStore(args.store)
    try:
        sae, losses = train(
            rank_batches(store, config, rank, world_size), store.dim(config.site), config, device
        )
        if rank == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()},
                out / "weights.safetensors",
            )
            (out / "train.json").write_text(
                json.dumps(
                    {
                        "config": config.to_dict(),
                        "world_size": world_size,
                        "losses": losses,
                        "store": str(store.path),
                    },
                    indent=1,
                )
            )
        if world_size > 1:
            # every rank reaches the end before the group is torn down: gloo aborts a rank
            # ("terminate called without an active exception") whose peer is still writing
            dist.barrier()
    finally:
        if world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
