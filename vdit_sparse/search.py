"""Offline search of a Sparse-vDiT profile (:mod:`vdit_sparse.methods.svdit`): ``vdit-sparse search``.

The search runs the pipeline on a few prompts and seeds and, at every sparse
step (after the dense warm-up), in every layer and head, scores each candidate
mode on that call's own q, k and v:

1. ``num_samples`` query rows spread over the video get their exact attention
   output and their output under each candidate's mask (the same block masks
   the kernel will run, lifted to tokens);
2. a candidate's *error* is the mean squared difference from the exact output,
   divided by the layer's mean squared output (the mean over its heads, so a
   head whose output is small costs little to skip: skipping it scores its share of the
   layer's output energy); its *cost* is the fraction of (query block, key
   block) pairs it computes;
3. per head the mode minimising ``error + lam * cost`` wins (dense costs
   ``lam``, skip costs its error), among the candidates whose error is at most
   ``epsilon``; when none is, the head stays dense.  Errors are averaged over
   every scored call (prompts, seeds, steps) before choosing.

Decisions are applied as they are made: each layer attends with its current
choice, so later layers (and later steps) see the errors of earlier ones.
Vertical-stripe candidates take, per head, the key blocks that received the
most attention so far.

Then the **sensitivity** of each layer: at one step of the first prompt, the
relative L2 error of the transformer's output when only that layer runs its
chosen modes (blocks before it are replayed from the dense pass, so a layer
costs the forward of the blocks from it on).  The final choice weights each
layer's head errors by its sensitivity relative to the mean (an error in a
layer whose errors reach the output more counts more) and, under a compute
``budget`` (the fraction of attention work of a sparse step), fits ``lam``
to it: the most sensitive layers keep the most dense heads, and a layer all
of whose heads choose dense becomes a dense layer.

The result is a profile ``accelerate_pipeline`` reads unchanged, with the
sensitivities and the provenance (model, prompts, seeds, call arguments,
settings, date, package version, time, peak memory).  Everything the search
has measured is kept in ``<out>.record.pt``, saved after every prompt and
layer: a search started again with the same settings resumes from it after an
interruption, and once finished, a search with only another ``budget``
refits the profile from it without running the pipeline.

Example::

    from vdit_sparse.reference_model import REFERENCE_CALL_ARGS, build_reference_pipeline
    from vdit_sparse.search import SearchSettings, search_profile

    profile = search_profile(build_reference_pipeline(), ["red circle moving right"], [0],
                             dict(REFERENCE_CALL_ARGS), SearchSettings(budget=0.5), out="searched.yaml")
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import torch
import yaml

from .api import AccelerationHandle, accelerate_pipeline, check_profile
from .context import AttentionCall
from .geometry import TokenLayout
from .methods.base import AttentionMethod
from .methods.block_sparse import BlockSparseParams
from .methods.svdit import MODES, format_column_ranges, mode_plan
from .methods.svg import row_masks, sample_rows
from .patterns import block_has_text
from .pipelines import find_adapter
from .plan import HeadPlan, combine_plans
from .profile import load_profile
from .routing import HeadGroup, LayerRouting

__all__ = ["SearchSettings", "candidate_errors", "choose_modes", "search_profile"]

SPARSE_MODES = ("diagonal", "multi_diagonal", "vertical_stripe")


@dataclass
class SearchSettings:
    """What the search tries and how it chooses; every field is written into the profile's provenance."""

    #: Modes to try (dense is always a candidate).
    modes: tuple = MODES
    #: Densities tried for diagonal and multi-diagonal bands and for vertical stripes (share of key blocks).
    densities: tuple = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)
    #: Weight of the computed fraction in the loss ``error + lam * cost``.
    lam: float = 0.1
    #: Candidates with a larger error are not taken; a head whose every sparse candidate is above stays dense.
    epsilon: float = 0.5
    #: Query rows sampled per call to score the candidates.
    num_samples: int = 64
    #: Dense warm-up, as a fraction of the steps, of the search runs and of the profile written.
    warmup_fraction: float = 0.2
    #: Target fraction of attention work on a sparse step: ``lam`` is fitted to it (see :func:`allocate_budget`).
    budget: float | None = None
    #: Where in the sparse steps the sensitivities are measured (0 first sparse step, 1 last).
    sensitivity_at: float = 0.5
    block_size: int | None = None

    def __post_init__(self) -> None:
        self.modes, self.densities = tuple(self.modes), tuple(float(d) for d in self.densities)
        bad = [mode for mode in self.modes if mode not in MODES]
        if bad:
            raise ValueError(f"unknown modes {bad}; allowed: {MODES}")
        if not self.densities or not all(0.0 < d <= 1.0 for d in self.densities):
            raise ValueError(f"densities must be in (0, 1], got {self.densities}")
        if self.lam < 0 or self.epsilon < 0:
            raise ValueError(f"lam and epsilon must be >= 0, got {self.lam} and {self.epsilon}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if not 0.0 <= self.sensitivity_at <= 1.0:
            raise ValueError(f"sensitivity_at must be in [0, 1], got {self.sensitivity_at}")

    def candidates(self) -> list[tuple[str, float]]:
        """(mode, density) pairs in a fixed order; dense first."""
        found = [("dense", 1.0)]
        if "skip" in self.modes:
            found.append(("skip", 0.0))
        found += [(mode, d) for mode in SPARSE_MODES if mode in self.modes for d in self.densities]
        return found


# -- scoring one call ---------------------------------------------------------------


def _stripe_blocks(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Bool ``(H, nKB)``: per head the ``density`` share of the key blocks with the most mass (at least one)."""
    count = max(1, round(density * mass.shape[-1]))
    top = mass.topk(count, dim=-1).indices
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)


def _video_block_mass(probs: torch.Tensor, layout: TokenLayout, block_n: int) -> torch.Tensor:
    """float ``(H, nKB)``: attention mass of the sampled rows on each key block's video keys, summed over batch and rows."""
    video = probs[..., layout.video_start : layout.video_end].sum(dim=(0, 2))  # (H, Nv)
    blocks = torch.arange(layout.video_start, layout.video_end, device=probs.device) // block_n
    num_kv_blocks = -(-layout.seq_len // block_n)
    mass = torch.zeros(video.shape[0], num_kv_blocks, dtype=torch.float32, device=probs.device)
    return mass.index_add_(1, blocks, video.float())


@dataclass(eq=False)
class _LayoutCandidates:
    """What scoring derives from one layout once: sampled rows, and the band candidates' plans and row masks."""

    rows: torch.Tensor
    plans: dict  # (mode, density) -> one-head HeadPlan, band modes and dense/skip
    masks: dict  # (mode, density) -> bool (R, S) token mask of the sampled rows, band modes
    costs: dict  # (mode, density) -> computed fraction


def _layout_candidates(layout: TokenLayout, settings: SearchSettings, block_m: int, block_n: int, device) -> _LayoutCandidates:
    rows = sample_rows(layout, settings.num_samples, device)
    plans, masks, costs = {}, {}, {}
    for mode, density in settings.candidates():
        if mode == "vertical_stripe":
            continue
        plan = mode_plan(layout, mode, block_m, block_n, device, density=density)
        plans[(mode, density)], costs[(mode, density)] = plan, float(plan.density)
        if mode in ("diagonal", "multi_diagonal"):
            from .kernels.reference import indices_to_block_mask

            num_kv_blocks = -(-layout.seq_len // block_n)
            band = indices_to_block_mask(plan.kv_block_indices, plan.kv_block_counts, num_kv_blocks)[0, 0]
            spatial, temporal = row_masks(layout, band, rows, block_m, block_n)
            masks[(mode, density)] = spatial if mode == "diagonal" else temporal
    return _LayoutCandidates(rows, plans, masks, costs)


def candidate_errors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, settings: SearchSettings,
    block_m: int, block_n: int, key_padding_mask: torch.Tensor | None = None, *, stripe_mass: torch.Tensor | None = None,
    parts: _LayoutCandidates | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every candidate of ``settings`` on one call's q, k, v ``(B, H, S, D)``.

    Returns ``(errors, costs, mass)``: float64 ``(H, C)`` relative errors and
    ``(H, C)`` computed fractions, in the order of
    :meth:`SearchSettings.candidates`, and this call's attention mass per
    video key block ``(H, nKB)``.  Vertical stripes take the blocks with the
    most mass in ``stripe_mass + mass`` (``stripe_mass``: what earlier calls
    saw).  Memory is ``O(B H R S)`` for ``R`` sampled rows.
    """
    from .kernels.reference import masked_row_errors_reference

    parts = parts or _layout_candidates(layout, settings, block_m, block_n, q.device)
    rows = parts.rows
    scores = torch.matmul(q[:, :, rows], k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        scores.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    del scores
    exact = torch.matmul(probs.to(v.dtype), v).float()
    energy = exact.pow(2).mean(dim=(-1, -2))  # (B, H): the error of skipping the head
    scale = energy.mean(dim=1, keepdim=True).clamp_min(1e-30)  # the layer's mean over heads
    mass = _video_block_mass(probs, layout, block_n)
    del probs, exact
    total_mass = mass if stripe_mass is None else stripe_mass.to(mass.device) + mass

    candidates = settings.candidates()
    heads = q.shape[1]
    masks, slots = [], []
    costs = torch.zeros(heads, len(candidates), dtype=torch.float64)
    key_blocks = torch.arange(layout.seq_len, device=q.device) // block_n
    text_columns = block_has_text(layout, block_n, q.device)  # key blocks with text: kept in every row
    text_rows = block_has_text(layout, block_m, q.device)  # query blocks with text: every key kept
    for index, (mode, density) in enumerate(candidates):
        if mode == "vertical_stripe":  # as vertical_stripe_block_mask lifts the stripes the search would write
            kept = _stripe_blocks(total_mass, density) | text_columns  # (H, nKB)
            share = kept.double().mean(dim=1)
            costs[:, index] = (share + text_rows.double().mean() * (1 - share)).cpu()
            token_mask = kept[:, key_blocks][:, None, :] | text_rows[rows // block_m][None, :, None]
            masks.append(token_mask)  # (H, R, S)
            slots.append(index)
        else:
            costs[:, index] = parts.costs[(mode, density)]
            if (mode, density) in parts.masks:
                masks.append(parts.masks[(mode, density)])
                slots.append(index)
    errors = torch.zeros(q.shape[0], heads, len(candidates), dtype=torch.float32, device=q.device)
    if masks:
        errors[..., slots] = masked_row_errors_reference(q, k, v, rows, masks, key_padding_mask)
    if ("skip", 0.0) in candidates:
        errors[..., candidates.index(("skip", 0.0))] = energy
    relative = (errors / scale[..., None]).mean(dim=0).double().cpu()
    return relative, costs, mass


def choose_modes(errors: torch.Tensor, costs: torch.Tensor, settings: SearchSettings, lam: float | None = None) -> list[int]:
    """Per head the index of the candidate minimising ``error + lam * cost`` among those with error <= epsilon
    (dense, index 0, always qualifies); ``lam`` defaults to ``settings.lam``."""
    lam = settings.lam if lam is None else lam
    loss = errors + lam * costs
    loss = torch.where(errors <= settings.epsilon, loss, torch.full_like(loss, math.inf))
    loss[:, 0] = lam  # dense: no error, all the cost
    return loss.argmin(dim=1).tolist()


# -- the search-time method and its record ----------------------------------------------


class _Record:
    """Everything the search has seen, per layer; saved to and restored from ``<out>.record.pt``."""

    def __init__(self, settings: SearchSettings):
        self.settings = settings
        self.error_sums: dict[int, torch.Tensor] = {}
        self.costs: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.mass: dict[int, torch.Tensor] = {}
        self.layout: TokenLayout | None = None
        self.block_sizes: tuple[int, int] | None = None
        self.units_done: list[tuple[str, int]] = []
        self.sensitivity: dict[int, float] = {}
        self.seconds = 0.0

    def add(self, layer: int, errors: torch.Tensor, costs: torch.Tensor, mass: torch.Tensor) -> None:
        if layer in self.error_sums:
            self.error_sums[layer] += errors
            self.mass[layer] += mass.cpu()
        else:
            self.error_sums[layer], self.mass[layer] = errors.clone(), mass.cpu().clone()
        self.costs[layer] = costs  # stripes: the costs of the latest choice of blocks
        self.counts[layer] = self.counts.get(layer, 0) + 1

    def decisions(self, layer: int, lam: float | None = None) -> list[tuple[str, float]] | None:
        """Per head (mode, density) from everything seen so far; None before the layer was scored."""
        if layer not in self.error_sums:
            return None
        candidates = self.settings.candidates()
        chosen = choose_modes(self.error_sums[layer] / self.counts[layer], self.costs[layer], self.settings, lam)
        return [candidates[i] for i in chosen]

    def stripe_blocks(self, layer: int, head: int, density: float) -> torch.Tensor:
        return _stripe_blocks(self.mass[layer][head : head + 1], density)[0]

    def state(self) -> dict:
        return {
            "settings": dataclasses.asdict(self.settings), "error_sums": self.error_sums, "costs": self.costs,
            "counts": self.counts, "mass": self.mass, "layout": self.layout, "block_sizes": self.block_sizes,
            "units_done": self.units_done, "sensitivity": self.sensitivity, "seconds": self.seconds,
        }

    def restore(self, state: dict) -> None:
        for key in ("error_sums", "costs", "counts", "mass", "layout", "block_sizes", "units_done", "sensitivity", "seconds"):
            setattr(self, key, state[key])


def _stripe_columns(layout: TokenLayout, blocks: torch.Tensor, block_n: int) -> torch.Tensor:
    """Sequence indices of the video tokens in the kept key blocks."""
    tokens = torch.arange(layout.seq_len)
    kept = blocks.cpu()[tokens // block_n] & ~layout.is_text()
    return tokens[kept]


def _head_plan(record: _Record, layer: int, head: int, decision: tuple[str, float], parts: _LayoutCandidates,
               layout: TokenLayout, block_m: int, block_n: int, device) -> HeadPlan:
    mode, density = decision
    if mode != "vertical_stripe":
        return parts.plans[(mode, density)]
    columns = _stripe_columns(layout, record.stripe_blocks(layer, head, density), block_n).to(device)
    return mode_plan(layout, mode, block_m, block_n, device, columns=columns)


class _SearchMethod(AttentionMethod):
    """Scores the candidates on every sparse call of its layer and attends with the choices so far."""

    name = "svdit-search"

    def __init__(self, record: _Record):
        super().__init__(BlockSparseParams(block_size=record.settings.block_size))  # the layer's block geometry
        self.record = record
        self._parts: dict = {}

    def uses_model_processor(self, call):
        return call.step.warmup

    def plan(self, q, k, v, call: AttentionCall) -> HeadPlan:
        record, layer, layout = self.record, call.layer_index, call.layout
        if record.layout is None:
            record.layout, record.block_sizes = layout, (call.block_m, call.block_n)
        elif (record.layout, record.block_sizes) != (layout, (call.block_m, call.block_n)):
            raise RuntimeError(
                f"the search saw two token layouts ({record.layout} and {layout}); search at one size and frame count"
            )
        key = (layout, call.block_m, call.block_n, str(q.device))
        if key not in self._parts:
            self._parts[key] = _layout_candidates(layout, record.settings, call.block_m, call.block_n, q.device)
        parts = self._parts[key]
        errors, costs, mass = candidate_errors(
            q, k, v, layout, record.settings, call.block_m, call.block_n, call.key_padding_mask,
            stripe_mass=record.mass.get(layer), parts=parts,
        )
        record.add(layer, errors, costs, mass)
        decisions = record.decisions(layer)
        heads = q.shape[1]
        plans = [
            (torch.tensor([h], device=q.device),
             _head_plan(record, layer, call.heads[h], decision, parts, layout, call.block_m, call.block_n, q.device))
            for h, decision in enumerate(decisions)
        ]
        return combine_plans(plans, heads, layout.seq_len)


def _search_handle(pipe: Any, record: _Record) -> AccelerationHandle:
    """The pipeline with every layer routed to one :class:`_SearchMethod` over all heads."""
    profile = check_profile(pipe, {"name": "svdit-search", "method": "dense",
                                   "dense_warmup_fraction": record.settings.warmup_fraction})
    adapter, method = find_adapter(pipe), _SearchMethod(record)
    heads = tuple(range(adapter.num_heads(pipe.transformer)))
    layers = [LayerRouting(layer, [HeadGroup(method, heads)])
              for layer in range(len(adapter.attention_modules(pipe.transformer)))]
    handle = AccelerationHandle(pipe, adapter, profile, layers)
    handle._install()
    return handle


# -- sensitivity ---------------------------------------------------------------------


class _Captured(Exception):
    """Stops a pipeline call once the transformer inputs of the wanted step are captured."""


def _capture_inputs(pipe: Any, adapter: Any, prompt: str, seed: int, call_args: dict, step: int) -> tuple[tuple, dict]:
    """The transformer's (args, kwargs) at the first forward of ``step`` of a dense call (the conditional one
    when true CFG calls it twice a step)."""
    from .api import StepTracker
    from .pipelines.base import bind_forward_inputs

    tracker, captured = StepTracker(pipe), []

    def hook(module, args, kwargs):
        index, _, call_kind = tracker.observe(adapter.timestep(bind_forward_inputs(module.forward, args, kwargs)))
        if index == step and call_kind == 0:
            captured.append((args, kwargs))
            raise _Captured

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **call_args)
    except _Captured:
        return captured[0]
    finally:
        handle.remove()
    raise RuntimeError(f"the pipeline never reached step {step}, where the sensitivities are measured")


def _output(result: Any) -> torch.Tensor:
    return (result[0] if isinstance(result, (tuple, list)) else result.sample).float()


def layer_profile(decisions: list[tuple[str, float]], stripes: dict) -> dict:
    """The ``layers`` entry of one layer's decisions: heads grouped into ranges of equal params."""
    params = []
    for head, (mode, density) in enumerate(decisions):
        entry: dict = {"mode": mode}
        if mode in ("diagonal", "multi_diagonal"):
            entry["density"] = density
        if mode == "vertical_stripe":
            entry["columns"] = stripes[head]
        params.append(entry)
    heads, start = {}, 0
    for head in range(1, len(params) + 1):
        if head == len(params) or params[head] != params[start]:
            key = str(start) if head - 1 == start else f"{start}-{head - 1}"
            heads[key] = {"params": params[start]}
            start = head
    return {"heads": heads}


def _layer_lams(record: _Record, num_layers: int, lam: float) -> list[float]:
    """Each layer's cost weight: ``lam`` over the layer's sensitivity relative to the mean.

    Choosing per head ``w * error + lam * cost`` with ``w`` the layer's
    relative sensitivity is the same as ``error + (lam / w) * cost``: errors in
    layers whose output error reaches the final output more weigh more, so
    those layers keep more dense heads.  A layer without a measured
    sensitivity (dense at the search's own ``lam``) weighs as the most sensitive one.
    """
    measured = record.sensitivity
    if not measured:
        return [lam] * num_layers
    mean = max(sum(measured.values()) / len(measured), 1e-30)
    top = max(measured.values()) / mean
    return [lam / max(measured[layer] / mean if layer in measured else top, 1e-12) for layer in range(num_layers)]


def _layer_entries(record: _Record, lams: list[float]) -> dict[int, dict]:
    layout, (_, block_n) = record.layout, record.block_sizes
    entries = {}
    for layer, lam in enumerate(lams):
        decisions = record.decisions(layer, lam)
        if decisions is None:
            continue
        stripes = {
            head: format_column_ranges(
                _stripe_columns(layout, record.stripe_blocks(layer, head, density), block_n) - layout.video_start
            )
            for head, (mode, density) in enumerate(decisions) if mode == "vertical_stripe"
        }
        entries[layer] = layer_profile(decisions, stripes)
    return entries


def _layer_costs(record: _Record, lams: list[float]) -> list[float]:
    """Per layer the computed fraction of its chosen modes (1 for a layer never scored)."""
    index = {candidate: i for i, candidate in enumerate(record.settings.candidates())}
    costs = []
    for layer, lam in enumerate(lams):
        decisions = record.decisions(layer, lam)
        if decisions is None:
            costs.append(1.0)
        else:
            costs.append(float(sum(record.costs[layer][h, index[d]] for h, d in enumerate(decisions)) / len(decisions)))
    return costs


#: The weights tried when the cost weight is fitted to a budget (log-spaced, 1e-4 .. 1e3).
_LAMBDAS = tuple(10 ** (i / 8) for i in range(-32, 25))


def allocate_budget(record: _Record, num_layers: int) -> tuple[float, list[float], list[float]]:
    """``(lam, per-layer cost weights, per-layer computed fractions)`` of the profile to write.

    Errors are weighted by layer sensitivity (:func:`_layer_lams`).  Without a
    budget ``lam`` is the settings'; with one it is the smallest weight whose
    choices fit the budget, so the profile spends the budget where the
    sensitivity-weighted error drops most: the most sensitive layers keep the
    most dense heads, and a layer all of whose heads choose dense is a dense layer.
    """
    settings = record.settings

    def fraction(lam: float) -> float:
        return sum(_layer_costs(record, _layer_lams(record, num_layers, lam))) / num_layers

    lam = settings.lam
    if settings.budget is not None:
        fitting = [value for value in _LAMBDAS if fraction(value) <= settings.budget + 1e-9]
        lam = fitting[0] if fitting else _LAMBDAS[-1]
    lams = _layer_lams(record, num_layers, lam)
    return lam, lams, _layer_costs(record, lams)


def profile_from_record(record: _Record, family: str, num_layers: int, num_heads: int, name: str,
                        provenance: dict) -> dict:
    """The profile (a plain dict) of a finished search: per-head modes, dense layers and lam from the budget."""
    from . import __version__

    settings = record.settings
    lam, lams, costs = allocate_budget(record, num_layers)
    fraction = sum(costs) / num_layers
    entries = _layer_entries(record, lams)
    dense_layers = [layer for layer in range(num_layers) if costs[layer] >= 1.0]
    layers = {}
    for layer in range(num_layers):
        entry = {} if layer in dense_layers else dict(entries.get(layer, {}))
        if layer in record.sensitivity:
            entry["sensitivity"] = float(record.sensitivity[layer])
        if entry:
            layers[layer] = entry
    grid = record.layout.grid
    return {
        "name": name,
        "description": (
            f"Sparse-vDiT profile searched by vdit-sparse search on {provenance.get('model')}: one static pattern "
            f"per head (dense, skip, diagonal, multi-diagonal, vertical stripe), errors weighted by layer "
            f"sensitivity; {len(dense_layers)} layers dense; {fraction:.3f} of the attention work of a sparse step."
        ),
        "model": {"family": family, "num_layers": num_layers, "num_heads": num_heads},
        "method": "svdit",
        "params": {"mode": "dense", **({"block_size": settings.block_size} if settings.block_size else {})},
        "dense_warmup_fraction": settings.warmup_fraction,
        "dense_layers": dense_layers,
        "layers": layers,
        "provenance": {
            "tool": "vdit-sparse search",
            "package_version": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **provenance,
            "token_layout": {"frames": grid.frames, "height": grid.height, "width": grid.width,
                             "text_length": record.layout.text_length},
            "block_sizes": list(record.block_sizes),
            "settings": {key: list(value) if isinstance(value, tuple) else value
                         for key, value in dataclasses.asdict(settings).items()},
            "lam_used": lam,
            "sparse_step_computed_fraction": fraction,
            "seconds": round(record.seconds, 2),
        },
    }


# -- the search ------------------------------------------------------------------------


def _peak_memory(device: torch.device) -> dict:
    """Peak memory of this process so far, in MiB (profiles hold 32-bit integers; these are floats)."""
    mib = 2.0**20
    peak = {"host_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / mib, 1)}
    if device.type == "cuda":
        peak["device_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / mib, 1)
    return peak


def search_profile(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    call_args: dict,
    settings: SearchSettings | None = None,
    *,
    out: Union[str, Path, None] = None,
    name: str = "svdit-searched",
    model_name: str | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Search a Sparse-vDiT profile for ``pipe``; returns the profile as a dict (and writes it as YAML to ``out``).

    ``call_args`` are the pipeline keyword arguments of the size to search at
    (size, frames, steps, guidance), without ``prompt``, ``generator`` or
    ``output_type``.  With ``out``, what the search measured is kept in
    ``<out>.record.pt``; ``resume`` continues from it (or, when it is
    complete, only refits) when its settings match, ``budget`` aside.
    """
    from tqdm.auto import tqdm

    settings = settings or SearchSettings()
    if not prompts or not seeds:
        raise ValueError(f"search needs at least one prompt and one seed, got {len(prompts)} and {len(seeds)}")
    reserved = sorted({"prompt", "generator", "output_type"} & set(call_args))
    if reserved:
        raise ValueError(f"call_args must not set {reserved}; the search sets them per run")
    adapter = find_adapter(pipe)
    experts = len(adapter.transformers(pipe))
    if experts > 1:
        raise ValueError(f"the search covers one transformer; {type(pipe).__name__} runs "
                         f"{experts} (two experts): search each expert's model on its own")
    num_layers, num_heads = adapter.layers_and_heads(pipe)
    units = [(str(prompt), int(seed)) for prompt in prompts for seed in seeds]
    record = _Record(settings)
    partial = Path(str(out) + ".record.pt") if out is not None else None
    if partial is not None and resume and partial.exists():
        state = torch.load(partial, weights_only=False)
        runs_alike = {**state["settings"], "budget": None} == {**dataclasses.asdict(settings), "budget": None}
        if runs_alike and all(unit in units for unit in state["units_done"]):  # the budget only refits
            record.restore(state)
    device = pipe.transformer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipe.set_progress_bar_config(disable=True)

    def save() -> None:
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            torch.save(record.state(), partial)

    todo = [unit for unit in units if unit not in record.units_done]
    started = time.perf_counter()
    bar = tqdm(total=len(todo), desc="search: prompts x seeds", disable=not progress or not todo)
    for prompt, seed in todo:
        with _search_handle(pipe, record):
            pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **call_args)
        record.units_done.append((prompt, seed))
        record.seconds += time.perf_counter() - started
        started = time.perf_counter()
        save()
        bar.update()
    bar.close()

    # Sensitivity: at one sparse step of the first prompt and seed, only one layer sparse at a time.
    sparse_layers = [layer for layer in range(num_layers)
                     if any(mode != "dense" for mode, _ in (record.decisions(layer) or []))]
    todo_layers = [layer for layer in sparse_layers if layer not in record.sensitivity]
    if todo_layers:
        num_steps = int(call_args.get("num_inference_steps", 50))
        warmup = math.ceil(settings.warmup_fraction * num_steps)
        step = warmup + round(settings.sensitivity_at * (num_steps - 1 - warmup))
        (prompt, seed) = units[0]
        args, kwargs = _capture_inputs(pipe, adapter, prompt, seed, call_args, step)
        entries = _layer_entries(record, [settings.lam] * num_layers)
        _measure_sensitivity(pipe, adapter, args, kwargs, entries, todo_layers, record, save, progress)
        record.seconds += time.perf_counter() - started
        save()
    provenance = {
        "model": model_name or type(pipe).__name__,
        "prompts": [str(p) for p in prompts],
        "seeds": [int(s) for s in seeds],
        "call_args": {key: value for key, value in call_args.items() if isinstance(value, (int, float, str, bool))},
        **_peak_memory(device),
    }
    profile = profile_from_record(record, adapter.family, num_layers, num_heads, name, provenance)
    load_profile(profile)  # what we write must load
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(yaml.safe_dump(profile, sort_keys=False, default_flow_style=None, width=100))
    return profile


def _measure_sensitivity(pipe, adapter, args, kwargs, entries, layers, record, save, progress) -> None:
    """Relative L2 of the transformer output with only each layer sparse, blocks before it replayed."""
    from tqdm.auto import tqdm

    transformer = pipe.transformer
    blocks = adapter.blocks(transformer)
    # Block outputs of the dense pass: on the device while it keeps 16 GiB free, else in host memory.
    cached: dict[int, Any] = {}
    on_cuda = transformer.device.type == "cuda"

    def moved(value, device):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        return type(value)(moved(item, device) for item in value) if isinstance(value, (tuple, list)) else value

    def keep(block_index):
        def hook(module, inputs, output):
            room = on_cuda and torch.cuda.mem_get_info(transformer.device)[0] > 16 * 2**30
            cached[block_index] = output if room else moved(output, "cpu")
        return hook

    hooks = [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            dense = _output(transformer(*args, **kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    for layer in tqdm(layers, desc="search: layer sensitivity", disable=not progress):
        profile = {"name": f"svdit-layer-{layer}", "method": "svdit", "params": {"mode": "dense"},
                   "layers": {layer: entries[layer]}}
        replayed = []
        if layer > 0:
            replay = moved(cached[layer - 1], dense.device)
        for index in range(layer):  # blocks before the sparse one give the dense output of the last of them
            blocks[index].forward = (lambda out: (lambda *a, **k: out))(replay)
            replayed.append(blocks[index])
        try:
            with accelerate_pipeline(pipe, profile), torch.no_grad():
                sparse = _output(transformer(*args, **kwargs))
        finally:
            for block in replayed:
                del block.forward
        record.sensitivity[layer] = float((sparse - dense).norm() / dense.norm().clamp_min(1e-30))
        save()
