"""Block-sparse attention from per-head block masks, and the ``sliding_frames`` method.

:class:`BlockSparseMethod` is the base of every method that decides, per
head, which (query block, key block) pairs to compute: a subclass returns a
block mask and this module runs it, either on the Triton kernel or on the
plain-PyTorch reference path :func:`masked_block_attention`, which every
kernel and later method is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from ..context import AttentionCall
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
    "run_block_mask",
]

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
    #: Tokens per query and key block; None picks the kernel's preferred sizes
    #: for the head dim on the Triton backend and 64 on the reference path.
    block_size: Optional[int] = None
    backend: str = "auto"

    def validate(self) -> str | None:
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            return f"field 'block_size' must be one of {BLOCK_SIZES} or null, got {self.block_size}"
        if self.backend not in BACKENDS:
            return f"field 'backend' must be one of {BACKENDS}, got {self.backend!r}"
        return None


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``auto`` -> ``triton`` for CUDA tensors, ``reference`` otherwise."""
    if backend == "auto":
        return "triton" if q.is_cuda else "reference"
    return backend


def block_sizes_for(params: BlockSparseParams, backend: str, head_dim: int) -> tuple[int, int]:
    """(block_m, block_n) for one call: the profile's choice, else the backend's default."""
    if params.block_size is not None:
        return params.block_size, params.block_size
    if backend == "triton":
        from ..kernels.block_sparse_attention import default_block_sizes

        return default_block_sizes(head_dim)
    return 64, 64


def run_block_mask(q, k, v, mask, block_m, block_n, key_padding_mask, backend) -> torch.Tensor:
    """Attention of q, k, v ``(B, H, S, D)`` under a block mask ``(Bm, Hm, nQB, nKB)`` on one backend."""
    if backend == "reference":
        return masked_block_attention(q, k, v, mask, block_m, block_n, key_padding_mask)
    from ..kernels.block_sparse_attention import block_sparse_attention
    from ..kernels.indices import block_mask_to_indices

    heads = q.shape[1]
    indices, counts = block_mask_to_indices(mask.expand(mask.shape[0], heads, *mask.shape[2:]))
    return block_sparse_attention(
        q, k, v, indices, counts, block_m=block_m, block_n=block_n, key_padding_mask=key_padding_mask
    )


class BlockSparseMethod(AttentionMethod):
    """Base for methods that compute a block mask per call and attend with it."""

    Params: ClassVar[type] = BlockSparseParams

    def block_mask(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall, block_m: int, block_n: int) -> torch.Tensor:
        """Bool ``(Bm, Hm, num_q_blocks, num_kv_blocks)`` with ``Bm`` in {1, B}, ``Hm`` in {1, H}."""
        raise NotImplementedError

    def attend(self, q, k, v, call):
        backend = resolve_backend(self.params.backend, q)
        block_m, block_n = block_sizes_for(self.params, backend, q.shape[-1])
        mask = self.block_mask(q, k, call, block_m, block_n)
        batch, heads, seq_len, _ = q.shape
        call.stats.record(self.name, mask.float().mean().item(), batch * heads, seq_len)
        return run_block_mask(q, k, v, mask, block_m, block_n, call.key_padding_mask, backend)


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

    def block_mask(self, q, k, call, block_m, block_n):
        key = (call.layout, block_m, block_n, q.device)
        if key not in self._masks:
            mask = frame_band_block_mask(call.layout, block_m, block_n, self.params.window_frames, device=q.device)
            self._masks[key] = mask[None, None]
        return self._masks[key]
