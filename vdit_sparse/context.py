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

__all__ = ["StepContext", "AttentionCall", "FeedForwardCall", "RunStats", "StateStore", "Slot", "Offloaded"]


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


class Slot(dict):
    """One method's state in a :class:`StateStore` (a dict), able to keep tensors in host memory.

    :meth:`offload` moves a tensor the method will read back unchanged to
    pinned host memory, asynchronously; :meth:`fetch` brings it back to its
    device.  Fetching from one slot starts copying the next slot's offloaded
    tensors (slots in the order they first offloaded, which is layer order)
    on a side stream, so on a step that reads them layer by layer each copy
    overlaps the layer before.  Off the GPU both are plain references.
    """

    def __init__(self, store: "StateStore", key: tuple):
        super().__init__()
        self.store, self.key = store, key

    def offload(self, name: str, tensor: torch.Tensor) -> None:
        self[name] = self.store._offload(self.key, tensor)

    def fetch(self, name: str) -> torch.Tensor:
        value = self[name]
        return self.store._fetch(self.key, value) if isinstance(value, Offloaded) else value


class Offloaded:
    """A tensor kept in pinned host memory (or, off the GPU, the tensor itself) and its copies in flight."""

    def __init__(self, host: torch.Tensor, device: torch.device, written: "torch.cuda.Event | None"):
        self.host, self.device, self.written = host, device, written
        self.prefetched: torch.Tensor | None = None
        self.arrived: "torch.cuda.Event | None" = None


class StateStore:
    """What methods keep across the steps of one pipeline call, and its size.

    One :class:`Slot` per key (layer, call kind, head group): a method reads
    and writes its own through :attr:`AttentionCall.state`.  Everything is
    dropped when the pipeline call ends (and on ``handle.reset()`` and
    ``remove()``); :attr:`peak_bytes` is the most the tensors in it held at
    the end of any transformer forward of the run (host memory included;
    :meth:`nbytes` tells them apart).
    """

    def __init__(self) -> None:
        self._slots: dict[tuple, Slot] = {}
        self._offloading: list[tuple] = []  # slots that offloaded, in the order they first did
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.peak_bytes = 0

    def slot(self, key: tuple) -> Slot:
        if key not in self._slots:
            self._slots[key] = Slot(self, key)
        return self._slots[key]

    # -- host memory --------------------------------------------------------------

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device)
        return self._copy_streams[device]

    def _offload(self, key: tuple, tensor: torch.Tensor) -> Offloaded:
        if key not in self._offloading:
            self._offloading.append(key)
        if tensor.device.type != "cuda":
            return Offloaded(tensor, tensor.device, None)
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            written = torch.cuda.Event()
            written.record(stream)
        tensor.record_stream(stream)  # not reused before the copy is done
        return Offloaded(host, tensor.device, written)

    def _fetch(self, key: tuple, value: Offloaded) -> torch.Tensor:
        if value.device.type != "cuda":
            return value.host
        current = torch.cuda.current_stream(value.device)
        if value.prefetched is None:
            self._prefetch_slot(key)
        current.wait_event(value.arrived)
        tensor, value.prefetched = value.prefetched, None
        tensor.record_stream(current)  # allocated on the copy stream, used here
        position = self._offloading.index(key)
        self._prefetch_slot(self._offloading[(position + 1) % len(self._offloading)])
        return tensor

    def _prefetch_slot(self, key: tuple) -> None:
        for value in self._slots[key].values():
            if isinstance(value, Offloaded) and value.prefetched is None and value.device.type == "cuda":
                stream = self._stream(value.device)
                stream.wait_stream(torch.cuda.current_stream(value.device))  # memory freed there may be reused
                with torch.cuda.stream(stream):
                    value.prefetched = value.host.to(value.device, non_blocking=True)
                    value.arrived = torch.cuda.Event()
                    value.arrived.record(stream)

    # -- size ---------------------------------------------------------------------

    def nbytes(self, device_type: str | None = None) -> int:
        """Bytes held by the tensors in the store (each storage counted once), or by those on ``device_type``
        (``"cuda"``, ``"cpu"``) only."""
        seen: dict[int, int] = {}

        def visit(value) -> None:
            if isinstance(value, torch.Tensor):
                if device_type is None or value.device.type == device_type:
                    storage = value.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
            elif isinstance(value, Offloaded):
                visit(value.host)
                visit(value.prefetched)
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
        self._offloading.clear()

    def new_run(self) -> None:
        self.clear()
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
