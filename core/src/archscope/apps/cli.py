"""The ``archscope`` command. Listing plugins and ``--help`` import neither torch nor any
model framework; commands that run models import them when they run."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .._version import __version__


def _console() -> Any:
    import shutil

    from rich.console import Console

    return Console(soft_wrap=False, width=max(100, shutil.get_terminal_size().columns))


#: Columns whose short cells are never wrapped, and the prose columns that take the width
#: the others leave.
_NO_WRAP = {"name", "distribution", "input", "plugin", "version", "method", "prefix", "default"}
_WIDE = {"description", "summary", "help", "registered"}
_MAX_WIDTH = {"capabilities": 24, "requires": 24, "type": 24}


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(
            col,
            overflow="fold",
            no_wrap=col in _NO_WRAP,
            min_width=30 if col in _WIDE else None,
            max_width=_MAX_WIDTH.get(col),
        )
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
    from ..plugins import get_manager

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
        lost = {kind: names for kind, names in info.rejected.items() if names}
        if lost and info.status == "ok":
            status += "; lost to another plugin: " + "; ".join(
                f"{kind} {', '.join(names)}" for kind, names in lost.items()
            )
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
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def info(name: str | None, as_json: bool) -> None:
    """Backends, methods, model sources and the method x backend capability matrix; with
    NAME (a method or a backend), its details: a method's parameters, a backend's sites."""
    from ..plugins import get_manager

    manager = get_manager()
    backends = manager.backends.entries()
    methods = manager.methods.entries()
    matrix = {
        m.name: {b.name: m.obj.supports(_capabilities(b.obj)) for b in backends} for m in methods
    }
    if name is not None:
        _info_one(name, manager, matrix, as_json)
        return
    if as_json:
        click.echo(
            json.dumps(
                {
                    "version": __version__,
                    "backends": [_backend_dict(b) for b in backends],
                    "methods": [_method_dict(m) for m in methods],
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
            "methods (parameters: archscope info METHOD)",
            ["name", "input", "requires", "summary"],
            [
                [
                    m.name,
                    m.obj.input + (" x2 models" if m.obj.arity == 2 else ""),
                    ", ".join(sorted(m.obj.requires)) or "-",
                    m.obj.summary,
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


def _backend_dict(b: Any) -> dict[str, Any]:
    return {
        "name": b.name,
        "distribution": b.distribution,
        "capabilities": sorted(_capabilities(b.obj)),
        "description": b.obj.description,
        **_freezing(b.obj),
    }


def _freezing(backend_cls: Any) -> dict[str, Any]:
    """What a backend with the ``freeze`` capability holds and cannot hold (else nothing)."""
    if "freeze" not in _capabilities(backend_cls):
        return {}
    from ..freeze import cannot_freeze_of, freezes_of

    return {
        "freezes": sorted(freezes_of(backend_cls)),
        "cannot_freeze": cannot_freeze_of(backend_cls),
    }


def _method_dict(m: Any) -> dict[str, Any]:
    return {
        "name": m.name,
        "distribution": m.distribution,
        "requires": sorted(m.obj.requires),
        "summary": m.obj.summary,
        "input": m.obj.input,
        "arity": m.obj.arity,
        "parameters": _param_rows(m.obj),
    }


def _param_help(row: dict[str, Any]) -> str:
    """A parameter's help with its bounds (the part of `ParamSpec.describe` after the type)."""
    text = str(row.get("text", ""))
    bounds = text[text.index(" [") + 1 : text.index("]") + 1] if " [" in text else ""
    return " ".join(part for part in (str(row.get("help") or ""), bounds) if part) or "-"


def _info_one(name: str, manager: Any, matrix: dict[str, dict[str, bool]], as_json: bool) -> None:
    """`archscope info NAME`: one method (its parameters, the backends that can run it) or
    one backend (its capabilities, the methods it can run)."""
    method = manager.methods.get(name)
    backend = manager.backends.get(name)
    if method is None and backend is None:
        raise click.UsageError(
            f"no method or backend named {name!r}; methods: "
            f"{', '.join(manager.methods.names())}; backends: {', '.join(manager.backends.names())}"
        )
    console = _console()
    if method is not None:
        runs_on = [b for b, ok in matrix[method.name].items() if ok]
        if as_json:
            click.echo(json.dumps({**_method_dict(method), "backends": runs_on}, indent=2))
            return
        spec = method.obj
        console.print(f"[bold]{method.name}[/bold] ({method.distribution}): {spec.summary}")
        console.print(
            f"input: {spec.input}{' x2 models' if spec.arity == 2 else ''}; requires: "
            f"{', '.join(sorted(spec.requires)) or 'nothing'}; runs on: {', '.join(runs_on) or '-'}"
        )
        rows = _param_rows(spec)
        console.print(
            _table(
                f"parameters of {method.name} (archscope run {method.name} MODEL --param key=value)",
                ["name", "type", "default", "help"],
                [
                    [
                        str(p["name"]),
                        str(p.get("type", "")),
                        "(required)" if p.get("required") else str(p.get("default")),
                        _param_help(p),
                    ]
                    for p in rows
                ],
            )
        )
        if spec.quick:
            console.print("--quick sets: " + ", ".join(f"{k}={v!r}" for k, v in spec.quick.items()))
        return
    assert backend is not None
    runs = [m for m, by_backend in matrix.items() if by_backend.get(backend.name)]
    if as_json:
        click.echo(json.dumps({**_backend_dict(backend), "methods": runs}, indent=2))
        return
    console.print(
        f"[bold]{backend.name}[/bold] ({backend.distribution}): {backend.obj.description}"
    )
    console.print(f"capabilities: {', '.join(sorted(_capabilities(backend.obj))) or '-'}")
    if "freeze" in _capabilities(backend.obj):
        from ..freeze import cannot_freeze_of, freezes_of

        console.print(f"freezes: {', '.join(sorted(freezes_of(backend.obj))) or '-'}")
        for what, why in sorted(cannot_freeze_of(backend.obj).items()):
            console.print(f"cannot freeze {what}: {why}")
    console.print(f"methods it can run: {', '.join(runs) or '-'}")


def _parse_params(method: Any, params: tuple[str, ...], quick: bool) -> dict[str, Any]:
    from ..errors import ParameterError

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
    from ..data import Contrast, Dataset, pad_batch, padding_for
    from ..errors import InputError

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
        contrast = Contrast(list(clean), list(corrupt), tokenizer=tokenizer)
        _refuse_identical(contrast)
        return contrast
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
    from ..tokens import pad_id

    return pad_batch(dataset.ids(), padding_for(backend), pad_id(tokenizer))


def _refuse_identical(contrast: Any) -> None:
    """Refuse a contrast whose clean and corrupted sides are the same tokens: every patched
    run would equal both, and the gap to restore is zero."""
    from ..errors import InputError
    from ..tokens import decode

    tokenizer = contrast.tokenizer
    for n, (clean, corrupt) in enumerate(contrast.pairs()):
        if clean == corrupt:
            shown = " ".join(decode(tokenizer, t) for t in clean)
            raise InputError(
                f"pair {n}: the clean text {contrast.clean[n]!r} and the corrupted text "
                f"{contrast.corrupted[n]!r} are the same tokens ({shown!r}, ids {clean}), so "
                "there is no difference to patch. Change a word the tokenizer knows (words "
                "it does not know all become the same unknown token)"
            )


#: Suffixes ``--out`` takes, per command.
_OUT_SUFFIXES = {"result": (".json", ".md", ".png"), "bench": (".md", ".json")}


def _check_out(out: str | None, kind: str) -> None:
    """Refuse an ``--out`` path with a suffix the command cannot write, before any work."""
    if out is None:
        return
    from pathlib import Path

    allowed = _OUT_SUFFIXES[kind]
    if Path(out).suffix.lower() not in allowed:
        raise click.BadParameter(
            f"{out!r}: write {' or '.join(allowed)} (the suffix picks the format)",
            param_hint="--out",
        )


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
    from ..loader import load_model
    from ..plugins import get_manager

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
    from ..tokens import check_fits

    _check_out(out, "result")
    values = _parse_params(spec, params, quick)
    loaded = [load_model(m, arch=hint) for m in models]
    tokenizer = loaded[0][1]
    check_fits(tokenizer, loaded[0][2])
    inputs = _method_data(spec, loaded[0][2], tokenizer, texts, data, clean, corrupt)
    with _working(f"{method} on {models[0]}"):
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
        default_models,
        profile_models,
        profile_to_markdown,
        write_report,
    )

    _check_out(out, "bench")
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
    from ..loader import load_model
    from ..methods.lens import logit_lens

    _check_out(out, "result")
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
    from ..data import Contrast
    from ..loader import load_model
    from ..methods.attribute import patch_sweep
    from ..tokens import check_fits

    _check_out(out, "result")
    _, tokenizer, backend = load_model(model, arch=hint)
    check_fits(tokenizer, backend)
    contrast = Contrast([clean], [corrupt], tokenizer=tokenizer)
    _refuse_identical(contrast)
    clean_ds, corrupt_ds = contrast.datasets()
    with _working(f"patching {model}"):
        result = patch_sweep(
            backend, clean_ds.ids(), corrupt_ds.ids(), axis="position", attribution=attribution
        )
    if out is not None:
        click.echo(f"wrote {result.save(out)}", err=True)
    click.echo(result.to_markdown())


class _working:
    """While a method runs: on a terminal, a line saying what runs (its long loops show tqdm
    bars below it); elsewhere nothing, so pipes and logs stay clean."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> _working:
        if sys.stderr.isatty():
            click.echo(f"running {self.what} ...", err=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings in the CLI: one line ``warning: message``, no source file or line."""
    text = str(message).strip()
    if text.startswith("archscope: "):
        text = text[len("archscope: ") :]
    click.echo(f"warning: {text}", err=True)


_DEBUG_HELP = "Show the Python traceback of an error (also ARCHSCOPE_DEBUG=1)."


def _add_debug_option(group: click.Group) -> None:
    """Every command lists ``--debug`` in its help (`main` reads and removes the flag)."""
    if not any(p.name == "debug" for p in group.params):
        group.params.append(
            click.Option(["--debug"], is_flag=True, expose_value=False, help=_DEBUG_HELP)
        )
    for command in group.commands.values():
        if not any(p.name == "debug" for p in command.params):
            command.params.append(
                click.Option(["--debug"], is_flag=True, expose_value=False, help=_DEBUG_HELP)
            )
        if isinstance(command, click.Group):
            _add_debug_option(command)


def _quiet_loading() -> None:
    """No Hugging Face "Loading weights" progress bar: the environment variable is read when
    transformers is imported; an already imported transformers is told directly."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "0" and "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (archscope's own error classes) print one line and exit 1
    (usage errors 2); ``--debug`` or ``ARCHSCOPE_DEBUG=1`` shows the traceback instead.
    Warnings print as ``warning: message``."""
    import os
    import warnings

    from ..plugins import get_manager

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ARCHSCOPE_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    _quiet_loading()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        get_manager().add_commands(cli)
        _add_debug_option(cli)
        _main(args, debug)


def _main(args: list[str], debug: bool) -> None:
    from ..errors import ArchscopeError, ParameterError

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
