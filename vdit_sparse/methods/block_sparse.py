"""Block-sparse attention from per-head block masks, and the ``sliding_frames`` method.

:class:`BlockSparseMethod` is the base of every method that decides, per
head, which (query block, key block) pairs to compute: a subclass returns a
block mask and this module runs it, either on the Triton kernel or on the
plain-PyTorch reference path :func:`masked_block_attention`, which every
kernel and later method is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..context import AttentionCall
from ..patterns import frame_band_block_mask
from .base import AttentionMethod, register_method

__all__ = ["BlockSparseMethod", "SlidingFramesMethod", "masked_block_attention", "BACKENDS"]

#: ``auto`` takes the Triton kernel on CUDA and the reference path elsewhere.
BACKENDS = ("auto", "reference", "triton")
BLOCK_SIZES = (16, 32, 64, 128)


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
    seq_len = q.shape[-2]
    token_mask = block_mask.repeat_interleave(block_m, dim=-2)[..., :seq_len, :]
    token_mask = token_mask.repeat_interleave(block_n, dim=-1)[..., :seq_len]
    if key_padding_mask is not None:
        token_mask = token_mask & key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)


@dataclass
class BlockSparseParams:
    block_size: int = 64
    backend: str = "auto"

    def validate(self) -> str | None:
        if self.block_size not in BLOCK_SIZES:
            return f"field 'block_size' must be one of {BLOCK_SIZES}, got {self.block_size}"
        if self.backend not in BACKENDS:
            return f"field 'backend' must be one of {BACKENDS}, got {self.backend!r}"
        return None


class BlockSparseMethod(AttentionMethod):
    """Base for methods that compute a block mask per call and attend with it."""

    Params: ClassVar[type] = BlockSparseParams

    def block_mask(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """Bool ``(Bm, Hm, num_q_blocks, num_kv_blocks)`` with ``Bm`` in {1, B}, ``Hm`` in {1, H}."""
        raise NotImplementedError

    def attend(self, q, k, v, call):
        mask = self.block_mask(q, k, call)
        size = self.params.block_size
        batch, heads, seq_len, _ = q.shape
        call.stats.record(self.name, mask.float().mean().item(), batch * heads, seq_len)
        backend = self.params.backend
        if backend == "auto":
            backend = "triton" if q.is_cuda else "reference"
        if backend == "reference":
            return masked_block_attention(q, k, v, mask, size, size, call.key_padding_mask)
        from ..kernels import block_sparse_attention, block_mask_to_indices

        full = mask.expand(mask.shape[0], heads, *mask.shape[2:])
        indices, counts = block_mask_to_indices(full)
        return block_sparse_attention(
            q, k, v, indices, counts, block_m=size, block_n=size, key_padding_mask=call.key_padding_mask
        )


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
    end to end.  The mask depends only on the layout, so it is built once per
    layout and reused.
    """

    name = "sliding_frames"
    Params = SlidingFramesParams

    def __init__(self, params):
        super().__init__(params)
        self._masks: dict = {}

    def block_mask(self, q, k, call):
        key = (call.layout, q.device)
        if key not in self._masks:
            size = self.params.block_size
            mask = frame_band_block_mask(call.layout, size, size, self.params.window_frames, device=q.device)
            self._masks[key] = mask[None, None]
        return self._masks[key]
