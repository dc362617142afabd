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
softmax and keeps nothing of size ``S``.  The keys are split into ranges
that separate programs take in parallel (:func:`key_splits`), and the ranges'
softmax states are merged afterwards.  Both round the probabilities to the
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

__all__ = ["key_splits", "masked_row_errors"]

_LOG2_E = 1.4426950408889634


@triton.jit
def _masked_row_errors(
    Q, K, V, ROWS, MASKS, KEY_VALID,
    M_OUT, L_OUT, ACC_OUT,  # per (program, row): running max, the two sums, the two accumulators
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mm, stride_mr,
    stride_pb,
    H, S, R, NUM_MASKS, KEYS_PER_SPLIT,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # CPU interpreter: its bf16 dot is wrong, so dot upcast operands
):
    # Programs that read the same keys (the row blocks and masks of one split) are launched together,
    # so the later ones find those keys in L2.
    pid_rm = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_bh = tl.program_id(2)
    pid_r = pid_rm // NUM_MASKS
    pid_m = pid_rm % NUM_MASKS
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
    split_start = pid_split * KEYS_PER_SPLIT
    split_end = tl.minimum(split_start + KEYS_PER_SPLIT, S)
    for start_n in range(split_start, split_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < split_end
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
    # This split's partial softmax state, to be merged over splits: sums and accumulators are scaled
    # by exp2(-m_i) (-inf where the split held no valid key: then they are 0).
    program = (pid_bh * tl.num_programs(1) + pid_split) * tl.num_programs(0) + pid_rm
    out_rows = program * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(M_OUT + out_rows, m_i)
    tl.store(L_OUT + out_rows * 2, l_all)
    tl.store(L_OUT + out_rows * 2 + 1, l_mask)
    p_acc = ACC_OUT + out_rows[:, None] * (2 * HEAD_DIM) + offs_d[None, :]
    tl.store(p_acc, acc_all)
    tl.store(p_acc + HEAD_DIM, acc_mask)


def key_splits(programs: int, seq_len: int, block_n: int, device: torch.device) -> int:
    """How many key ranges each (row block, batch, head, mask) is split into.

    Without a split, the few programs a layer has (B x H x 2 masks) each
    stream all ``S`` keys one block at a time: latency-bound, a few
    milliseconds per layer at 75k tokens.  Enough splits for about 16
    programs per SM, each range at least 2,048 keys, keep every SM busy.
    """
    if device.type != "cuda":
        return min(4, triton.cdiv(seq_len, block_n))  # the interpreter: a few, so the tests cover merging
    target = 16 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(seq_len, 2048)))


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
    # All sampled rows (64 by default) in one row block where they fit: each further row block would read
    # every key and value again.
    block_r = min(64, max(16, triton.next_power_of_2(num_rows)))
    block_n = 128 if head_dim <= 64 else 64
    row_blocks = triton.cdiv(num_rows, block_r)
    splits = key_splits(row_blocks * num_masks * batch * heads, seq_len, block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(seq_len, splits), block_n) * block_n
    splits = triton.cdiv(seq_len, keys_per_split)
    grid = (row_blocks * num_masks, splits, batch * heads)
    shape = (batch, heads, splits, row_blocks, num_masks, block_r)  # the kernel's program order, then rows
    running_max = torch.empty(shape, dtype=torch.float32, device=q.device)
    sums = torch.empty((*shape, 2), dtype=torch.float32, device=q.device)  # all keys, the mask's keys
    accumulators = torch.empty((*shape, 2, head_dim), dtype=torch.float32, device=q.device)
    key_valid = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else masks
    kernel = kernel_for(_masked_row_errors, q.device)
    kernel[grid](
        q, k, v, rows, masks, key_valid, running_max, sums, accumulators,
        _LOG2_E / math.sqrt(head_dim),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        masks.stride(0), masks.stride(1),
        key_padding_mask.stride(0) if key_padding_mask is not None else 0,
        heads, seq_len, num_rows, num_masks, keys_per_split,
        HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_N=block_n, HAS_KEY_PADDING=key_padding_mask is not None,
        DOT_IN_FP32=q.device.type == "cpu",
        num_warps=8 if block_r == 64 else 4, num_stages=2,
    )
    # Merge the splits: rescale each to the largest running max (a split without a valid key weighs 0).
    top = running_max.amax(dim=2, keepdim=True)
    weight = torch.where(running_max == float("-inf"), 0.0, torch.exp2(running_max - top))
    sums = (sums * weight[..., None]).sum(dim=2)  # (B, H, row blocks, M, block_r, 2)
    accumulators = (accumulators * weight[..., None, None]).sum(dim=2)
    outputs = accumulators / sums[..., None]  # attention over all keys, and over the mask's
    difference = (outputs[..., 1, :] - outputs[..., 0, :]).transpose(-2, -3)  # (B, H, row blocks, block_r, M, D)
    difference = difference.reshape(batch, heads, row_blocks * block_r, num_masks, head_dim)[:, :, :num_rows]
    return difference.square().sum(dim=(2, 4)) / (num_rows * head_dim)


@_masked_row_errors_op.register_fake
def _(q, k, v, rows, masks, key_padding_mask):
    return q.new_empty((q.shape[0], q.shape[1], masks.shape[0]), dtype=torch.float32)
