"""How far masked attention lands from full attention on sampled query rows: one fused Triton pass.

For each (batch, head) and each candidate token mask ``m``, the mean squared
difference, over the sampled query rows and the head dim, between attention
restricted to the mask and full attention:

    err[b, h, m] = mean_{r, d} (softmax_mask_m(q_r K^T) V - softmax(q_r K^T) V)^2

This is how Sparse VideoGen decides whether a head is spatial or temporal
(two masks), and how a search scores candidate patterns.  The plain-PyTorch
version (:func:`~vdit_sparse.kernels.reference.masked_row_errors_reference`)
materialises ``(B, H, R, S)`` scores and three products; this kernel streams
keys and values once per (batch, head, row block, mask) with an online
softmax and keeps nothing of size ``S``.  Both round the probabilities to the
value dtype before the product with ``v`` and normalise by the sum of the
rounded probabilities.

Dimension letters: ``B`` batch, ``H`` heads, ``S`` tokens, ``D`` head dim,
``R`` sampled rows, ``M`` masks.

Example::

    errors = masked_row_errors(q, k, v, rows, torch.stack([spatial_rows, temporal_rows]))
    temporal = errors[..., 1] < errors[..., 0]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_runtime import kernel_for

__all__ = ["masked_row_errors"]

_LOG2_E = 1.4426950408889634


@triton.jit
def _masked_row_errors(
    Q, K, V, ROWS, MASKS, KEY_VALID, ERR,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mm, stride_mr,
    stride_pb,
    H, S, R,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # CPU interpreter: its bf16 dot is wrong, so dot upcast operands
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_r < R
    rows = tl.load(ROWS + offs_r, mask=row_ok, other=0).to(tl.int64)
    b_q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                  mask=row_ok[:, None], other=0.0)
    if DOT_IN_FP32:
        b_q = b_q.to(tl.float32)
    p_k0 = K + off_b * stride_kb + off_h * stride_kh + offs_d[None, :]
    p_v0 = V + off_b * stride_vb + off_h * stride_vh + offs_d[None, :]
    p_mask0 = MASKS + pid_m * stride_mm + offs_r[:, None] * stride_mr

    # One running max serves both sums: the masked set is a subset of all keys.
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_all = tl.zeros([BLOCK_R], dtype=tl.float32)
    l_mask = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_all = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    acc_mask = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < S
        b_k = tl.load(p_k0 + offs_n[:, None] * stride_ks, mask=key_ok[:, None], other=0.0)
        b_v = tl.load(p_v0 + offs_n[:, None] * stride_vs, mask=key_ok[:, None], other=0.0)
        if DOT_IN_FP32:
            b_k = b_k.to(tl.float32)
        if HAS_KEY_PADDING:
            key_ok = key_ok & (tl.load(KEY_VALID + off_b * stride_pb + offs_n, mask=key_ok, other=0) != 0)
        qk = tl.dot(b_q, tl.trans(b_k)) * qk_scale
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: exp2 gives 0, not NaN
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(qk - m_shift[:, None])
        kept = tl.load(p_mask0 + offs_n[None, :], mask=row_ok[:, None] & key_ok[None, :], other=0) != 0
        # Probabilities rounded to the value dtype before the product, as in the attention kernel;
        # the sums add the rounded values too, so each output is a weighted mean of v.  The
        # interpreter's float32 -> bf16 conversion truncates (a biased rounding): there they stay float32.
        if DOT_IN_FP32:
            b_p, b_v = p, b_v.to(tl.float32)
        else:
            b_p = p.to(b_v.dtype)
        b_p_mask = tl.where(kept, b_p, 0.0).to(b_p.dtype)
        l_all = l_all * alpha + tl.sum(b_p.to(tl.float32), 1)
        l_mask = l_mask * alpha + tl.sum(b_p_mask.to(tl.float32), 1)
        acc_all = tl.dot(b_p, b_v, acc_all * alpha[:, None])
        acc_mask = tl.dot(b_p_mask, b_v, acc_mask * alpha[:, None])
        m_i = m_new
    # Rows past R have nothing summed: divide by 1 there, and count them as no error.
    l_all = tl.where(row_ok, l_all, 1.0)
    l_mask = tl.where(row_ok, l_mask, 1.0)
    difference = acc_mask / l_mask[:, None] - acc_all / l_all[:, None]
    difference = tl.where(row_ok[:, None], difference, 0.0)
    partial = tl.sum(tl.sum(difference * difference, 1), 0)
    num_row_blocks = tl.num_programs(0)
    tl.store(ERR + (pid_bh * tl.num_programs(2) + pid_m) * num_row_blocks + pid_r, partial)


def masked_row_errors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    masks: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``(B, H, M)``: mean squared error of mask ``m``'s attention output against full attention.

    Args:
        q, k, v: ``(B, H, S, D)``, one dtype, ``D`` a power of two in [16, 256],
            contiguous ``D`` (transposed views are fine).
        rows: int ``(R,)``, the sampled query positions (the same for every head).
        masks: bool ``(M, R, S)``: key ``j`` is kept for sampled row ``r`` under
            mask ``m``.  Every row must keep at least one valid key.
        key_padding_mask: optional bool ``(B, S)``, True where the key is valid
            (applies to full attention and to every mask).
    """
    batch, heads, seq_len, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share shape and dtype, got {q.shape}/{q.dtype}, {k.shape}/{k.dtype}, {v.shape}/{v.dtype}")
    if head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256:
        raise ValueError(f"head dim must be a power of two in [16, 256], got {head_dim}")
    if rows.dim() != 1 or masks.dim() != 3 or masks.dtype != torch.bool or tuple(masks.shape[1:]) != (rows.numel(), seq_len):
        raise ValueError(
            f"rows must be (R,) and masks bool (M, R, S) = (M, {rows.numel()}, {seq_len}); "
            f"got rows {tuple(rows.shape)}, masks {masks.dtype} {tuple(masks.shape)}"
        )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seq_len):
        raise ValueError(f"key_padding_mask must be (B, S) = {(batch, seq_len)}, got {tuple(key_padding_mask.shape)}")
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("q, k, v need a contiguous last dim")
    return _masked_row_errors_op(q, k, v, rows, masks.contiguous(), key_padding_mask)


# A PyTorch custom op: torch.compile sees one node and never traces into Triton's launcher.
@torch.library.custom_op("vdit_sparse::masked_row_errors", mutates_args=())
def _masked_row_errors_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    batch, heads, seq_len, head_dim = q.shape
    num_masks, num_rows = masks.shape[0], rows.numel()
    masks = masks.view(torch.uint8)
    block_r = 16
    block_n = 128 if head_dim <= 64 else 64
    grid = (triton.cdiv(num_rows, block_r), batch * heads, num_masks)
    partial = torch.empty((batch, heads, num_masks, grid[0]), dtype=torch.float32, device=q.device)
    key_valid = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else masks
    kernel = kernel_for(_masked_row_errors, q.device)
    kernel[grid](
        q, k, v, rows, masks, key_valid, partial,
        _LOG2_E / math.sqrt(head_dim),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        masks.stride(0), masks.stride(1),
        key_padding_mask.stride(0) if key_padding_mask is not None else 0,
        heads, seq_len, num_rows,
        HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_N=block_n, HAS_KEY_PADDING=key_padding_mask is not None,
        DOT_IN_FP32=q.device.type == "cpu",
        num_warps=4, num_stages=2,
    )
    return partial.sum(-1) / (num_rows * head_dim)


@_masked_row_errors_op.register_fake
def _(q, k, v, rows, masks, key_padding_mask):
    return q.new_empty((q.shape[0], q.shape[1], masks.shape[0]), dtype=torch.float32)
