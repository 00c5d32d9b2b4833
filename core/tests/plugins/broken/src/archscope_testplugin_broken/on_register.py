"""Imports fine, then fails inside its registration hook."""

import archscope


@archscope.hookimpl
def register_methods(register):
    register(archscope.Method(name="half-registered", summary="never visible", function=print))
    raise RuntimeError("registration failed on purpose")
