"""The store's commands: ``archscope extract MODEL DATA --sites ... --out DIR`` and
``archscope store info DIR``; added to the ``archscope`` group by `add_commands`."""

from __future__ import annotations

import json

import click

from .inputs import load_data


def _sites(values: tuple[str, ...]) -> list[str]:
    return [s.strip() for v in values for s in v.split(",") if s.strip()]


@click.command(name="extract")
@click.argument("model")
@click.argument("data", type=click.Path(exists=True))
@click.option(
    "--sites",
    "sites",
    multiple=True,
    required=True,
    help="Sites to store, comma-separated or repeated (e.g. layer_3.residual).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Store folder (created, or "
    "resumed when it holds an interrupted extraction of the same request).",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--docs-per-shard", default=1024, show_default=True, type=click.IntRange(1))
@click.option("--dtype", default=None, help="Activation dtype on disk (default: the model's).")
@click.option(
    "--max-length",
    default=None,
    type=click.IntRange(1),
    help="Truncate documents to this many tokens (with a warning).",
)
@click.option(
    "--text-column",
    default="text",
    show_default=True,
    help="Column of a Hugging Face dataset folder.",
)
@click.option("--split", default=None, help="Split of a Hugging Face DatasetDict folder.")
@click.option("--arch", default=None, help="Backend hint (see `archscope info`).")
@click.option("--device", default="cpu", show_default=True, help="Device to load the model on.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: Ray actors (archscope[ray]).",
)
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Ray actors (each loads the model once).",
)
@click.option(
    "--cpus-per-worker",
    default=1.0,
    show_default=True,
    type=float,
    help="CPUs Ray reserves per actor (fractions allowed).",
)
@click.option(
    "--gpus-per-worker",
    default=0.0,
    show_default=True,
    type=float,
    help="GPUs Ray reserves per actor; actors then load the model on cuda.",
)
@click.option(
    "--threads-per-worker",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="torch threads in each Ray actor.",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster address (e.g. auto or HOST:6379); default: a local Ray.",
)
@click.option("--overwrite", is_flag=True, help="Replace a store of another extraction.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def extract_command(
    model: str,
    data: str,
    sites: tuple[str, ...],
    out: str,
    batch_size: int,
    docs_per_shard: int,
    dtype: str | None,
    max_length: int | None,
    text_column: str,
    split: str | None,
    arch: str | None,
    device: str,
    engine: str,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    threads_per_worker: int,
    address: str | None,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Store every real token's activations of SITES for MODEL over DATA in the folder --out.

    DATA: a text file (one text per line), JSONL with a "text" key, CSV with a text column, or
    a Hugging Face dataset folder (save_to_disk). Interrupted runs resume when run again.
    """
    from ...errors import ArchscopeError
    from ...loader import load_model
    from .extract import extract

    site_list = _sites(sites)
    try:
        if engine == "ray":
            from .ray_engine import extract_ray

            store = extract_ray(
                model,
                data,
                site_list,
                out,
                arch=arch,
                batch_size=batch_size,
                docs_per_shard=docs_per_shard,
                dtype=dtype,
                max_length=max_length,
                text_column=text_column,
                split=split,
                workers=workers,
                cpus_per_worker=cpus_per_worker,
                gpus_per_worker=gpus_per_worker,
                threads_per_worker=threads_per_worker,
                address=address,
                overwrite=overwrite,
                progress=not no_progress,
            )
        else:
            _, tokenizer, backend = load_model(model, arch=arch, device=device)
            dataset = load_data(
                data, tokenizer, text_column=text_column, split=split, max_length=max_length
            )
            store = extract(
                backend,
                dataset,
                site_list,
                out,
                tokenizer=tokenizer,
                docs_per_shard=docs_per_shard,
                batch_size=batch_size,
                dtype=dtype,
                overwrite=overwrite,
                progress=False if no_progress else None,
            )
    except (ArchscopeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"stored {store.n_tokens:,} tokens of {', '.join(store.sites)} in {store.path}")


@click.group(name="store")
def store_group() -> None:
    """Inspect activation stores written by `archscope extract`."""


@store_group.command(name="info")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--verify", is_flag=True, help="Also check every shard's checksum.")
def info_command(path: str, as_json: bool, verify: bool) -> None:
    """What the store at PATH holds: model, sites, tokens, shards, completeness."""
    from ...errors import ArchscopeError
    from .reader import ActivationStore

    try:
        store = ActivationStore(path)
        info = store.info()
        bad = store.verify() if verify else []
    except ArchscopeError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        out = info.to_dict()
        if verify:
            out["verify"] = bad
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(info.to_markdown())
        if verify:
            click.echo("\nchecksums: " + ("all shards match" if not bad else "; ".join(bad)))
    if bad:
        raise SystemExit(1)


def add_commands(cli: click.Group) -> None:
    """Add ``extract`` and ``store`` to the ``archscope`` command group."""
    cli.add_command(extract_command)
    cli.add_command(store_group)
