"""Entry point: registers a backend, a method, a model source and a CLI command."""

from __future__ import annotations

import click

import archscope


@archscope.hookimpl
def register_backends(register):
    from .backend import ToyBackend

    register(ToyBackend, aliases=("toy-alias",))


@archscope.hookimpl
def register_methods(register):
    register(
        archscope.Method(
            name="toy-norms",
            summary="Norm of every residual site (test plugin)",
            function="archscope_testplugin_good.backend:toy_norms",
            requires=frozenset({"residual"}),
        )
    )
    register(
        archscope.Method(
            name="needs-state",
            summary="A method no toy backend can run",
            function="archscope_testplugin_good.backend:toy_norms",
            requires=frozenset({"residual", "state_patch"}),
        )
    )


@archscope.hookimpl
def register_model_sources(register):
    register(
        archscope.ModelSource(
            name="toy",
            load="archscope_testplugin_good.backend:load_toy",
            description="toy models built from a seed: toy:<seed>",
            claims="archscope_testplugin_good.backend:claims",
        )
    )


@archscope.hookimpl
def register_commands(cli):
    @cli.command(name="toy-hello")
    def toy_hello():
        """Say hello (test plugin command)."""
        click.echo("hello from the toy plugin")
