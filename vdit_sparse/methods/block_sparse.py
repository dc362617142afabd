"""Block-sparse methods whose mask depends only on the token layout, and ``sliding_frames``.

:class:`BlockSparseMethod` is the base of every method that attends under a
block mask: its parameters carry the block geometry and the backend, and a
method whose mask depends only on the layout implements
:meth:`~BlockSparseMethod.layout_block_mask` and gets one cached
:class:`~vdit_sparse.plan.HeadPlan` per layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..geometry import TokenLayout
from ..kernels.block_sizes import SUPPORTED_BLOCK_SIZES, default_block_sizes
from ..patterns import frame_band_block_mask
from ..plan import HeadPlan
from .base import AttentionMethod, register_method

__all__ = [
    "BACKENDS",
    "BlockSparseMethod",
    "BlockSparseParams",
    "SlidingFramesMethod",
    "block_sizes_for",
    "resolve_backend",
]

#: ``auto`` takes the Triton kernel on CUDA and the reference path elsewhere.
BACKENDS = ("auto", "reference", "triton")


@dataclass
class BlockSparseParams:
    #: Tokens per query and key block; None picks the kernel's preferred sizes
    #: for the head dim, on every backend, so both compute the same mask.
    block_size: Optional[int] = None
    backend: str = "auto"

    def validate(self) -> str | None:
        if self.block_size is not None and self.block_size not in SUPPORTED_BLOCK_SIZES:
            return f"field 'block_size' must be one of {SUPPORTED_BLOCK_SIZES} or null, got {self.block_size}"
        if self.backend not in BACKENDS:
            return f"field 'backend' must be one of {BACKENDS}, got {self.backend!r}"
        return None


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``auto`` -> ``triton`` for CUDA tensors, ``reference`` otherwise."""
    if backend == "auto":
        return "triton" if q.is_cuda else "reference"
    return backend


def block_sizes_for(block_size: int | None, head_dim: int) -> tuple[int, int]:
    """(block_m, block_n) for one call: the profile's choice, else the kernels' default for the head dim."""
    if block_size is not None:
        return block_size, block_size
    return default_block_sizes(head_dim)


class BlockSparseMethod(AttentionMethod):
    """Base for methods that attend under a block mask.

    A method whose mask depends only on the token layout implements
    :meth:`layout_block_mask` and gets one :class:`HeadPlan` per layout,
    built on first use and kept by the instance (layouts recur at every step
    and layer); a method whose plan changes from call to call overrides
    :meth:`plan` instead.
    """

    Params: ClassVar[type] = BlockSparseParams

    def __init__(self, params):
        super().__init__(params)
        self._plans: dict = {}

    def layout_block_mask(self, layout: TokenLayout, block_m: int, block_n: int, device) -> torch.Tensor:
        """Bool ``(1, 1 or H, num_q_blocks, num_kv_blocks)`` for a layout."""
        raise NotImplementedError

    def build_plan(self, layout: TokenLayout, block_m: int, block_n: int, device) -> HeadPlan:
        return HeadPlan.from_block_mask(self.layout_block_mask(layout, block_m, block_n, device), block_m, block_n)

    def layout_plan(self, layout: TokenLayout, block_m: int, block_n: int, device) -> HeadPlan:
        """The plan for a layout, built on first use and kept."""
        key = (layout, block_m, block_n, str(device))
        if key not in self._plans:
            self._plans[key] = self.build_plan(layout, block_m, block_n, device)
        return self._plans[key]

    def plan(self, q, k, v, call):
        return self.layout_plan(call.layout, call.block_m, call.block_n, q.device).for_heads(q.shape[1])


@dataclass
class SlidingFramesParams(BlockSparseParams):
    window_frames: int = 1

    def validate(self) -> str | None:
        if self.window_frames < 0:
            return f"field 'window_frames' must be >= 0, got {self.window_frames}"
        return super().validate()


@register_method
class SlidingFramesMethod(BlockSparseMethod):
    """Each video token attends to latent frames within +-``window_frames`` of its own, plus all text.

    The simplest structured pattern; it exercises the whole block-sparse path
    end to end.
    """

    name = "sliding_frames"
    Params = SlidingFramesParams

    def layout_block_mask(self, layout, block_m, block_n, device):
        return frame_band_block_mask(layout, block_m, block_n, self.params.window_frames, device=device)[None, None]
