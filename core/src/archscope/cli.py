"""The ``archscope`` command. Listing plugins and ``--help`` import neither torch nor any
model framework; commands that run models import them when they run."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__


def _console() -> Any:
    import shutil

    from rich.console import Console

    return Console(soft_wrap=False, width=max(100, shutil.get_terminal_size().columns))


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="archscope")
def cli() -> None:
    """archscope: one interpretability API for every neural architecture."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List installed plugins: distribution, version, status and what each registered."""
    from .plugins import get_manager

    manager = get_manager()
    infos = list(manager.plugins.values())
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    rows = []
    for info in infos:
        what = "; ".join(
            f"{kind}: {', '.join(names)}" for kind, names in info.registered.items() if names
        )
        status = info.status if info.error is None else f"{info.status}: {info.error}"
        rows.append([info.distribution, info.version, info.name, status, what or "-"])
    _console().print(
        _table(
            "archscope plugins", ["distribution", "version", "plugin", "status", "registered"], rows
        )
    )


def _capabilities(backend_cls: Any) -> set[str]:
    return set(getattr(backend_cls, "capabilities", ()))


def _param_rows(method: Any) -> list[dict[str, Any]]:
    """Each parameter of a method for `info` (its module is imported to read the schema; a
    method whose module fails to import shows the error instead)."""
    try:
        specs = method.params()
    except Exception as exc:  # a broken method plugin must not take `info` down
        return [{"name": "?", "text": f"(cannot read parameters: {exc})"}]
    return [
        {
            "name": s.name,
            "type": s.type_name,
            "required": s.required,
            "default": None if s.required else repr(s.default),
            "help": s.help,
            "text": s.describe(),
        }
        for s in specs.values()
    ]


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def info(as_json: bool) -> None:
    """Backends, methods, model sources and the method x backend capability matrix."""
    from .plugins import get_manager

    manager = get_manager()
    backends = manager.backends.entries()
    methods = manager.methods.entries()
    matrix = {
        m.name: {b.name: m.obj.supports(_capabilities(b.obj)) for b in backends} for m in methods
    }
    if as_json:
        click.echo(
            json.dumps(
                {
                    "version": __version__,
                    "backends": [
                        {
                            "name": b.name,
                            "distribution": b.distribution,
                            "capabilities": sorted(_capabilities(b.obj)),
                            "description": b.obj.description,
                        }
                        for b in backends
                    ],
                    "methods": [
                        {
                            "name": m.name,
                            "distribution": m.distribution,
                            "requires": sorted(m.obj.requires),
                            "summary": m.obj.summary,
                            "input": m.obj.input,
                            "arity": m.obj.arity,
                            "parameters": _param_rows(m.obj),
                        }
                        for m in methods
                    ],
                    "sources": [
                        {
                            "name": s.name,
                            "distribution": s.distribution,
                            "description": s.obj.description,
                        }
                        for s in manager.sources
                    ],
                    "matrix": matrix,
                },
                indent=2,
            )
        )
        return
    console = _console()
    console.print(f"archscope {__version__}")
    console.print(
        _table(
            "backends",
            ["name", "distribution", "capabilities", "description"],
            [
                [b.name, b.distribution, ", ".join(sorted(_capabilities(b.obj))), b.obj.description]
                for b in backends
            ],
        )
    )
    console.print(
        _table(
            "methods",
            ["name", "distribution", "input", "requires", "summary", "parameters"],
            [
                [
                    m.name,
                    m.distribution,
                    m.obj.input + (" x2 models" if m.obj.arity == 2 else ""),
                    ", ".join(sorted(m.obj.requires)) or "-",
                    m.obj.summary,
                    "\n".join(p["text"] for p in _param_rows(m.obj)) or "-",
                ]
                for m in methods
            ],
        )
    )
    console.print(
        _table(
            "model sources",
            ["prefix", "distribution", "description"],
            [[s.name, s.distribution, s.obj.description] for s in manager.sources],
        )
    )
    console.print(
        _table(
            "methods x backends (yes = the backend has every capability the method needs)",
            ["method", *[b.name for b in backends]],
            [
                [m.name, *["yes" if matrix[m.name][b.name] else "-" for b in backends]]
                for m in methods
            ],
        )
    )


def _parse_params(method: Any, params: tuple[str, ...], quick: bool) -> dict[str, Any]:
    from .errors import ParameterError

    specs = method.params()
    values: dict[str, Any] = dict(method.quick) if quick else {}
    for item in params:
        key, sep, text = item.partition("=")
        if not sep:
            raise click.UsageError(f"--param expects key=value, got {item!r}")
        if key not in specs:
            valid = "; ".join(s.describe() for s in specs.values()) or "none"
            raise ParameterError(
                f"method {method.name!r} has no parameter {key!r}; its parameters: {valid}"
            )
        values[key] = specs[key].parse(text)
    checked: dict[str, Any] = method.check_params(values)
    return checked


def _method_data(
    method: Any,
    backend: Any,
    tokenizer: Any,
    texts: tuple[str, ...],
    data: str | None,
    clean: tuple[str, ...],
    corrupt: tuple[str, ...],
) -> Any:
    from .data import Contrast, Dataset, pad_batch, padding_for
    from .errors import InputError

    if tokenizer is None:
        raise InputError(
            f"the model was loaded without a tokenizer, so the inputs of "
            f"{method.name!r} cannot be tokenized; load it from a source that "
            "returns one (or have your function return (model, tokenizer))"
        )
    if method.input == "contrast":
        if not clean or len(clean) != len(corrupt):
            raise click.UsageError(
                f"method {method.name!r} takes a contrast: give --clean TEXT "
                "and --corrupt TEXT, as many of each (repeatable)"
            )
        return Contrast(list(clean), list(corrupt), tokenizer=tokenizer)
    if data is not None:
        dataset = Dataset.from_file(data, tokenizer=tokenizer)
    elif texts:
        dataset = Dataset.from_texts(list(texts), tokenizer=tokenizer)
    else:
        raise click.UsageError(
            f"method {method.name!r} takes {method.input} input: give --text "
            "TEXT (repeatable) or --data FILE (.jsonl/.csv of text,label or "
            "one text per line)"
        )
    if method.input == "dataset":
        return dataset
    pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
    return pad_batch(dataset.ids(), padding_for(backend), pad)


@cli.command(name="run")
@click.argument("method")
@click.argument("models", nargs=-1, required=True, metavar="MODEL [MODEL2]")
@click.option("--text", "texts", multiple=True, help="Input text (repeatable).")
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    default=None,
    help="Data file: JSONL/CSV with text[,label], or one text per line.",
)
@click.option("--clean", multiple=True, help="Clean input of a contrast (repeatable).")
@click.option("--corrupt", multiple=True, help="Corrupted input of a contrast (repeatable).")
@click.option("--arch", "hint", default=None, help="Backend hint (see `archscope info`).")
@click.option(
    "--param",
    "params",
    multiple=True,
    help="Method parameter as key=value, parsed by its type (`archscope info`).",
)
@click.option("--quick", is_flag=True, help="Use the method's quick settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the result: .json, .md or .png (a figure).",
)
def run_method(
    method: str,
    models: tuple[str, ...],
    texts: tuple[str, ...],
    data: str | None,
    clean: tuple[str, ...],
    corrupt: tuple[str, ...],
    hint: str | None,
    params: tuple[str, ...],
    quick: bool,
    as_json: bool,
    out: str | None,
) -> None:
    """Run METHOD on MODEL (a model spec such as SOURCE:NAME, a local folder, or your own
    code as package.module:function / file.py:function). Two-model methods take MODEL2."""
    from .loader import load_model
    from .plugins import get_manager

    entry = get_manager().methods.get(method)
    if entry is None:
        raise click.UsageError(
            f"unknown method {method!r}; registered methods: "
            f"{', '.join(get_manager().methods.names())}"
        )
    spec = entry.obj
    if len(models) != spec.arity:
        raise click.UsageError(
            f"method {method!r} takes {spec.arity} model"
            f"{'s' if spec.arity > 1 else ''}, got {len(models)}"
        )
    values = _parse_params(spec, params, quick)
    loaded = [load_model(m, arch=hint) for m in models]
    tokenizer = loaded[0][1]
    inputs = _method_data(spec, loaded[0][2], tokenizer, texts, data, clean, corrupt)
    result = spec(*[b for _, _, b in loaded], inputs, **values)
    if out is not None:
        click.echo(f"wrote {result.save(out)}", err=True)
    click.echo(result.to_json() if as_json else result.to_markdown())


@cli.command()
@click.argument("models", nargs=-1, metavar="[MODEL ...]")
@click.option("--arch", "hint", default=None, help="Backend hint (0.2's --arch).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the report: .md (with PNG figures beside it) or .json.",
)
@click.option("--quick", is_flag=True, help="Fewer epochs and trials (a first look).")
@click.option(
    "--pool",
    default="last",
    show_default=True,
    help="What probes read of each text: last (real token), mean, or a real-token position "
    "such as 3 or -2.",
)
@click.option(
    "--no-controls",
    is_flag=True,
    help="Skip the controls (untrained copy of each model, shuffled probe labels).",
)
def bench(
    models: tuple[str, ...],
    hint: str | None,
    out: str | None,
    quick: bool,
    pool: str,
    no_controls: bool,
) -> None:
    """Profile MODELs side by side: probes per layer (held-out AUROC), circuits, SAE quality,
    logit vs tuned lens, activation patching, state variance. Without MODEL: the example
    models installed sources name (the zoo's trained models)."""
    from .bench import (
        check_pool,
        check_report_path,
        default_models,
        profile_models,
        profile_to_markdown,
        write_report,
    )

    if out is not None:
        check_report_path(out)  # before minutes of profiling
    pooling = check_pool(pool)
    specs = list(models) or default_models()
    if not specs:
        raise click.UsageError(
            "no MODEL given and no installed model source names example "
            "models: pip install archscope-zoo, or name models to profile"
        )
    profiles = profile_models(
        specs,
        hint=hint,
        quick=quick,
        progress=lambda spec: click.echo(f"profiling {spec} ...", err=True),
        pool=pooling,
        controls=not no_controls,
    )
    click.echo(profile_to_markdown(profiles))
    if out is not None:
        click.echo(f"report written to {write_report(profiles, out)}", err=True)


@cli.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--target", default=None, help="Token whose probability and rank are tracked.")
@click.option("--arch", "hint", default=None, help="Backend hint.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the result: .json, .md or .png (layers x positions).",
)
def lens(
    model: str, prompt: str, target: str | None, hint: str | None, top_k: int, out: str | None
) -> None:
    """Logit lens of PROMPT on MODEL: each layer's prediction through the model's own final
    norm and unembedding."""
    from .lens import logit_lens
    from .loader import load_model

    _, tokenizer, backend = load_model(model, arch=hint)
    result = logit_lens(backend, tokenizer, prompt, target_token=target, top_k=top_k)
    if out is not None:
        click.echo(f"wrote {result.save(out)}", err=True)
    click.echo(result.to_markdown())


@cli.command()
@click.argument("model")
@click.option("--clean", required=True, help="The clean prompt.")
@click.option("--corrupt", required=True, help="The corrupted prompt (same length in tokens).")
@click.option("--arch", "hint", default=None, help="Backend hint.")
@click.option(
    "--attribution",
    is_flag=True,
    help="Also estimate every cell by attribution "
    "patching (one forward and backward pass) and report the correlation.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the result: .json, .md or .png (the heat map).",
)
def patch(
    model: str, clean: str, corrupt: str, hint: str | None, attribution: bool, out: str | None
) -> None:
    """Activation patching of MODEL: the gap restored by patching each layer x position of
    the clean run into the corrupted run."""
    from .attribute import patch_sweep
    from .data import Contrast
    from .loader import load_model

    _, tokenizer, backend = load_model(model, arch=hint)
    clean_ds, corrupt_ds = Contrast([clean], [corrupt], tokenizer=tokenizer).datasets()
    result = patch_sweep(
        backend, clean_ds.ids(), corrupt_ds.ids(), axis="position", attribution=attribution
    )
    if out is not None:
        click.echo(f"wrote {result.save(out)}", err=True)
    click.echo(result.to_markdown())


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (archscope's own error classes) print one line and exit 1
    (usage errors 2); ``--debug`` or ``ARCHSCOPE_DEBUG=1`` shows the traceback instead."""
    import os

    from .errors import ArchscopeError, ParameterError
    from .plugins import get_manager

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ARCHSCOPE_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    get_manager().add_commands(cli)
    try:
        cli.main(args=args, prog_name="archscope", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ParameterError as exc:
        if debug:
            raise
        click.echo(f"Usage error: {exc}", err=True)
        sys.exit(2)
    except (ArchscopeError, OSError) as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
