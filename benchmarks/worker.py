"""One benchmark contender in its own process: loads the saved model and inputs, builds the
library's way of doing a workload, and answers the runner's requests (check, time) as JSON lines.

It runs inside each peer's virtual environment, so it imports only the standard library, torch,
transformers and safetensors at module level; each library is imported by its contender only.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

Outputs = dict[str, Any]  # site name -> tensor


def _load_model(spec: dict[str, Any]) -> Any:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    return model.eval().to(spec["device"])


def _inputs(spec: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    batch = load_file(spec["inputs"])
    if spec["workload"] != "patching":
        batch.pop("corrupted_ids", None)
    return {k: v.to(spec["device"]) for k, v in batch.items()}


def _tokenizer(spec: dict[str, Any]) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(spec["model_dir"])


def _layer_modules(model: Any) -> list[Any]:
    # The block list of the two decoder layouts the workloads use (GPT-2, Llama); peers that
    # address modules by path (nnsight) need it.
    base = getattr(model, "transformer", None) or getattr(model, "model", None)
    return list(base.h if hasattr(base, "h") else base.layers)


def _index(site: str) -> int:
    return int(site.split(".", 1)[0].removeprefix("layer_"))


def _plain(model: Any, batch: dict[str, Any], spec: dict[str, Any]) -> Callable[[], Outputs]:
    import torch

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def run() -> Outputs:
        with torch.no_grad():
            return {"logits": model(**inputs).logits}

    return run


def _archscope(model: Any, batch: dict[str, Any], spec: dict[str, Any]) -> Callable[[], Outputs]:
    import archscope

    if spec["workload"] == "profile":
        from archscope.apps.bench import benchmark

        tokenizer = _tokenizer(spec)

        def profile() -> Outputs:
            import torch

            full = spec["contender"] == "archscope"  # archscope_02api: 0.2's own call
            timings = benchmark("bench-gpt2", model, tokenizer, full=full).timings
            return {f"report.{part} s": torch.tensor(sec) for part, sec in timings.items()}

        return profile
    backend = archscope.Backend.for_model(model)
    sites = list(spec["sites"])
    if spec["workload"] == "logit_lens":

        def lens() -> Outputs:
            result = backend.run(batch, capture=sites)
            return {f"{s}.lens": backend.unembed(result.activations[s]) for s in sites}

        return lens
    capture = [*sites, "logits"] if spec.get("logits") else sites

    def run() -> Outputs:
        return dict(backend.run(batch, capture=capture).activations)

    return run


def _archscope02(model: Any, batch: dict[str, Any], spec: dict[str, Any]) -> Callable[[], Outputs]:
    from archscope.backends import Backend  # 0.2.2, in its own environment

    if spec["workload"] == "profile":
        from archscope.bench import benchmark  # 0.2.2's module (0.3 moved it to apps.bench)

        tokenizer = _tokenizer(spec)

        def tokenize(texts: list[str]) -> dict[str, Any]:
            return dict(tokenizer(texts, return_tensors="pt", padding=True))

        def profile() -> Outputs:
            benchmark("bench-gpt2", model, tokenizer, "transformer", tokenize_fn=tokenize)
            return {}

        return profile

    backend = Backend.for_model(model)
    sites = list(spec["sites"])

    def run() -> Outputs:
        return {r.layer_name: r.activations for r in backend.extract(batch, layers=sites)}

    return run


def _transformer_lens(
    model: Any, batch: dict[str, Any], spec: dict[str, Any]
) -> Callable[[], Outputs]:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        spec["model_dir"], hf_model=model, device=spec["device"], tokenizer=_tokenizer(spec)
    )
    sites = list(spec["sites"])
    ids = batch["input_ids"]
    if spec["workload"] == "mamba_ssm":
        # TransformerLens exposes the SSM state only on its eager (Python) scan, as the whole
        # trajectory (batch, d_inner, seq, d_state): archscope's per-token `ssm_states` are
        # its (batch, seq, ...) view, the state after the last token its final step.
        for block in bridge.blocks:
            block.mixer.eager_scan = True
        layers = {f"blocks.{i}.mixer.hook_ssm_state": i for i in sorted(map(_index, sites))}

        def ssm() -> Outputs:
            with torch.no_grad():
                _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in layers)
            out = {}
            for hook, i in layers.items():
                if f"layer_{i}.ssm_state" in sites:
                    out[f"layer_{i}.ssm_state"] = cache[hook][:, :, -1]
                if f"layer_{i}.ssm_states" in sites:
                    out[f"layer_{i}.ssm_states"] = cache[hook].transpose(1, 2)
            return out

        return ssm
    hooks = {f"blocks.{_index(s)}.hook_resid_post": s for s in sites}
    stop = spec.get("stop_after")
    kwargs: dict[str, Any] = {} if stop is None else {"stop_at_layer": stop + 1}

    def run() -> Outputs:
        with torch.no_grad():
            logits, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in hooks, **kwargs)
        out = {site: cache[hook] for hook, site in hooks.items()}
        if spec.get("logits"):
            out["logits"] = logits
        return out

    return run


def _nnsight(model: Any, batch: dict[str, Any], spec: dict[str, Any]) -> Callable[[], Outputs]:
    import torch
    from nnsight import NNsight

    wrapped = NNsight(model)
    blocks = _layer_modules(wrapped)
    sites = list(spec["sites"])
    stop = spec.get("stop_after")

    def run() -> Outputs:
        saved = []
        with torch.no_grad(), wrapped.trace(**batch) as tracer:
            for site in sites:
                saved.append(blocks[_index(site)].output.save())
            if spec.get("logits"):
                logits = wrapped.output.logits.save()
            if stop is not None:
                tracer.stop()
        out = {
            site: (v[0] if isinstance(v, tuple) else v)
            for site, v in zip(sites, saved, strict=True)
        }
        if spec.get("logits"):
            out["logits"] = logits
        return out

    return run


def _pyvene(model: Any, batch: dict[str, Any], spec: dict[str, Any]) -> Callable[[], Outputs]:
    import pyvene
    import torch

    sites = list(spec["sites"])
    config = pyvene.IntervenableConfig(
        [
            {
                "layer": _index(s),
                "component": "block_output",
                "intervention_type": pyvene.CollectIntervention,
            }
            for s in sites
        ]
    )
    wrapped = pyvene.IntervenableModel(config, model)
    b, t = batch["input_ids"].shape
    every = {"base": [[list(range(t))] * b for _ in sites]}

    def run() -> Outputs:
        with torch.no_grad():
            (_, collected), _ = wrapped(dict(batch), unit_locations=every)
        return dict(zip(sites, collected, strict=False))

    return run


def _tuned_lens(model: Any, batch: dict[str, Any], spec: dict[str, Any]) -> Callable[[], Outputs]:
    import torch
    from tuned_lens.nn.lenses import LogitLens

    lens = LogitLens.from_model(model)
    sites = list(spec["sites"])

    def run() -> Outputs:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
            # hidden_states[-1] already went through the final norm; the last layer's lens
            # logits are the model's logits.
            hidden = out.hidden_states
            result = {f"{s}.lens": lens(hidden[_index(s) + 1], _index(s)) for s in sites[:-1]}
            result[f"{sites[-1]}.lens"] = out.logits
        return result

    return run


def _sae_data(spec: dict[str, Any]) -> tuple[Any, Any]:
    from safetensors.torch import load_file

    acts = load_file(spec["acts"])
    return acts["train"], acts["eval"]


def _explained(x: Any, x_hat: Any) -> float:
    return float(1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _plain_sae(spec: dict[str, Any]) -> Callable[[], Outputs]:
    """The yardstick for SAE training: the straightforward loop (dense matmuls both ways,
    Adam, unit-norm decoder rows after each step), one epoch over the cached activations."""
    import torch

    train, _ = _sae_data(spec)
    d_in, d_sae, k, batch = train.shape[1], spec["features"], spec["k"], spec["batch"]

    def run() -> Outputs:
        torch.manual_seed(0)
        w_dec = torch.nn.Parameter(torch.randn(d_sae, d_in) / d_in**0.5)
        w_enc = torch.nn.Parameter(w_dec.detach().t().clone())
        b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        b_dec = torch.nn.Parameter(torch.zeros(d_in))
        opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=spec["lr"])
        for start in range(0, len(train), batch):
            xb = train[start : start + batch]
            pre = (xb - b_dec) @ w_enc + b_enc
            if spec["sae_type"] == "topk":
                top = pre.topk(k, dim=-1)
                z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
                loss = ((z @ w_dec + b_dec - xb) ** 2).sum(-1).mean()
            else:
                z = pre.relu()
                loss = ((z @ w_dec + b_dec - xb) ** 2).sum(-1).mean() + spec["l1"] * z.abs().sum(
                    -1
                ).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w_dec /= w_dec.norm(dim=1, keepdim=True)
        return {}

    return run


def _archscope_sae(spec: dict[str, Any]) -> Callable[[], Outputs]:
    import torch

    from archscope.methods.sae import SAEConfig, build_sae, export_saelens, fit_sae

    train, held_out = _sae_data(spec)
    config = SAEConfig(
        input_dim=train.shape[1],
        n_features=spec["features"],
        sae_type=spec["sae_type"],
        k=spec["k"],
        batch_size=spec["batch"],
        learning_rate=spec["lr"],
        **({"sparsity": spec["l1"]} if spec["sae_type"] != "topk" else {}),
    )
    exported = [False]

    def run() -> Outputs:
        torch.manual_seed(0)
        # the first run trains check_epochs (results to compare), the timed ones one epoch
        sae = fit_sae(
            train, config, 1 if exported[0] else spec["check_epochs"], sae=build_sae(config)
        )
        if exported[0]:
            return {}
        exported[0] = True  # the first run: held-out quality and the SAELens export
        export_saelens(sae, spec["tmp"] + f"/{spec['workload']}.export")
        with torch.no_grad():
            x_hat = sae.reconstruct(held_out)
            l0 = (sae.encode(held_out) != 0).float().sum(-1).mean()
        return {"reconstruction": x_hat, **_quality(held_out, x_hat, l0, spec)}

    return run


def _quality(held_out: Any, x_hat: Any, l0: Any, spec: dict[str, Any]) -> Outputs:
    import torch

    after = f"after {spec['check_epochs']} epochs"
    return {
        f"report.held-out explained variance {after}": torch.tensor(_explained(held_out, x_hat)),
        f"report.held-out L0 {after}": l0,
    }


def _sae_lens(spec: dict[str, Any]) -> Callable[[], Outputs]:
    import torch
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    train, held_out = _sae_data(spec)
    batch = spec["batch"]
    first = [True]

    def batches() -> Any:
        while True:
            for start in range(0, len(train), batch):
                yield train[start : start + batch]

    def run() -> Outputs:
        torch.manual_seed(0)
        if spec["sae_type"] == "topk":
            sae: Any = TopKTrainingSAE(
                TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=spec["features"], k=spec["k"])
            )
        else:
            sae = StandardTrainingSAE(
                StandardTrainingSAEConfig(
                    d_in=train.shape[1], d_sae=spec["features"], l1_coefficient=spec["l1"]
                )
            )
        epochs = spec["check_epochs"] if first[0] else 1
        config = SAETrainerConfig(
            total_training_samples=len(train) * epochs,
            train_batch_size_samples=batch,
            lr=spec["lr"],
            lr_end=spec["lr"],
        )
        SAETrainer(config, sae, batches()).fit()
        if not first[0]:
            return {}
        first[0] = False
        with torch.no_grad():
            z = sae.encode(held_out)
            x_hat = sae.decode(z)
        return _quality(held_out, x_hat, (z != 0).float().sum(-1).mean(), spec)

    return run


def _sae_lens_export(spec: dict[str, Any]) -> Callable[[], Outputs]:
    """archscope's SAE as SAELens loads it from the exported folder."""
    import torch
    from sae_lens import SAE

    _, held_out = _sae_data(spec)

    def run() -> Outputs:
        sae = SAE.load_from_disk(spec["tmp"] + f"/{spec['workload']}.export")
        with torch.no_grad():
            return {"reconstruction": sae.decode(sae.encode(held_out))}

    return run


def _sae(contender: str) -> Callable[[Any, dict[str, Any], dict[str, Any]], Callable[[], Outputs]]:
    makers = {
        "plain": _plain_sae,
        "archscope": _archscope_sae,
        "sae_lens": _sae_lens,
        "sae_lens_export": _sae_lens_export,
    }
    return lambda model, batch, spec: makers[contender](spec)


def _contrast(batch: dict[str, Any]) -> tuple[Any, Any]:
    # The saved inputs hold the clean ids and their corrupted copy (same length).
    return batch["input_ids"], batch["corrupted_ids"]


def _archscope_patch(
    model: Any, batch: dict[str, Any], spec: dict[str, Any]
) -> Callable[[], Outputs]:
    import torch

    from archscope.methods.attribute import attribution_patch, patch_sweep

    clean, corrupted = _contrast(batch)

    def exact() -> Outputs:
        # embed=True: rows are the residual before every block (TransformerLens's resid_pre)
        sweep = patch_sweep(model, clean, corrupted, embed=True, batch_size=spec["rows"])
        grid = torch.tensor(sweep.gap_restored, dtype=torch.float32)
        return {"gap_restored": grid[:-1]}  # the last row (after the last block) has no peer

    def estimate() -> Outputs:
        sweep = attribution_patch(model, clean, corrupted, embed=True)
        return {"attribution": torch.tensor(sweep.attribution, dtype=torch.float32)}

    return estimate if spec["contender"] == "archscope_atp" else exact


def _transformer_lens_patch(
    model: Any, batch: dict[str, Any], spec: dict[str, Any]
) -> Callable[[], Outputs]:
    import torch
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        spec["model_dir"], hf_model=model, device=spec["device"], tokenizer=_tokenizer(spec)
    )
    clean, corrupted = _contrast(batch)

    def run() -> Outputs:
        # The same metric as archscope's default: the logit of the clean run's top last
        # token minus the corrupted run's, as the fraction of the clean-corrupted gap.
        with torch.no_grad():
            clean_logits, cache = bridge.run_with_cache(clean)
            corrupted_logits = bridge(corrupted)
            a = clean_logits[:, -1].argmax(-1)[:, None]
            b = corrupted_logits[:, -1].argmax(-1)[:, None]

            def diff(logits: Any) -> Any:
                last = logits[:, -1]
                return (last.gather(1, a) - last.gather(1, b)).mean()

            high, low = diff(clean_logits), diff(corrupted_logits)
            grid = patching.get_act_patch_resid_pre(
                bridge, corrupted, cache, lambda logits: (diff(logits) - low) / (high - low)
            )
        return {"gap_restored": torch.as_tensor(grid, dtype=torch.float32)}

    return run


CONTENDERS: dict[str, Callable[[Any, dict[str, Any], dict[str, Any]], Callable[[], Outputs]]] = {
    "plain": _plain,
    "archscope": _archscope,
    "archscope02": _archscope02,
    "archscope_02api": _archscope,
    "transformer_lens": _transformer_lens,
    "nnsight": _nnsight,
    "pyvene": _pyvene,
    "tuned_lens": _tuned_lens,
}
PATCHING = {
    "plain": _plain,
    "archscope": _archscope_patch,
    "archscope_atp": _archscope_patch,
    "transformer_lens": _transformer_lens_patch,
}


# -- (6b) tuned-lens training: held-out KL after each epoch against training time ----------
def _heldout_kl(model: Any, ids: Any, predict: Callable[[int, Any], Any]) -> float:
    """Mean over the block outputs both lenses translate (all but the last block's, whose
    lens is the model's output) and over every held-out token of KL(final || lens).
    ``predict(i, h)``: the lens's logits for block i's output ``h`` (``hidden_states[i+1]``)."""
    import torch

    totals: dict[int, float] = {}  # block index -> summed KL
    n = 0
    with torch.no_grad():
        for start in range(0, len(ids), 16):
            out = model(input_ids=ids[start : start + 16], output_hidden_states=True)
            final = out.logits.float().log_softmax(-1)
            for i, h in enumerate(out.hidden_states[1:-1]):
                logp = predict(i, h).float().log_softmax(-1)
                kl = float((final.exp() * (final - logp)).sum(-1).sum())
                totals[i] = totals.get(i, 0.0) + kl
            n += final.shape[0] * final.shape[1]
    return sum(totals.values()) / n / len(totals)


class _Clock:
    """Training time with the held-out evaluations taken out."""

    def __init__(self) -> None:
        self.seconds, self.curve, self.started = 0.0, [], time.perf_counter()

    def record(self, kl: Callable[[], float]) -> None:
        self.seconds += time.perf_counter() - self.started
        self.curve.append((self.seconds, kl()))
        self.started = time.perf_counter()

    def outputs(self) -> Outputs:
        import torch

        return {
            "seconds": torch.tensor([t for t, _ in self.curve]),
            "heldout_kl": torch.tensor([k for _, k in self.curve]),
        }


def _archscope_lens_training(
    model: Any, batch: dict[str, Any], spec: dict[str, Any]
) -> Callable[[], Outputs]:
    import archscope
    from archscope.methods.lens import TunedLens

    backend = archscope.Backend.for_model(model)
    rows, held = batch["train_ids"].tolist(), batch["eval_ids"]

    def run() -> Outputs:
        clock = _Clock()

        def progress(epoch: int, lens: TunedLens) -> None:
            clock.record(
                lambda: _heldout_kl(model, held, lambda i, h: backend.unembed(lens.translate(i, h)))
            )

        TunedLens.fit_rows(
            backend,
            rows,
            epochs=spec["epochs"],
            lr=spec["lr"],
            batch_size=16,
            eval_rows=rows[:1],
            progress=progress,
        )
        return clock.outputs()

    return run


def _tuned_lens_training(
    model: Any, batch: dict[str, Any], spec: dict[str, Any]
) -> Callable[[], Outputs]:
    """tuned-lens's `TunedLens` trained the way its `train` command does (its optimiser
    defaults: SGD with Nesterov momentum 0.9 at lr 1.0 x (1 - 0.9), weight decay 1e-3, linear
    decay; gradient norm clipped to 1; KL to the final logits at every hidden state but the
    last, under bfloat16 autocast), one optimiser step per batch of 16 rows."""
    import torch
    from transformers import get_linear_schedule_with_warmup
    from tuned_lens import TunedLens

    train, held = batch["train_ids"], batch["eval_ids"]
    batches = [train[i : i + 16] for i in range(0, len(train), 16)]

    def run() -> Outputs:
        torch.manual_seed(0)
        clock = _Clock()
        lens = TunedLens.from_model(model)
        params = [p for p in lens.parameters() if p.requires_grad]
        # tuned_lens.scripts.ingredients.Optimizer's defaults, written out: that module
        # imports torchdata.dataloader2, which current torchdata no longer has.
        opt = torch.optim.SGD(
            params, lr=1.0 * (1 - 0.9), momentum=0.9, nesterov=True, weight_decay=1e-3
        )
        schedule = get_linear_schedule_with_warmup(opt, 0, spec["epochs"] * len(batches))
        for _ in range(spec["epochs"]):
            for ids in batches:
                with torch.no_grad():
                    out = model(input_ids=ids, output_hidden_states=True)
                labels = out.logits.float().log_softmax(-1)
                for i, h in enumerate(out.hidden_states[:-1]):
                    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
                        logits = lens(h, idx=i)
                        loss = (labels.exp() * (labels - logits.log_softmax(-1))).sum(-1).mean()
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=False)
                schedule.step()
            # tuned-lens's index 0 is the embedding output; block i's output is index i + 1
            clock.record(
                lambda: _heldout_kl(model, held, lambda layer, hidden: lens(hidden, idx=layer + 1))
            )
        return clock.outputs()

    return run


LENS_TRAINING = {"archscope": _archscope_lens_training, "tuned_lens_train": _tuned_lens_training}


def _maker(spec: dict[str, Any]) -> Callable[..., Callable[[], Outputs]]:
    """The function that builds the contender's run for this workload."""
    contender, workload = spec["contender"], spec["workload"]
    if workload.startswith("sae"):
        return _sae(contender)
    table = {"patching": PATCHING, "lens_training": LENS_TRAINING}.get(workload, CONTENDERS)
    return table[contender]


def _versions(spec: dict[str, Any]) -> dict[str, str]:
    from importlib import metadata

    found = {}
    for dist in ("torch", "transformers", *spec.get("dists", ())):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def _maxrss_mb() -> float:
    """The process's peak resident memory (MB) since the last `_reset_peak`."""
    try:  # VmHWM is the value ru_maxrss reports, and one that can be reset
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    # Loading the model peaks above a forward pass; forget that peak so the run's own shows.
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _no_sync() -> None:
    pass


def main() -> None:
    # Libraries print to stdout; replies go on a private copy of it, everything else to stderr.
    reply_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(obj: dict[str, Any]) -> None:
        reply_stream.write(json.dumps(obj) + "\n")
        reply_stream.flush()

    import torch

    spec: dict[str, Any] = {}
    run: Callable[[], Outputs] | None = None
    plain: Callable[[], Outputs] | None = None
    sync: Callable[[], None] = _no_sync
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "setup":
                spec = request["spec"]
                torch.set_num_threads(spec["threads"])
                torch.manual_seed(0)
                if spec["device"].startswith("cuda"):
                    sync = torch.cuda.synchronize
                sae = spec["workload"].startswith("sae")
                model = None if sae else _load_model(spec)
                batch = {} if sae else _inputs(spec)
                rss0 = _maxrss_mb()
                run = _maker(spec)(model, batch, spec)
                reply({"ok": True, "rss_loaded_mb": rss0, "versions": _versions(spec)})
            elif op == "check":
                # The first call of the contender: its peak memory is read right after it,
                # before the process has run anything else of size.
                assert run is not None
                _reset_peak()
                before = _maxrss_mb()
                out = run()
                peak = _maxrss_mb()
                from safetensors.torch import save_file

                report = {
                    k.removeprefix("report."): round(float(out.pop(k)), 4)
                    for k in list(out)
                    if k.startswith("report.")
                }
                save_file(
                    {k: v.detach().float().cpu().contiguous() for k, v in out.items()},
                    request["path"],
                )
                reply(
                    {
                        "ok": True,
                        "rss_before_mb": before,
                        "rss_peak_mb": peak,
                        "report": report,
                        "gpu_peak_mb": (
                            torch.cuda.max_memory_allocated() / 2**20
                            if spec["device"].startswith("cuda")
                            else None
                        ),
                    }
                )
            elif op == "time":
                assert run is not None
                if plain is None and spec["workload"].startswith("sae"):
                    plain = _plain_sae(spec)
                elif plain is None:  # a separate copy: some peers wrap the model they are given
                    plain = _plain(_load_model(spec), _inputs(spec), spec)
                times = {}
                for name, fn in (("plain", plain), ("case", run)):
                    sync()
                    start = time.perf_counter()
                    fn()
                    sync()
                    times[name] = time.perf_counter() - start
                reply({"ok": True, **times})
            elif op == "exit":
                reply({"ok": True})
                return
        except Exception as error:  # reported to the runner, which excludes the contender
            reply({"ok": False, "error": f"{type(error).__name__}: {error}"[:500]})


if __name__ == "__main__":
    main()
