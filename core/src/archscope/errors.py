"""Every error archscope raises on purpose: one root, `ArchscopeError`, and one class per kind
of mistake. Each also derives from the builtin a caller would expect (`ValueError` for bad
input, `RuntimeError` for what cannot be done), so ``except ValueError`` keeps working."""

from __future__ import annotations


class ArchscopeError(Exception):
    """Root of every error archscope raises on purpose."""


class SiteError(ArchscopeError, ValueError):
    """A site name that is malformed or that the model does not have."""


class BackendError(ArchscopeError, RuntimeError):
    """A backend cannot serve a model or a request."""


class CapabilityError(BackendError):
    """A method or call needs a capability the backend lacks (the same class everywhere)."""


class PaddingError(BackendError, ValueError):
    """A batch padded on a side the backend cannot handle exactly."""


class NoBackendError(BackendError, ValueError):
    """No registered backend can handle a model (or an unknown hint was given)."""


class NotCapturedError(SiteError, KeyError):
    """A site that a run did not capture, looked up in its result (also a `KeyError`)."""


class MissingKeyError(ArchscopeError, KeyError):
    """A key a result mapping does not have; the message lists those it has."""


class UsageError(ArchscopeError, TypeError):
    """An object of the wrong kind passed to archscope (also a `TypeError`)."""


class DependencyError(ArchscopeError, ImportError):
    """An optional dependency that a feature needs is not installed."""


class MissingFileError(ArchscopeError, FileNotFoundError):
    """A file or folder that should exist (a saved model, a config) does not."""


class InputError(ArchscopeError, ValueError):
    """Inputs a model cannot take (token ids, lengths, shapes, devices)."""


class ParameterError(ArchscopeError, ValueError):
    """An unknown, mistyped or out-of-range method parameter."""


class MethodError(ArchscopeError, LookupError):
    """No registered method of that name."""


class ArtifactError(ArchscopeError, ValueError):
    """A saved artifact that is malformed or does not fit the backend it is applied to."""


class ModelSourceError(ArchscopeError, ValueError):
    """A model spec that no registered source can load."""


class PluginError(ArchscopeError, RuntimeError):
    """Raised in strict mode when a plugin fails to load or register."""
