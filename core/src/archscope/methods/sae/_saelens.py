"""SAELens's on-disk layout, so SAEs move between the two libraries: a folder with
``cfg.json`` and ``sae_weights.safetensors`` holding ``W_enc`` (d_in, d_sae), ``b_enc``,
``W_dec`` (d_sae, d_in), ``b_dec`` (and ``threshold`` for JumpReLU).

Export folds the input scale into the weights (it is a power of two, so this is exact) and
writes ``normalize_activations: "none"``: SAELens then applies the SAE to raw activations.
archscope-only details (sae type, scale, site, hyper-parameters) go in top-level
``archscope_*`` keys, which SAELens ignores; import undoes the folding bit-exactly.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ...errors import ArtifactError
from ._models import SAE, BatchTopKSAE, SAEConfig, build_sae, canonical_sae_type

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: archscope sae_type -> SAELens architecture
ARCHITECTURES = {"dense": "standard", "rank1": "standard", "topk": "topk", "batchtopk": "jumprelu"}
_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def export_saelens(
    sae: SAE, path: str | Path, *, hook_name: str | None = None, model_name: str | None = None
) -> Path:
    """Write ``sae`` in SAELens's layout to the folder ``path`` (created if needed).

    ``hook_name`` is what SAELens records as the hook point (default: the archscope site the
    SAE was fitted on); ``model_name`` the model's name. BatchTopK SAEs are written as JumpReLU
    SAEs with their inference threshold, as SAELens itself saves them.
    """
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    scale = float(sae.input_scale)
    with torch.no_grad():
        zeros_f = torch.zeros(sae.n_features, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        zeros_d = torch.zeros(sae.input_dim, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        tensors = {
            "W_enc": sae.W_enc * scale,
            "b_enc": sae.b_enc if sae.has_biases else zeros_f,
            "W_dec": sae.W_dec / scale,
            "b_dec": sae.b_dec / scale if sae.has_biases else zeros_d,
        }
        if isinstance(sae, BatchTopKSAE):
            tensors["threshold"] = sae.threshold
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE)
    )
    site = sae.site or (sae.fitted_on.site if sae.fitted_on is not None else None)
    cfg: dict[str, Any] = {
        "architecture": ARCHITECTURES[sae.sae_type],
        "d_in": sae.input_dim,
        "d_sae": sae.n_features,
        "dtype": _dtype_name(sae.W_dec.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "meta": {"model_name": model_name, "hook_name": hook_name or site},
        "archscope_sae_type": sae.sae_type,
        "archscope_input_scale": scale,
        "archscope_site": site,
        "archscope_config": sae.cfg.to_dict(),
    }
    if sae.sae_type == "topk":
        cfg["k"] = int(sae.cfg.k)
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


_TL_SITES = [  # TransformerLens hook names -> archscope sites
    (re.compile(r"blocks\.(\d+)\.hook_resid_post$"), lambda i: f"layer_{i}.residual"),
    (re.compile(r"blocks\.(\d+)\.hook_mlp_out$"), lambda i: f"layer_{i}.mlp"),
    (re.compile(r"blocks\.(\d+)\.hook_attn_out$"), lambda i: f"layer_{i}.attn"),
    (
        re.compile(r"blocks\.(\d+)\.hook_resid_pre$"),
        lambda i: "embed" if i == 0 else f"layer_{i - 1}.residual",
    ),
]


def site_of_hook(hook_name: str | None) -> str | None:
    """The archscope site of a SAELens / TransformerLens hook name, when there is one."""
    if not hook_name:
        return None
    from ...sites import Site

    try:
        return str(Site.parse(hook_name))
    except ValueError:
        pass
    for pattern, make in _TL_SITES:
        match = pattern.match(hook_name)
        if match:
            return make(int(match.group(1)))
    return None


def import_saelens(path: str | Path) -> SAE:  # noqa: C901 - one check per cfg key
    """Read an SAE written in SAELens's layout (by SAELens or by `export_saelens`).

    Architectures ``standard`` (ReLU), ``topk`` and ``jumprelu`` are read (a JumpReLU SAE
    becomes a `BatchTopKSAE` with its per-feature thresholds). An SAE that does not subtract
    ``b_dec`` from its input has that folded into ``b_enc``. The site is taken from the
    hook name when it maps onto an archscope site (``sae.hook_name`` keeps the original).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ArtifactError(
            f"{folder} is not an SAELens SAE folder (it needs {CFG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read the SAELens SAE in {folder}: {exc}") from None
    arch = cfg.get("architecture")
    if arch is None:  # SAELens < 6 wrote the activation function instead
        arch = "topk" if cfg.get("activation_fn_str") == "topk" else "standard"
    wanted = cfg.get("archscope_sae_type")
    types = {"standard": "dense", "topk": "topk", "jumprelu": "batchtopk"}
    if arch not in types:
        raise ArtifactError(
            f"SAELens architecture {arch!r} cannot be read; readable: {', '.join(types)}"
        )
    sae_type = wanted if wanted in ARCHITECTURES and ARCHITECTURES[wanted] == arch else types[arch]
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec") if n not in tensors]
    if arch == "jumprelu" and "threshold" not in tensors:
        missing.append("threshold")
    if missing:
        raise ArtifactError(f"{folder / WEIGHTS_FILE} lacks {missing}; it holds {sorted(tensors)}")
    d_in, d_sae = (int(n) for n in tensors["W_enc"].shape)
    if tuple(tensors["W_dec"].shape) != (d_sae, d_in) or (
        cfg.get("d_in", d_in),
        cfg.get("d_sae", d_sae),
    ) != (d_in, d_sae):
        raise ArtifactError(
            f"inconsistent shapes in {folder}: W_enc {tuple(tensors['W_enc'].shape)}"
            f", W_dec {tuple(tensors['W_dec'].shape)}, cfg d_in "
            f"{cfg.get('d_in')} d_sae {cfg.get('d_sae')}"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, "expected_average_only_in"):
        raise ArtifactError(
            f"normalize_activations {norm!r} is not supported; readable: "
            "'none' (or 'expected_average_only_in' with the factor folded in)"
        )
    if norm == "expected_average_only_in":
        warnings.warn(
            "archscope: this SAE expects inputs scaled by a factor SAELens keeps "
            "outside the file; it is read as if that factor were folded in",
            stacklevel=2,
        )
    stored = cfg.get("archscope_config")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    config = SAEConfig.from_dict(
        {
            **(stored if isinstance(stored, dict) else {}),
            "input_dim": d_in,
            "n_features": d_sae,
            "sae_type": canonical_sae_type(sae_type),
            **({} if k is None else {"k": int(k)}),
        }
    )
    dtype = tensors["W_enc"].dtype
    sae = build_sae(config).to(dtype)
    scale = float(cfg.get("archscope_input_scale", 1.0))
    w_enc, b_enc, w_dec, b_dec = (tensors[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # x W + b_enc == (x - b_dec) W + (b_enc + b_dec W)
    with torch.no_grad():
        sae.input_scale.fill_(scale)
        sae.W_enc.copy_(w_enc / scale)
        sae.W_dec.copy_(w_dec * scale)
        if sae.has_biases:
            sae.b_enc.copy_(b_enc)
            sae.b_dec.copy_(b_dec * scale)
        elif bool(b_enc.any()) or bool(b_dec.any()):
            raise ArtifactError("this SAE has biases, so it cannot be read as a rank-1 SAE")
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.copy_(tensors["threshold"])
    meta = cfg.get("meta") or {}
    sae.hook_name = meta.get("hook_name", cfg.get("hook_name"))
    sae.site = cfg.get("archscope_site") or site_of_hook(sae.hook_name)
    return sae
