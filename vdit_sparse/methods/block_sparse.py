"""Block-sparse attention from per-head block masks, and the ``sliding_frames`` method.

:class:`BlockSparseMethod` is the base of every method that decides, per
head, which (query block, key block) pairs to compute: a subclass returns a
block mask and this module runs it, either on the Triton kernel or on the
plain-PyTorch reference path :func:`masked_block_attention`, which every
kernel and later method is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from ..context import AttentionCall
from ..geometry import TokenLayout
from ..kernels.block_sizes import SUPPORTED_BLOCK_SIZES, default_block_sizes
from ..patterns import frame_band_block_mask
from .base import AttentionMethod, register_method

__all__ = [
    "BACKENDS",
    "BlockSparseMethod",
    "BlockSparseParams",
    "SlidingFramesMethod",
    "block_sizes_for",
    "masked_block_attention",
    "resolve_backend",
    "BlockPlan",
    "run_block_plan",
]

#: ``auto`` takes the Triton kernel on CUDA and the reference path elsewhere.
BACKENDS = ("auto", "reference", "triton")


def masked_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_m: int,
    block_n: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference block-sparse attention in plain PyTorch.

    q, k, v: ``(B, H, S, D)``.  block_mask: bool ``(Bm, Hm, num_q_blocks,
    num_kv_blocks)`` with ``Bm`` in {1, B} and ``Hm`` in {1, H}: query token
    ``i`` sees key token ``j`` when ``block_mask[..., i // block_m, j //
    block_n]`` holds and the key is not padding.  It expands the mask to
    tokens (``S x S`` per head), so it is for checking and for small models,
    not for speed.
    """
    from ..kernels.reference import expand_block_mask

    token_mask = expand_block_mask(block_mask, block_m, block_n, q.shape[-2])
    if key_padding_mask is not None:
        token_mask = token_mask & key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)


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


def block_sizes_for(params: BlockSparseParams, head_dim: int) -> tuple[int, int]:
    """(block_m, block_n) for one call: the profile's choice, else the kernels' default for the head dim."""
    if params.block_size is not None:
        return params.block_size, params.block_size
    return default_block_sizes(head_dim)


@dataclass(eq=False)
class BlockPlan:
    """A block mask with what every call derives from it: its density and the kernel's index lists.

    Methods whose mask depends only on the token layout keep one plan per
    layout (:meth:`BlockSparseMethod.layout_plan`), so the density (a device
    sync) and the index lists (a sort) are computed once per run, not once
    per attention call.
    """

    mask: torch.Tensor  # bool (Bm, Hm, num_q_blocks, num_kv_blocks), Bm in {1, B}, Hm in {1, H}
    density: float
    _indices: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "BlockPlan":
        return cls(mask, mask.float().mean().item())

    def kernel_indices(self, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv_block_indices, kv_block_counts)`` for ``heads`` heads, built on first use."""
        if heads not in self._indices:
            from ..kernels.indices import block_mask_to_indices

            mask = self.mask
            self._indices[heads] = block_mask_to_indices(mask.expand(mask.shape[0], heads, *mask.shape[2:]))
        return self._indices[heads]


def run_block_plan(q, k, v, plan: BlockPlan, block_m, block_n, key_padding_mask, backend, query_rows=None):
    """Attention of q, k, v ``(B, H, S, D)`` under ``plan`` on one backend.

    ``query_rows`` (kernel only) fuses a token permutation of q and of the
    output into the kernel, see :func:`~vdit_sparse.kernels.block_sparse_attention.block_sparse_attention`.
    """
    if backend == "reference":
        if query_rows is not None:
            raise ValueError("query_rows is a kernel feature; the reference path takes explicit token masks")
        return masked_block_attention(q, k, v, plan.mask, block_m, block_n, key_padding_mask)
    from ..kernels.block_sparse_attention import block_sparse_attention

    indices, counts = plan.kernel_indices(q.shape[1])
    return block_sparse_attention(
        q, k, v, indices, counts, block_m=block_m, block_n=block_n,
        key_padding_mask=key_padding_mask, query_rows=query_rows,
    )


class BlockSparseMethod(AttentionMethod):
    """Base for methods that attend under a block mask.

    A method whose mask depends only on the token layout implements
    :meth:`layout_block_mask` and gets one cached :class:`BlockPlan` per
    layout; a method whose mask changes from call to call overrides
    :meth:`block_plan` instead.
    """

    Params: ClassVar[type] = BlockSparseParams

    def __init__(self, params):
        super().__init__(params)
        self._plans: dict = {}

    def layout_block_mask(self, layout: TokenLayout, block_m: int, block_n: int, device) -> torch.Tensor:
        """Bool ``(Bm, Hm, num_q_blocks, num_kv_blocks)`` for a layout."""
        raise NotImplementedError

    def build_plan(self, layout: TokenLayout, block_m: int, block_n: int, device) -> BlockPlan:
        return BlockPlan.from_mask(self.layout_block_mask(layout, block_m, block_n, device))

    def layout_plan(self, layout: TokenLayout, block_m: int, block_n: int, device) -> BlockPlan:
        """The plan for a layout, built on first use and kept (layouts recur at every step and layer)."""
        key = (layout, block_m, block_n, str(device))
        if key not in self._plans:
            self._plans[key] = self.build_plan(layout, block_m, block_n, device)
        return self._plans[key]

    def block_plan(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall, block_m: int, block_n: int) -> BlockPlan:
        return self.layout_plan(call.layout, block_m, block_n, q.device)

    def attend(self, q, k, v, call):
        backend = resolve_backend(self.params.backend, q)
        block_m, block_n = block_sizes_for(self.params, q.shape[-1])
        plan = self.block_plan(q, k, call, block_m, block_n)
        batch, heads, seq_len, _ = q.shape
        call.stats.record(self.name, plan.density, batch * heads, seq_len)
        return run_block_plan(q, k, v, plan, block_m, block_n, call.key_padding_mask, backend)


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
