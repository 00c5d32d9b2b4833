"""``archscope zoo list``: what the zoo ships, with sizes and held-out losses."""

from __future__ import annotations

import json

import click

from .store import ALL_MODEL_NAMES, MODEL_NAMES, TASK_MODEL_NAMES, manifest, models_dir


@click.group()
def zoo() -> None:
    """Trained reference models shipped with archscope-zoo (load them as zoo:NAME)."""


@zoo.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def list_models(as_json: bool) -> None:
    """The shipped models: class, parameters, size on disk, held-out loss, training cost."""
    from archscope.errors import ModelSourceError

    try:
        data = manifest()
    except ModelSourceError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"archscope zoo ({models_dir()})")
    for column in ("model", "class", "parameters", "size", "held-out loss", "steps", "train time"):
        table.add_column(column)
    for name in ALL_MODEL_NAMES:
        m = data["models"].get(name)
        if m is None:
            continue
        table.add_row(
            f"zoo:{name}",
            m["class"],
            f"{m['parameters']:,}",
            f"{m['bytes'] / 1e6:.2f} MB",
            f"{m['heldout_loss']:.3f}",
            str(m["train_steps"]),
            f"{m['train_wall_s']:.0f} s",
        )
    Console(soft_wrap=False, width=100).print(table)
    click.echo(
        f"vocabulary {data['vocab_size']} words; held-out loss in nats per token on "
        f"{data['models'][MODEL_NAMES[0]]['heldout_docs']} held-out documents"
    )
    for name in TASK_MODEL_NAMES:
        m = data["models"].get(name)
        if m is not None:
            click.echo(
                f"zoo:{name}: trained on associative recall; its held-out loss is over the "
                f"answers of {m['heldout_docs']} held-out recall sequences (answer accuracy "
                f"{m['recall_accuracy']:.3f}, chance 1/24)"
            )
