"""What an attention call knows about where it runs: the step, the layer, the tokens.

One :class:`StepContext` is built by the transformer hook at every forward of
the transformer (see :mod:`vdit_sparse.api`) and handed, with the layer index,
to every attention call of that forward as an :class:`AttentionCall`.  Nothing
here is global: the state lives on the handle that :func:`accelerate_pipeline`
returns.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .geometry import TokenLayout

__all__ = ["StepContext", "AttentionCall", "RunStats"]


@dataclass(frozen=True)
class StepContext:
    """One forward of the transformer.

    ``step_index`` counts denoising steps from 0 and is derived from the
    timestep the transformer receives, matched against the scheduler's
    timesteps, so two calls of one step (conditional and unconditional under
    true CFG) share it.  ``call_kind`` tells those calls apart: 0 for the first
    call of a step, 1 for the second, and so on.  Per-step caches key on
    ``(layer_index, call_kind)`` so one kind never overwrites the other.
    """

    step_index: int
    num_steps: int
    timestep: float
    call_kind: int
    layout: TokenLayout


@dataclass
class RunStats:
    """Counters of what actually ran, per attention path, since the last reset.

    ``calls`` counts attention calls per path name (``"dense"`` for the
    untouched processor, otherwise the method name).  Work is counted in
    query-key pairs over batch and heads: a dense call of ``B`` x ``H`` heads
    over ``S`` tokens is ``B * H * S * S``; a sparse call adds the pairs its
    kept blocks cover.  ``computed_fraction`` is the share of dense attention
    work actually done, text included, over the whole run.
    """

    calls: Counter = field(default_factory=Counter)
    computed_pairs: float = 0.0
    dense_pairs: float = 0.0

    def record(self, path: str, computed_fraction: float, batch_heads: int, seq_len: int) -> None:
        pairs = float(batch_heads) * seq_len * seq_len
        self.calls[path] += 1
        self.computed_pairs += computed_fraction * pairs
        self.dense_pairs += pairs

    @property
    def computed_fraction(self) -> float:
        return 1.0 if self.dense_pairs == 0 else self.computed_pairs / self.dense_pairs

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "computed_fraction": self.computed_fraction}

    def reset(self) -> None:
        self.calls.clear()
        self.computed_pairs = self.dense_pairs = 0.0


@dataclass(frozen=True)
class AttentionCall:
    """Everything a method may read about one attention call.

    ``key_padding_mask`` is ``(B, S)`` bool, True where the key is a real
    token (HunyuanVideo pads its text), or None.  ``head_offset`` is the index
    of this call's first head among the model's heads: 0 on one GPU, the
    rank's first head under Ulysses context parallelism, so per-head plans
    written for the whole model still apply.
    """

    layer_index: int
    step: StepContext
    key_padding_mask: torch.Tensor | None
    stats: RunStats
    head_offset: int = 0

    @property
    def layout(self) -> TokenLayout:
        return self.step.layout

    @property
    def cache_key(self) -> tuple[int, int]:
        """Key for state a method keeps across steps: one per layer and per call kind."""
        return (self.layer_index, self.step.call_kind)
