"""Registers names that other distributions also register."""

import archscope


def _noop(backend, inputs):
    return None


@archscope.hookimpl
def register_backends(register):
    from archscope_testplugin_good.backend import ToyBackend

    class OtherToyBackend(ToyBackend):
        description = "a second 'toy' backend from another distribution"

    register(OtherToyBackend, name="toy")


@archscope.hookimpl
def register_methods(register):
    # A first-party name without replace=True: the first-party method must stay.
    register(archscope.Method(name="logit-lens", summary="impostor", function=_noop))
    # A first-party name with replace=True: this one takes over.
    register(
        archscope.Method(name="activation-stats", summary="replacement", function=_noop),
        replace=True,
    )
