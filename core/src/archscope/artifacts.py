"""Fitted objects that outlive a session (probes, sparse autoencoders, tuned lenses): saved as
a folder with ``weights.safetensors`` and ``artifact.json``, and checked on load against the
backend they are applied to."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .errors import ArtifactError

if TYPE_CHECKING:
    import torch

A = TypeVar("A", bound="Artifact")
WEIGHTS = "weights.safetensors"
METADATA = "artifact.json"

#: kind -> Artifact subclass, filled as subclasses are defined (so `Artifact.load` can
#: dispatch without importing anything a file names).
_KINDS: dict[str, type[Artifact]] = {}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model: Any) -> dict[str, Any]:
    """What identifies a model without hashing its weights: class, a hash of its config (when
    it has one) and its parameter count."""
    config = getattr(model, "config", None)
    as_dict = getattr(config, "to_dict", None)
    if callable(as_dict):
        config_dict: Any = as_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config_dict = dataclasses.asdict(config)
    else:
        config_dict = None
    if isinstance(config_dict, dict):  # fields that name the library version, not the model
        config_dict = {
            k: v
            for k, v in config_dict.items()
            if k not in ("transformers_version", "_name_or_path")
        }
    params = getattr(model, "parameters", None)
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config_hash": None if config_dict is None else _digest(config_dict),
        "n_params": sum(int(p.numel()) for p in params()) if callable(params) else None,
    }


def weights_hash(model: Any) -> str:
    """A hash of every parameter and buffer (name, shape, dtype and bytes)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class ArtifactFit:
    """Where an artifact was fitted: backend name, model identity, site and its dimension."""

    backend: str
    site: str
    dim: int
    model: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, backend: Any, site: str) -> ArtifactFit:
        info = backend.site_info(site)
        return cls(
            backend=backend.name,
            site=info.name,
            dim=int(info.dim),
            model=model_identity(backend.model),
        )


class Artifact:
    """Base of fitted objects. A subclass sets ``kind`` and implements `state_tensors`,
    `artifact_config` and `from_state`; the base saves, loads and checks the fit. (The names
    leave ``config`` and ``fit`` free for a subclass's own attributes and methods.)"""

    kind: ClassVar[str] = ""
    #: Where it was fitted (`ArtifactFit.of(backend, site)`); saved and checked on load.
    fitted_on: ArtifactFit | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            _KINDS[cls.kind] = cls

    # -- what subclasses provide ---------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement state_tensors()")

    def artifact_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement artifact_config()")

    @classmethod
    def from_state(cls: type[A], tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> A:
        raise NotImplementedError(f"{cls.__name__} must implement from_state()")

    # -- saving and loading --------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the artifact to the folder ``path`` (created if needed)."""
        from safetensors.torch import save_file

        from ._version import __version__

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        save_file(tensors, str(folder / WEIGHTS), metadata={"kind": self.kind})
        meta = {
            "kind": self.kind,
            "archscope_version": __version__,
            "config": self.artifact_config(),
            "fitted_on": None if self.fitted_on is None else dataclasses.asdict(self.fitted_on),
        }
        (folder / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls: type[A], path: str | Path, backend: Any = None) -> A:
        """Read an artifact saved with `save`; with ``backend``, check that it fits it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / METADATA).is_file() or not (folder / WEIGHTS).is_file():
            raise ArtifactError(
                f"{folder} is not a saved archscope artifact (it needs {METADATA} and {WEIGHTS})"
            )
        try:
            meta = json.loads((folder / METADATA).read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{folder / METADATA} is not valid JSON: {exc.msg}") from None
        kind = meta.get("kind")
        target: type[Artifact] | None = cls if cls.kind else _KINDS.get(str(kind))
        if target is None:
            raise ArtifactError(
                f"{folder} holds a {kind!r} artifact, whose class is not "
                f"imported; known kinds: {', '.join(sorted(_KINDS)) or 'none'}"
            )
        if kind != target.kind:
            raise ArtifactError(
                f"{folder} holds a {kind!r} artifact, not a {target.kind!r} ({target.__name__})"
            )
        try:
            tensors = load_file(str(folder / WEIGHTS))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"cannot read {folder / WEIGHTS}: {exc}") from None
        obj = target.from_state(tensors, meta.get("config") or {})
        obj.fitted_on = ArtifactFit(**meta["fitted_on"]) if meta.get("fitted_on") else None
        if backend is not None:
            obj.check_fits(backend)
        return obj  # type: ignore[return-value]

    def check_fits(self, backend: Any) -> None:
        """Refuse a backend this artifact was not fitted for (backend, site, dimension); warn
        when only the model's identity differs (e.g. a fine-tuned copy). An artifact that
        records no fit is applied with a warning saying that nothing could be checked."""
        if self.fitted_on is None:
            warnings.warn(
                f"archscope: this {self.kind} artifact does not record the model it was fitted "
                f"on, so nothing checks that it fits backend {backend.name!r} (the result is "
                "meaningless on another model). Record it before saving: "
                "artifact.fitted_on = archscope.ArtifactFit.of(backend, site)",
                stacklevel=3,
            )
            return
        fit = self.fitted_on
        problems = []
        if backend.name != fit.backend:
            problems.append(f"backend {backend.name!r} (fitted on {fit.backend!r})")
        if fit.site not in backend.sites():
            problems.append(f"no site {fit.site!r}")
        elif backend.site_info(fit.site).dim != fit.dim:
            problems.append(
                f"{fit.site} has dimension {backend.site_info(fit.site).dim} (fitted on {fit.dim})"
            )
        if problems:
            raise ArtifactError(
                f"this {self.kind} artifact does not fit the given backend: " + "; ".join(problems)
            )
        identity = model_identity(backend.model)
        if fit.model and identity != fit.model:
            warnings.warn(
                f"archscope: this {self.kind} artifact was fitted on another model "
                f"({fit.model.get('class')}, config {fit.model.get('config_hash')}); "
                f"applying it to {identity['class']} (config "
                f"{identity['config_hash']})",
                stacklevel=2,
            )
