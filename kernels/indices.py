"""Block masks to the kernels' index lists, and back to a density figure.

A block mask is bool ``(Bi, H, num_q_blocks, num_kv_blocks)``.  The kernels
take, per query block, the list of key blocks to visit
(``kv_block_indices``, int32, ascending) and its length (``kv_block_counts``,
int32).  Everything runs on the mask's device with no loop over blocks.
"""

from __future__ import annotations

import torch

__all__ = ["block_mask_to_indices", "block_density", "check_row_table", "permutation_table"]


def block_mask_to_indices(block_mask: torch.Tensor, max_kv_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_block_indices, kv_block_counts)`` listing each row's True columns in ascending order.

    ``kv_block_indices`` is int32 ``(Bi, H, nQB, max_kv_blocks)``; entries past
    a row's count are 0 (the kernels ignore them).  ``max_kv_blocks`` defaults
    to the largest row count, which costs one device-to-host sync; pass it
    (e.g. ``nKB``) to avoid the sync.
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
        got = (block_mask.dtype, tuple(block_mask.shape)) if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
        raise ValueError(f"block_mask must be a bool tensor (Bi, H, num_q_blocks, num_kv_blocks), got {got}")
    num_kv_blocks = block_mask.shape[-1]
    counts = block_mask.sum(dim=-1, dtype=torch.int32)
    if max_kv_blocks is None:
        max_kv_blocks = max(int(counts.max().item()) if counts.numel() else 0, 1)
    if not 1 <= max_kv_blocks <= max(num_kv_blocks, 1):
        raise ValueError(f"max_kv_blocks must be in [1, {num_kv_blocks}] (num_kv_blocks), got {max_kv_blocks}")
    # A stable sort of "not kept" puts the kept columns first, in ascending column order.
    order = torch.sort((~block_mask).to(torch.uint8), dim=-1, stable=True).indices[..., :max_kv_blocks]
    slot = torch.arange(max_kv_blocks, device=block_mask.device)
    indices = torch.where(slot < counts[..., None], order, 0).to(torch.int32)
    return indices.contiguous(), counts.contiguous()


def block_density(block_mask_or_counts: torch.Tensor, num_kv_blocks: int | None = None) -> float:
    """Fraction of (query block, key block) pairs computed.

    Takes a bool block mask (``num_kv_blocks`` read from its last dim) or int
    ``kv_block_counts`` (then ``num_kv_blocks`` is required).
    """
    t = block_mask_or_counts
    if t.dtype == torch.bool:
        return float(t.float().mean().item()) if t.numel() else 0.0
    if num_kv_blocks is None or num_kv_blocks < 1:
        raise ValueError(f"num_kv_blocks (>= 1) is required with kv_block_counts, got {num_kv_blocks!r}")
    return float(t.double().sum().item()) / (t.numel() * num_kv_blocks) if t.numel() else 0.0


def permutation_table(perm: torch.Tensor, heads: torch.Tensor | None, num_heads: int, seq_len: int) -> torch.Tensor:
    """int32 ``(1 or B, H, S)``: the order each (batch, head) applies (identity where ``heads`` is False).

    ``perm`` is ``(S,)`` or ``(H, S)``; ``heads`` an optional bool ``(H,)`` or
    ``(B, H)``.  The table is what :func:`~vdit_sparse.kernels.permute.gather_rows`
    gathers by, and the ``query_rows`` argument of
    :func:`~vdit_sparse.kernels.block_sparse_attention.block_sparse_attention`,
    which fuses the permutation of q and the inverse permutation of the output
    into the attention kernel.
    """
    perm = perm.expand(num_heads, seq_len)
    if heads is not None:
        selected = heads if heads.dim() == 2 else heads[None]
        identity = torch.arange(seq_len, device=perm.device, dtype=perm.dtype)
        perm = torch.where(selected[..., None], perm, identity)
    return perm.reshape(-1, num_heads, seq_len).to(torch.int32).contiguous()


def check_row_table(name: str, rows, batch: int, heads: int, seq_len: int, device: torch.device) -> None:
    """Refuse a per-(batch, head) token table that is not int32 ``(1 or B, H, S)`` on ``device``."""
    if (
        not isinstance(rows, torch.Tensor)
        or rows.dtype != torch.int32
        or rows.dim() != 3
        or rows.shape[0] not in (1, batch)
        or tuple(rows.shape[1:]) != (heads, seq_len)
        or rows.device != device
    ):
        got = (rows.dtype, tuple(rows.shape), str(rows.device)) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"{name} must be an int32 tensor (1 or B, H, S) = (1 or {batch}, {heads}, {seq_len}) on {device}, got {got}")
