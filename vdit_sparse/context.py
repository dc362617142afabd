"""What an attention call knows about where it runs: the step, the layer, the tokens.

One :class:`StepContext` is built by the transformer hook at every forward of
the transformer (see :mod:`vdit_sparse.api`) and handed, with the layer index,
to every attention call of that forward as an :class:`AttentionCall`.  Nothing
here is global: the state lives on the handle that :func:`accelerate_pipeline`
returns.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch

from .geometry import TokenLayout

__all__ = ["StepContext", "AttentionCall", "FeedForwardCall", "RunStats", "StateStore"]


@dataclass(frozen=True)
class StepContext:
    """One forward of the transformer.

    ``step_index`` counts denoising steps from 0 and is derived from the
    timestep the transformer receives, matched against the scheduler's
    timesteps, so two calls of one step (conditional and unconditional under
    true CFG) share it.  ``call_kind`` tells those calls apart: 0 for the first
    call of a step, 1 for the second, and so on.  ``warmup`` is True on the
    dense warm-up steps the profile asks for; a method reads it (and the step
    index) to follow its own schedule.
    """

    step_index: int
    num_steps: int
    timestep: float
    call_kind: int
    layout: TokenLayout
    warmup: bool = False


@dataclass
class RunStats:
    """Counters of what actually ran, per attention path, since the last reset.

    ``calls`` counts attention calls per path name (``"dense"`` for the
    untouched processor or dense heads, otherwise the method name; a layer
    whose heads mix methods counts once per method).  Work is counted in
    query-key pairs over batch and heads: a dense call of ``B`` x ``H`` heads
    over ``S`` tokens is ``B * H * S * S``; a sparse call adds the pairs its
    kept blocks cover.  ``computed_fraction`` is the share of dense attention
    work actually done, text included, over the whole run.  A fraction may be
    a tensor on the GPU: it is added up there and read only when asked for.
    """

    calls: Counter = field(default_factory=Counter)
    computed_pairs: float | torch.Tensor = 0.0
    dense_pairs: float = 0.0

    def record(self, path: str, computed_fraction: float | torch.Tensor, batch_heads: int, seq_len: int) -> None:
        pairs = float(batch_heads) * seq_len * seq_len
        self.calls[path] += 1
        self.computed_pairs = self.computed_pairs + computed_fraction * pairs
        self.dense_pairs += pairs

    @property
    def computed_fraction(self) -> float:
        return 1.0 if self.dense_pairs == 0 else float(self.computed_pairs) / self.dense_pairs

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "computed_fraction": self.computed_fraction}

    def reset(self) -> None:
        self.calls.clear()
        self.computed_pairs = self.dense_pairs = 0.0


class StateStore:
    """What methods keep across the steps of one pipeline call, and its size.

    One dict per key (layer, call kind, head group): a method reads and
    writes its own through :attr:`AttentionCall.state`.  Everything is
    dropped when the pipeline call ends (and on ``handle.reset()`` and
    ``remove()``); :attr:`peak_bytes` is the most the tensors in it held at
    the end of any transformer forward of the run.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple, dict] = {}
        self.peak_bytes = 0

    def slot(self, key: tuple) -> dict:
        return self._slots.setdefault(key, {})

    def nbytes(self) -> int:
        """Bytes held by the tensors in the store (each storage counted once)."""
        seen: dict[int, int] = {}

        def visit(value) -> None:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            elif isinstance(value, dict):
                for item in value.values():
                    visit(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    visit(item)
            elif dataclasses.is_dataclass(value):
                visit(vars(value))

        visit(self._slots)
        return sum(seen.values())

    def update_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def clear(self) -> None:
        self._slots.clear()

    def new_run(self) -> None:
        self._slots.clear()
        self.peak_bytes = 0


@dataclass(frozen=True)
class AttentionCall:
    """Everything a method may read about one attention call.

    ``key_padding_mask`` is ``(B, S)`` bool, True where the key is a real
    token (HunyuanVideo pads its text), or None.  ``head_offset`` is the index
    of this call's first head among the model's heads: 0 on one GPU, the
    rank's first head under Ulysses context parallelism.  ``heads`` are the
    model's (global) indices of the heads the method serves in this call, in
    the order of the q, k, v it receives; ``block_m`` / ``block_n`` the
    layer's block geometry and ``backend`` (``"triton"`` or ``"reference"``)
    where its plan runs.  ``state`` is the method's own dict for this layer,
    call kind and head group, kept across the steps of one pipeline call.
    """

    layer_index: int
    step: StepContext
    key_padding_mask: torch.Tensor | None
    stats: RunStats
    head_offset: int = 0
    heads: tuple[int, ...] = ()
    block_m: int = 0
    block_n: int = 0
    backend: str = "reference"
    state: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def layout(self) -> TokenLayout:
        return self.step.layout


@dataclass(frozen=True)
class FeedForwardCall:
    """What a method may read about one call of a block's feed-forward (see ``AttentionMethod.feed_forward``).

    ``stream`` names the site (``"joint"``, ``"video"`` or ``"text"``);
    ``state`` is the method's dict for this layer, call kind and stream,
    kept across the steps of one pipeline call.
    """

    layer_index: int
    stream: str
    step: StepContext
    state: dict = field(default_factory=dict, compare=False, repr=False)
