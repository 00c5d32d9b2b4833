"""The plugin's commands: ``archscope graph`` (an attribution graph of one prompt, written as
circuit-tracer's JSON and as the HTML viewer) and ``archscope train transcoders``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _counted(flag: str, default: int, help: str | None = None, dest: str | None = None) -> Any:
    """A positive integer option with its default shown."""
    names = (flag, dest) if dest else (flag,)
    return click.option(
        *names, default=default, show_default=True, type=click.IntRange(min=1), help=help
    )


def _folder(
    flag: str, dest: str, help: str, *, exists: bool = False, required: bool = False
) -> Any:
    """A folder option (``exists``: it must be there already)."""
    return click.option(
        flag,
        dest,
        required=required,
        default=None,
        type=click.Path(exists=exists, file_okay=False),
        help=help,
    )


_ARCH = click.option("--arch", "hint", default=None, help="Backend hint.")


def _texts(model: str, data: str | None, n: int) -> list[str]:
    """Training / labelling texts: a UTF-8 file with one text per line, or the zoo corpus's
    held-out documents when none is given and the model is a zoo model."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise click.BadParameter(
                f"{data!r} is not a file (give a text file, one text per line)", param_hint="--data"
            )
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise click.BadParameter(f"{data!r} holds no non-empty line", param_hint="--data")
        return lines[:n]
    if model.startswith("zoo:"):
        try:
            import archscope_zoo
        except ImportError:
            raise click.UsageError(
                "--data is needed: archscope-zoo, whose corpus is the default for zoo models, is not installed"
            ) from None
        texts = archscope_zoo.datasets("heldout", n=n)
        assert isinstance(texts, list)
        return texts
    raise click.UsageError(
        f"--data is needed for {model!r} (a text file, one text per line); only zoo models have a default corpus"
    )


@click.command(name="graph")
@click.argument("model")
@click.option(
    "--prompt", required=True, help="The prompt whose next-token prediction is explained."
)
@click.option(
    "--target", default=None, help="Target token (text or id); default: the model's top logits."
)
@_folder(
    "--out", "out", "Folder for <slug>.json, graph-metadata.json and <slug>.html.", required=True
)
@_folder(
    "--transcoders",
    "tc_path",
    "A folder written by save_transcoders (`archscope train transcoders`).",
    exists=True,
)
@_ARCH
@click.option("--slug", default="graph", show_default=True, help="Name of the graph's files.")
@click.option("--node-threshold", default=0.8, show_default=True, type=click.FloatRange(0, 1))
@click.option("--edge-threshold", default=0.98, show_default=True, type=click.FloatRange(0, 1))
@_counted("--max-logits", 10)
@click.option(
    "--data",
    default=None,
    help="Text file (one text per line) for the feature labels; default: the zoo corpus for zoo models.",
)
@_counted("--label-texts", 128, "How many texts label the features.")
@click.option(
    "--linearise",
    type=click.Choice(["frozen", "gradient"]),
    default="frozen",
    show_default=True,
    help="frozen: nonlinearities held at the prompt's values, rows add up exactly; gradient: "
    "first-order expansion of the live model (faithful to small interventions).",
)
def graph_command(
    model: str,
    prompt: str,
    target: str | None,
    out: str,
    tc_path: str | None,
    hint: str | None,
    slug: str,
    node_threshold: float,
    edge_threshold: float,
    max_logits: int,
    data: str | None,
    label_texts: int,
    linearise: str,
) -> None:
    """Attribution graph of PROMPT on MODEL, written to OUT as circuit-tracer's graph JSON
    (loadable by its viewer and by Neuronpedia) and as a self-contained HTML page."""
    from archscope.loader import load_model

    try:
        from .attribution import attribute
    except ImportError as exc:
        raise click.ClickException(
            f"archscope_graphs.attribution is not available: {exc}"
        ) from None
    from .export import write_graph_files
    from .transcoders import load_transcoders
    from .viewer import feature_labels, label_graph, write_html

    _, tokenizer, backend = load_model(model, arch=hint)
    transcoders = load_transcoders(tc_path) if tc_path else None
    kwargs: dict[str, Any] = {
        "transcoders": transcoders,
        "target": target,
        "max_logits": max_logits,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "tokenizer": tokenizer,
        "linearise": linearise,
    }
    graph = attribute(backend, prompt, **kwargs)
    graph.metadata.setdefault("model", model)
    tcs = transcoders if transcoders is not None else graph.metadata.get("transcoder_objects")
    if tcs:
        feats = sorted(
            {
                (n.layer, int(n.index))
                for n in graph.nodes
                if n.kind == "feature" and n.index is not None
            }
        )
        if feats and (data is not None or model.startswith("zoo:")):
            labels = feature_labels(
                tcs, backend, _texts(model, data, label_texts), feats, tokenizer=tokenizer
            )
            label_graph(graph, labels)
    folder = Path(out)
    json_path = write_graph_files(
        graph, folder, slug=slug, prompt=prompt, node_threshold=node_threshold
    )
    html_path = write_html(graph, folder / f"{slug}.html", title=f"{model}: {prompt}")
    n_edges = int((graph.adjacency != 0).sum())
    click.echo(
        f"{len(graph.nodes)} nodes, {n_edges} edges ({linearise} linearisation); "
        f"scores {json.dumps(graph.scores)}"
    )
    click.echo(f"wrote {json_path} and {html_path}")


@click.command(name="transcoders")
@click.argument("model")
@_folder("--out", "out", "Folder to write the transcoders to.", required=True)
@click.option(
    "--data",
    default=None,
    help="Text file, one text per line; default: the zoo corpus for zoo models.",
)
@_counted("--texts", 512, "How many texts to train on.", dest="n_texts")
@_ARCH
@_counted("--features", 512, "Features per read layer.", dest="n_features")
@click.option(
    "--layers", default=None, help="Comma-separated read layers (default: every layer with an MLP)."
)
@click.option(
    "--activation",
    type=click.Choice(["relu", "jumprelu", "topk"]),
    default="relu",
    show_default=True,
)
@click.option(
    "--cross-layer",
    is_flag=True,
    help="Train a cross-layer transcoder (features write every later MLP).",
)
@click.option("--skip", is_flag=True, help="Add a linear skip connection per layer.")
@_counted("--k", 16, "Active features per token (TopK).")
@click.option(
    "--sparsity",
    default=0.03,
    show_default=True,
    type=click.FloatRange(min=0),
    help="L1 coefficient (ReLU, JumpReLU).",
)
@_counted("--epochs", 5)
@click.option(
    "--lr",
    "learning_rate",
    default=1e-3,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
)
@_counted("--batch-size", 256, "Tokens per training step.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["archscope", "saelens", "circuit-tracer"]),
    default="archscope",
    show_default=True,
    help="On-disk layout (saelens / circuit-tracer: single-layer only).",
)
@click.option(
    "--eval-texts",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help="Held-out texts for the metrics (0: skip them).",
)
def train_transcoders_command(
    model: str,
    out: str,
    data: str | None,
    n_texts: int,
    hint: str | None,
    n_features: int,
    layers: str | None,
    activation: str,
    cross_layer: bool,
    skip: bool,
    k: int,
    sparsity: float,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    fmt: str,
    eval_texts: int,
) -> None:
    """Train transcoders (single-layer or cross-layer) on MODEL's MLPs and write them to OUT,
    with their metrics (explained variance, L0, dead fraction, next-token loss with the MLPs
    replaced) in OUT/metrics.json."""
    from archscope.loader import load_model

    from .transcoders import (
        export_circuit_tracer,
        export_saelens,
        save_transcoders,
        train_transcoders,
        transcoder_metrics,
    )

    try:
        chosen = None if layers is None else [int(v) for v in layers.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{layers!r}: give comma-separated integers, e.g. 0,1,2", param_hint="--layers"
        ) from None
    if fmt != "archscope" and cross_layer:
        raise click.BadParameter(
            f"--format {fmt} holds single-layer transcoders; a cross-layer one is written with --format archscope",
            param_hint="--format",
        )
    texts = _texts(model, data, n_texts + eval_texts)
    if len(texts) <= eval_texts:
        raise click.UsageError(
            f"{len(texts)} texts: not enough for {eval_texts} held-out ones plus training; lower --eval-texts"
        )
    train, held = texts[: len(texts) - eval_texts], texts[len(texts) - eval_texts :]
    _, tokenizer, backend = load_model(model, arch=hint)
    tcs = train_transcoders(
        backend,
        train,
        n_features=n_features,
        layers=chosen,
        activation=activation,
        cross_layer=cross_layer,
        skip=skip,
        k=k,
        sparsity=sparsity,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
        tokenizer=tokenizer,
    )
    folder = Path(out)
    if fmt == "archscope":
        save_transcoders(tcs, folder, model=model, texts=len(train), epochs=epochs)
    elif fmt == "saelens":
        for tc in tcs:
            export_saelens(tc, folder / f"layer_{tc.layer}", model_name=model)
    else:
        export_circuit_tracer(tcs, folder)
    summary: dict[str, Any] = {
        "model": model,
        "layers": [tc.layer for tc in tcs],
        "train_texts": len(train),
    }
    if held:
        metrics = transcoder_metrics(tcs, backend, held, tokenizer=tokenizer)
        summary["metrics"] = metrics.to_dict()
        ev = ", ".join(f"{s} {v:.3f}" for s, v in metrics.explained_variance.items())
        l0 = ", ".join(f"{s} {v:.1f}" for s, v in metrics.l0.items())
        click.echo(f"explained variance: {ev}")
        click.echo(f"L0: {l0}")
        click.echo(
            f"next-token loss: clean {metrics.clean_loss:.4f}, MLPs replaced "
            f"{metrics.replaced_loss:.4f}, MLPs zeroed {metrics.zero_ablated_loss:.4f} "
            f"(loss recovered {metrics.loss_recovered:.3f})"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(f"wrote {len(tcs)} transcoders to {folder}")


def register(cli: Any) -> None:
    """Add ``graph`` and ``train transcoders`` to the ``archscope`` group (a ``train`` group is
    created unless another plugin made one)."""
    cli.add_command(graph_command)
    train = getattr(cli, "commands", {}).get("train")
    if train is None:
        train = click.Group(name="train", help="Train dictionaries on a model's activations.")
        cli.add_command(train)
    train.add_command(train_transcoders_command)
