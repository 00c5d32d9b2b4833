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
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
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
        what = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.registered.items()
                         if names)
        status = info.status if info.error is None else f"{info.status}: {info.error}"
        rows.append([info.distribution, info.version, info.name, status, what or "-"])
    _console().print(_table("archscope plugins",
                            ["distribution", "version", "plugin", "status", "registered"], rows))


def _capabilities(backend_cls: Any) -> set[str]:
    return set(getattr(backend_cls, "capabilities", ()))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def info(as_json: bool) -> None:
    """Backends, methods, model sources and the method x backend capability matrix."""
    from .plugins import get_manager

    manager = get_manager()
    backends = manager.backends.entries()
    methods = manager.methods.entries()
    matrix = {m.name: {b.name: m.obj.supports(_capabilities(b.obj)) for b in backends}
              for m in methods}
    if as_json:
        click.echo(json.dumps({
            "version": __version__,
            "backends": [{"name": b.name, "distribution": b.distribution,
                          "capabilities": sorted(_capabilities(b.obj)),
                          "description": b.obj.description} for b in backends],
            "methods": [{"name": m.name, "distribution": m.distribution,
                         "requires": sorted(m.obj.requires), "summary": m.obj.summary}
                        for m in methods],
            "sources": [{"name": s.name, "distribution": s.distribution,
                         "description": s.obj.description} for s in manager.sources],
            "matrix": matrix,
        }, indent=2))
        return
    console = _console()
    console.print(f"archscope {__version__}")
    console.print(_table("backends", ["name", "distribution", "capabilities", "description"],
                         [[b.name, b.distribution, ", ".join(sorted(_capabilities(b.obj))),
                           b.obj.description] for b in backends]))
    console.print(_table("methods", ["name", "distribution", "requires", "summary"],
                         [[m.name, m.distribution, ", ".join(sorted(m.obj.requires)) or "-",
                           m.obj.summary] for m in methods]))
    console.print(_table("model sources", ["prefix", "distribution", "description"],
                         [[s.name, s.distribution, s.obj.description] for s in manager.sources]))
    console.print(_table("methods x backends (yes = the backend has every capability the "
                         "method needs)", ["method", *[b.name for b in backends]],
                         [[m.name, *["yes" if matrix[m.name][b.name] else "-" for b in backends]]
                          for m in methods]))


@cli.command(name="run")
@click.argument("method")
@click.argument("model")
@click.option("--text", "texts", multiple=True, required=True, help="Input text (repeatable).")
@click.option("--arch", default=None, help="Backend hint (see `archscope info`).")
@click.option("--param", "params", multiple=True, help="Method parameter as key=value (JSON value).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run_method(method: str, model: str, texts: tuple[str, ...], arch: str | None,
               params: tuple[str, ...], as_json: bool) -> None:
    """Run METHOD on MODEL (a model spec such as SOURCE:NAME or a local folder) over --text inputs."""
    from .loader import load_model, make_tokenize_fn
    from .plugins import get_manager

    entry = get_manager().methods.get(method)
    if entry is None:
        raise click.UsageError(f"unknown method {method!r}; registered methods: "
                               f"{', '.join(get_manager().methods.names())}")
    kwargs: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"--param expects key=value, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    try:
        _, tokenizer, backend = load_model(model, arch=arch)
        inputs = make_tokenize_fn(tokenizer, max_length=128)(list(texts))
        result = entry.obj(backend, inputs, **kwargs)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        raise click.ClickException(f"{method} on {model}: {exc}") from exc
    click.echo(result.to_json() if as_json else result.to_markdown())


def main(argv: list[str] | None = None) -> None:
    from .plugins import get_manager

    get_manager().add_commands(cli)
    cli.main(args=argv, prog_name="archscope")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
