"""What a write SAE's atoms do to the model when they stand in for its own writes.

- `substitution_test`: at positions where an atom fires, the head's write ``W_s`` is replaced
  by the atom scaled to the write's Frobenius norm, ``‖W_s‖·v_i w_iᵀ``, the run continues (the
  backend carries the edit through the recurrence), and the forward KL of the final
  next-token distribution from the clean one is compared against deleting the write
  (``W_s → 0``), a random unit rank-1 matrix of the same norm, and a shuffled atom (another
  atom of the dictionary, same norm). Win rates per firing and per atom, with Wilson 95%
  binomial intervals.
- The closed form: a substitution at s changes the layer's state at the final position T by
  ``ΔS_T = M_T ∘ ⋯ ∘ M_{s+1}(W' − W_s)``, the run's transitions applied to the change of the
  write; the read-out at T, linear in the state given the run's gates, maps it to the logits
  through ``R_j = ∂logit_j(T)/∂W_T`` (one backward pass per scored token and text, the rest of
  the network at the clean run). The prediction ``⟨R_j, ΔS_T⟩`` is compared with the measured
  shift (R²). Two ways to get ``ΔS_T`` (``closed_form``): ``"decay"`` multiplies the layer's
  ``write_decay`` values, ``ΔS_T = (Π_{r=s+1..T} decay_r) ⊙ (W' − W_s)``, exact where the
  transition is that elementwise decay (Mamba, Mamba-2, mLSTM's C, lightning attention) and
  an approximation for a delta rule (gated delta nets, KDA), whose transition also erases
  along each key, ``M_r(S) = (I − β_r k_r k_rᵀ) α_r S``; ``"state"`` reads ``ΔS_T`` from the
  layer's ``ssm_states`` in the edited run, which the backend computes by scanning the write's
  change with the run's own transitions, so it is exact for any transition that is linear in
  the state given the run's parameters (the default where the layer has ``ssm_states``).
- `install`: an atom written into k consecutive positions at c × the write's norm, then
  greedy generation; a target token's rank and presence in the continuation before and after.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...edits import Edit
from ...errors import ParameterError
from ...results import Result
from ._model import WriteLayout, WriteSAE

__all__ = [
    "InstallResult",
    "SubstitutionResult",
    "install",
    "substitution_test",
    "wilson_interval",
]

VARIANTS = ("atom", "deleted", "random", "shuffled")


def wilson_interval(wins: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a binomial proportion ``wins / n``."""
    if n <= 0:
        return (0.0, 1.0)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class SubstitutionResult(Result):
    """The substitution test's outcome.

    ``kl``: per firing and variant (atom, deleted, random, shuffled) the forward KL of the
    final next-token distribution from the clean run's; ``atom_of`` / ``position_of`` /
    ``text_of``: which atom fired where. ``win_rate`` (atom KL < deletion KL) with its Wilson
    interval ``win_ci``; ``win_rate_random`` against the random rank-1 matrix;
    ``control_win_rate``: the shuffled atom against deletion. ``per_atom``: atom → (wins,
    firings, rate); ``atom_population``: the share of the ``n_atoms_counted`` atoms with
    ``min_firings`` firings or more whose own win rate exceeds one half, with its interval. ``closed_form_r2``: R² of the
    closed-form logit shifts against the measured ones (None when not computed);
    ``closed_form``: how its state change was obtained ("decay" or "state", see the module); ``predicted`` / ``measured``: those shifts (substitutions × scored tokens)."""

    site: str
    head: int
    n_firings: int
    win_rate: float
    win_ci: tuple[float, float]
    win_rate_random: float
    control_win_rate: float
    control_ci: tuple[float, float]
    atom_population: float
    atom_population_ci: tuple[float, float]
    mean_atom_win_rate: float
    n_atoms_counted: int
    per_atom: dict[int, tuple[int, int, float]]
    closed_form_r2: float | None
    seconds_per_firing: float
    closed_form: str | None = None
    kl: dict[str, list[float]] = field(default_factory=dict, repr=False)
    atom_of: list[int] = field(default_factory=list, repr=False)
    position_of: list[int] = field(default_factory=list, repr=False)
    text_of: list[int] = field(default_factory=list, repr=False)
    predicted: list[float] = field(default_factory=list, repr=False)
    measured: list[float] = field(default_factory=list, repr=False)

    def to_markdown(self) -> str:
        lo, hi = self.win_ci
        clo, chi = self.control_ci
        plo, phi = self.atom_population_ci
        r2 = (
            "n/a"
            if self.closed_form_r2 is None
            else f"{self.closed_form_r2:.4f} ({self.closed_form})"
        )
        return "\n".join(
            [
                f"### Substitution test on {self.site} (head {self.head})",
                "",
                "| measure | value |",
                "|---|---|",
                f"| firings | {self.n_firings} |",
                f"| atom beats deletion | {self.win_rate:.3f} [{lo:.3f}, {hi:.3f}] |",
                f"| atom beats a random rank-1 write | {self.win_rate_random:.3f} |",
                f"| shuffled atom beats deletion (control) | {self.control_win_rate:.3f} "
                f"[{clo:.3f}, {chi:.3f}] |",
                f"| atoms winning on most of their firings | {self.atom_population:.3f} "
                f"[{plo:.3f}, {phi:.3f}] of {self.n_atoms_counted} |",
                f"| mean per-atom win rate | {self.mean_atom_win_rate:.3f} |",
                f"| closed-form R² (logit shift) | {r2} |",
                f"| seconds per firing | {self.seconds_per_firing:.4f} |",
            ]
        )


def _kl_last(clean: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ edited) of the next-token distributions (rows, vocab)."""
    p = torch.log_softmax(clean.double(), dim=-1)
    q = torch.log_softmax(edited.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0.0)  # >= 0 up to rounding


def _aligned_decay(decay: torch.Tensor, axes: Sequence[str], state_axes: Sequence[str]) -> Any:
    """``decay`` (axes ``axes``) with singleton axes inserted so it broadcasts against the
    state's axes (matched by name)."""
    out = decay
    for i, name in enumerate(state_axes):
        if name not in axes:
            out = out.unsqueeze(i)
    return out


def _suffix_decays(decay: torch.Tensor, last: int) -> torch.Tensor:
    """``P[s] = Π_{r=s+1..last} decay_r`` for s ≤ last (decay: (seq, ...))."""
    out = torch.ones_like(decay[: last + 1])
    for s in range(last - 1, -1, -1):
        out[s] = out[s + 1] * decay[s + 1]
    return out


class _Rows:
    """Edited rows of one text: row r replaces the head's write at ``position[r]`` by
    ``value[r]`` (d_value, d_key)."""

    def __init__(self, layout: WriteLayout) -> None:
        self.layout = layout
        self.position: list[int] = []
        self.value: list[torch.Tensor] = []

    def add(self, position: int, value: torch.Tensor) -> int:
        self.position.append(position)
        self.value.append(value)
        return len(self.position) - 1

    def edit(self, start: int, stop: int) -> Edit:
        layout = self.layout
        rows = torch.arange(stop - start)
        pos = torch.tensor(self.position[start:stop])
        vals = torch.stack(self.value[start:stop])

        def replace(write: torch.Tensor) -> torch.Tensor:
            out = write.clone()
            heads = layout.heads_view(out)
            heads[rows.to(out.device), pos.to(out.device), layout.head] = vals.to(out)
            return out

        return Edit.apply(layout.site, replace)


def _random_rank1(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    v = torch.randn(shape[0], generator=gen)
    w = torch.randn(shape[1], generator=gen)
    return torch.outer(v / v.norm(), w / w.norm())


def _readout(
    backend: Any, ids: torch.Tensor, layout: WriteLayout, last: int, tokens: torch.Tensor
) -> torch.Tensor:
    """``∂logit_j(last)/∂W_last`` for each token j (tokens, d_value, d_key): the read-out of
    the state at the final position, linearised at the clean run."""
    probe = torch.zeros(layout.d_value, layout.d_key, requires_grad=True)

    def add(write: torch.Tensor) -> torch.Tensor:
        out = write.clone()
        heads = layout.heads_view(out)
        heads[:, last, layout.head] = heads[:, last, layout.head] + probe.to(out)
        return out

    with torch.enable_grad():
        logits = backend.run(
            ids, capture=["logits"], edits=[Edit.apply(layout.site, add)], grad=True
        ).logits
        picked = logits[0, last, tokens.to(logits.device)]
        grads = [
            torch.autograd.grad(picked[j], probe, retain_graph=j < len(tokens) - 1)[0]
            for j in range(len(tokens))
        ]
    return torch.stack(grads).detach()


def _fired(codes: torch.Tensor, norms: torch.Tensor, firings: str) -> list[tuple[int, int]]:
    """(position, atom) pairs where an atom fires on a non-zero write."""
    if firings == "top":
        best = codes.max(dim=1)
        pairs = [(s, int(best.indices[s])) for s in range(len(codes)) if best.values[s] > 0]
    else:
        pairs = [(int(s), int(i)) for s, i in (codes > 0).nonzero().tolist()]
    return [(s, i) for s, i in pairs if norms[s] > 0]


@dataclass
class _Collected:
    kl: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    atom_of: list[int] = field(default_factory=list)
    position_of: list[int] = field(default_factory=list)
    text_of: list[int] = field(default_factory=list)
    predicted: list[torch.Tensor] = field(default_factory=list)
    measured: list[torch.Tensor] = field(default_factory=list)


CLOSED_FORMS = ("auto", "state", "decay", "none")


class _Decays:
    """Where the closed form gets the state change at the final position: the layer's
    ``write_decay`` values ("decay") or its ``ssm_states`` in the edited run ("state");
    ``mode`` None: no closed form."""

    def __init__(self, backend: Any, layout: WriteLayout, wanted: bool | str) -> None:
        self.site = layout.site.replace(".state_write", ".write_decay")
        self.states_site = layout.site.replace(".state_write", ".ssm_states")
        self.layout = layout
        sites = backend.sites()
        self.state_axes = tuple(backend.site_info(layout.site).shape)
        has_decay = self.site in sites
        has_states = (
            self.states_site in sites
            and tuple(backend.site_info(self.states_site).shape) == self.state_axes
        )
        mode = ("auto" if wanted else "none") if isinstance(wanted, bool) else wanted
        if mode not in CLOSED_FORMS:
            raise ParameterError(
                f"closed_form={wanted!r}: valid are True/False or one of {', '.join(CLOSED_FORMS)}"
            )
        if mode == "auto":
            mode = "state" if has_states else "decay" if has_decay else "none"
        if mode == "decay" and not has_decay:
            raise ParameterError(
                f"closed_form='decay' needs the site {self.site}, which this backend does not "
                "declare: use closed_form='state' or 'auto'"
            )
        if mode == "state" and not has_states:
            raise ParameterError(
                f"closed_form='state' needs the site {self.states_site} in the write's layout "
                f"{self.state_axes}, which this backend does not declare: use 'decay' or 'auto'"
            )
        self.mode: str | None = None if mode == "none" else mode
        self.present = self.mode == "decay"
        self.axes = tuple(backend.site_info(self.site).shape) if self.present else ()

    def suffix(self, captured: torch.Tensor, last: int) -> torch.Tensor:
        """``Π_{r=s+1..last} decay_r`` per position s, in the head's write shape."""
        decay = _aligned_decay(captured.float().cpu(), self.axes, self.state_axes)
        full = decay.expand(1, captured.shape[1], *self.layout.sizes).contiguous()
        return _suffix_decays(self.layout.take(full)[0], last)


def _one_text(
    sae: WriteSAE,
    backend: Any,
    row: Sequence[int],
    chosen_of: Any,
    decays: _Decays,
    out: _Collected,
    index: int,
    gen: torch.Generator,
    batch_size: int,
    n_tokens: int,
) -> None:
    """Substitutions at the firings ``chosen_of(codes, norms)`` picks in one text."""
    layout = sae.layout
    ids = torch.tensor([list(row)])
    last = len(row) - 1
    capture = [layout.site, "logits"] + ([decays.site] if decays.present else [])
    by_state = decays.mode == "state"
    if by_state:
        capture.append(decays.states_site)
    clean = backend.run(ids, capture=capture)
    write = layout.take(clean[layout.site])[0].float().cpu()  # (seq, dv, dk)
    clean_last = clean.logits[0, last].float().cpu()
    norms = write.flatten(1).norm(dim=1)
    codes = sae.encode(write.flatten(1).to(sae.W_dec.device, sae.W_dec.dtype)).cpu()
    chosen = chosen_of(codes, norms)
    if not chosen:
        return
    atoms = sae.atoms().cpu()
    edits = _Rows(layout)
    slots: list[dict[str, int]] = []
    deleted_at: dict[int, int] = {}
    for s, i in chosen:
        other = int(torch.randint(sae.n_features - 1, (1,), generator=gen))
        other += other >= i
        if s not in deleted_at:
            deleted_at[s] = edits.add(s, torch.zeros_like(write[s]))
        slots.append(
            {
                "atom": edits.add(s, norms[s] * atoms[i]),
                "deleted": deleted_at[s],
                "random": edits.add(
                    s, norms[s] * _random_rank1((layout.d_value, layout.d_key), gen)
                ),
                "shuffled": edits.add(s, norms[s] * atoms[other]),
            }
        )
        out.atom_of.append(i)
        out.position_of.append(s)
        out.text_of.append(index)
    n_rows = len(edits.position)
    final, states = [], []
    edited_capture = ["logits"] + ([decays.states_site] if by_state else [])
    for start in range(0, n_rows, batch_size):
        stop = min(n_rows, start + batch_size)
        run = backend.run(
            ids.expand(stop - start, -1), capture=edited_capture, edits=[edits.edit(start, stop)]
        )
        final.append(run.logits[:, last].float().cpu())
        if by_state:
            states.append(layout.take(run[decays.states_site])[:, last].float().cpu())
    edited_last = torch.cat(final)
    kls = _kl_last(clean_last.expand_as(edited_last), edited_last)
    for slot in slots:
        for variant in VARIANTS:
            out.kl[variant].append(float(kls[slot[variant]]))
    if decays.mode is not None:
        if by_state:
            clean_state = layout.take(clean[decays.states_site])[0, last].float().cpu()
            changes = torch.cat(states) - clean_state
        else:
            suffix = decays.suffix(clean[decays.site], last)
            changes = torch.stack(
                [
                    suffix[s] * (v - write[s])
                    for s, v in zip(edits.position, edits.value, strict=True)
                ]
            )
        tokens = clean_last.topk(min(n_tokens, clean_last.numel())).indices
        read = _readout(backend, ids, layout, last, tokens).cpu().float()  # (j, dv, dk)
        out.predicted.extend(torch.einsum("jab,rab->rj", read, changes))
        out.measured.extend(edited_last[:, tokens] - clean_last[tokens])


@torch.no_grad()
def substitution_test(
    sae: WriteSAE,
    backend: Any,
    rows: Sequence[Sequence[int]],
    *,
    max_firings: int = 512,
    per_text: int = 16,
    batch_size: int = 32,
    n_tokens: int = 8,
    closed_form: bool | str = True,
    min_firings: int = 3,
    firings: str = "top",
    positions: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
) -> SubstitutionResult:
    """Run the substitution test of ``sae`` on ``rows`` (token-id lists), at most
    ``per_text`` firings per text (a seeded random choice) and ``max_firings`` in all.
    ``firings``: "top" takes, at each position, the atom with the largest code (the one that
    stands for the write), "all" every atom that fires there. ``n_tokens``: tokens whose
    logit shift the closed form predicts (the clean run's top ones at the final position);
    ``closed_form``: how the closed form gets the state change at the final position,
    "state" (the layer's ``ssm_states`` in the edited run: the run's own transitions, exact for
    decays and delta rules alike), "decay" (the product of ``write_decay``: exact for
    elementwise decays, an approximation for delta rules), True/"auto" ("state" where the layer
    has ``ssm_states``, else "decay" where it has ``write_decay``, else none), False/"none"
    skips it. ``min_firings``: firings an atom needs to count in the
    atom population. ``positions``: per text, the positions whose firings are tested (e.g.
    where a task binds what the final token recalls; None: every position)."""
    import time

    if firings not in ("top", "all"):
        raise ParameterError(f"firings={firings!r}: use 'top' or 'all'")
    if positions is not None and len(positions) != len(rows):
        raise ParameterError(
            f"positions has {len(positions)} entries for {len(rows)} texts: give one list of "
            "positions per text (or None for every position)"
        )
    gen = torch.Generator().manual_seed(seed)
    decays = _Decays(backend, sae.layout, closed_form)
    out = _Collected()
    started = time.perf_counter()

    allowed: set[int] | None = None

    def choose(codes: torch.Tensor, norms: torch.Tensor) -> list[tuple[int, int]]:
        fired = _fired(codes, norms, firings)
        if allowed is not None:
            fired = [(s, i) for s, i in fired if s in allowed]
        take = min(per_text, max_firings - len(out.atom_of), len(fired))
        return [fired[j] for j in torch.randperm(len(fired), generator=gen)[:take].tolist()]

    for index, row in enumerate(rows):
        if len(out.atom_of) >= max_firings:
            break
        if positions is not None:
            allowed = {p % len(row) for p in positions[index]}
        if len(row) >= 2:
            _one_text(sae, backend, row, choose, decays, out, index, gen, batch_size, n_tokens)
    if not out.atom_of:
        raise ParameterError(
            "no atom fired on the given texts: give more or longer texts, or a write SAE "
            "trained on this model's writes"
        )
    seconds = (time.perf_counter() - started) / len(out.atom_of)
    return _summarise(sae, out, min_firings, seconds, decays.mode)


def _summarise(
    sae: WriteSAE, out: _Collected, min_firings: int, seconds: float, mode: str | None
) -> SubstitutionResult:
    kl, atom_of = out.kl, out.atom_of
    atom_kl = torch.tensor(kl["atom"])
    wins = atom_kl < torch.tensor(kl["deleted"])
    control = torch.tensor(kl["shuffled"]) < torch.tensor(kl["deleted"])
    per_atom: dict[int, tuple[int, int, float]] = {}
    for i in sorted(set(atom_of)):
        mine = torch.tensor([a == i for a in atom_of])
        n_i, w_i = int(mine.sum()), int(wins[mine].sum())
        per_atom[i] = (w_i, n_i, w_i / n_i)
    counted = [v for v in per_atom.values() if v[1] >= min_firings]
    winners = sum(1 for v in counted if v[2] > 0.5)
    r2 = None
    predicted = torch.cat(out.predicted).double() if out.predicted else None
    measured = torch.cat(out.measured).double() if out.measured else None
    if predicted is not None and measured is not None:
        total = (measured - measured.mean()).pow(2).sum()
        r2 = float(1 - (measured - predicted).pow(2).sum() / total) if total > 0 else float("nan")
    n = len(atom_of)
    return SubstitutionResult(
        site=sae.layout.site,
        head=sae.layout.head,
        n_firings=n,
        win_rate=float(wins.float().mean()),
        win_ci=wilson_interval(int(wins.sum()), n),
        win_rate_random=float((atom_kl < torch.tensor(kl["random"])).float().mean()),
        control_win_rate=float(control.float().mean()),
        control_ci=wilson_interval(int(control.sum()), n),
        atom_population=winners / len(counted) if counted else float("nan"),
        atom_population_ci=wilson_interval(winners, len(counted)),
        mean_atom_win_rate=(sum(v[2] for v in counted) / len(counted) if counted else float("nan")),
        n_atoms_counted=len(counted),
        per_atom=per_atom,
        closed_form_r2=r2,
        seconds_per_firing=seconds,
        closed_form=mode if r2 is not None else None,
        kl=kl,
        atom_of=atom_of,
        position_of=out.position_of,
        text_of=out.text_of,
        predicted=predicted.tolist() if predicted is not None else [],
        measured=measured.tolist() if measured is not None else [],
    )


@dataclass
class InstallResult(Result):
    """Installing atom ``atom`` into the last ``k`` positions of each prompt at ``scale`` ×
    the write's norm. ``target``: the token followed; ``rank_before`` / ``rank_after``: its
    mean rank (0 = top) in the next-token distribution at each prompt's end;
    ``present_before`` / ``present_after``: the share of greedy continuations
    (``max_new_tokens``) that contain it."""

    site: str
    atom: int
    k: int
    scale: float
    target: int
    n_prompts: int
    rank_before: float
    rank_after: float
    present_before: float
    present_after: float
    continuations_before: list[list[int]] = field(default_factory=list, repr=False)
    continuations_after: list[list[int]] = field(default_factory=list, repr=False)

    def to_markdown(self) -> str:
        return "\n".join(
            [
                f"### Installing atom {self.atom} ({self.k} positions at {self.scale:g}× the "
                f"write's norm, {self.n_prompts} prompts)",
                "",
                "| target token | rank before | rank after | in continuations before | after |",
                "|---|---|---|---|---|",
                f"| {self.target} | {self.rank_before:.1f} | {self.rank_after:.1f} | "
                f"{self.present_before:.3f} | {self.present_after:.3f} |",
            ]
        )


def _install_edit(sae: WriteSAE, atom: int, positions: list[int], scale: float) -> Edit:
    layout = sae.layout
    direction = sae.atoms()[atom]

    def write_atom(write: torch.Tensor) -> torch.Tensor:
        out = write.clone()
        heads = layout.heads_view(out)[:, :, layout.head]
        for s in positions:
            norm = heads[:, s].flatten(1).norm(dim=1)
            heads[:, s] = scale * norm[:, None, None] * direction.to(out)
        return out

    return Edit.apply(layout.site, write_atom)


def _greedy(backend: Any, ids: list[int], steps: int, edits: list[Edit]) -> tuple[list[int], Any]:
    seq = list(ids)
    first = None
    for _ in range(steps):
        logits = backend.run(torch.tensor([seq]), capture=["logits"], edits=edits).logits[0, -1]
        if first is None:
            first = logits.float().cpu()
        seq.append(int(logits.argmax()))
    return seq[len(ids) :], first


@torch.no_grad()
def install(
    sae: WriteSAE,
    backend: Any,
    prompts: Sequence[Sequence[int]],
    atom: int,
    *,
    target: int | None = None,
    k: int = 3,
    scale: float = 3.0,
    max_new_tokens: int = 8,
) -> InstallResult:
    """Write atom ``atom`` into the last ``k`` positions of each prompt (replacing the head's
    write there by ``scale`` × its norm × the atom), generate greedily, and follow ``target``
    (None: the token whose logit at the prompts' end the install raises most on average)."""
    if not 0 <= atom < sae.n_features:
        raise ParameterError(f"atom={atom}: the write SAE has atoms 0..{sae.n_features - 1}")
    if k < 1 or scale <= 0:
        raise ParameterError(f"k={k}, scale={scale}: give k >= 1 positions and a scale > 0")
    usable = [list(p) for p in prompts if len(p) >= k]
    if not usable:
        raise ParameterError(f"no prompt has the k={k} tokens the install writes into")
    before, after, first_before, first_after = [], [], [], []
    for p in usable:
        edit = _install_edit(sae, atom, list(range(len(p) - k, len(p))), scale)
        cont, logits = _greedy(backend, p, max_new_tokens, [])
        before.append(cont)
        first_before.append(logits)
        cont, logits = _greedy(backend, p, max_new_tokens, [edit])
        after.append(cont)
        first_after.append(logits)
    clean, steered = torch.stack(first_before), torch.stack(first_after)
    if target is None:
        target = int((steered - clean).mean(0).argmax())

    def rank(logits: torch.Tensor) -> float:
        return float((logits > logits[:, target : target + 1]).sum(1).float().mean())

    return InstallResult(
        site=sae.layout.site,
        atom=atom,
        k=k,
        scale=scale,
        target=target,
        n_prompts=len(usable),
        rank_before=rank(clean),
        rank_after=rank(steered),
        present_before=sum(target in c for c in before) / len(usable),
        present_after=sum(target in c for c in after) / len(usable),
        continuations_before=before,
        continuations_after=after,
    )
