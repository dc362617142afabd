"""Column-sparse flash-attention forward in Triton: each query group attends to its own list of key columns.

Dimension letters: ``B`` batch, ``H`` heads, ``R`` query rows, ``S`` keys,
``D`` head dim, ``G`` query groups, ``K`` the longest column list.  Query rows are grouped in
runs of ``group_size`` consecutive rows (Chipmunk's voxels, once the tokens
are in :class:`~vdit_sparse.geometry.Voxels` order); group ``g`` of head
``h`` attends only to the keys ``columns[b, h, g, :counts[b, h, g]]`` (token
indices, any order, no repeats), with the softmax normalised over those keys.

One program owns ``block_m`` query rows of one (batch, head): it loads them
once and streams the group's columns ``block_n`` at a time, gathering the key
and value rows by index, through an online softmax in base 2 (as
:mod:`~vdit_sparse.kernels.block_sparse_attention` does for whole blocks).  A
group spans ``group_size / block_m`` programs, which read the same list.

Zero-row convention: a row whose group lists no column, or whose every listed
key is masked by ``key_padding_mask``, outputs zeros and an lse of ``-inf``.

Example::

    cols, counts = ...  # int32 (1 or B, H, ceil(S / 192), K) and (1 or B, H, ceil(S / 192))
    out, lse = column_sparse_attention(q, k, v, cols, counts, group_size=192, return_lse=True)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_runtime import kernel_for

__all__ = ["column_sparse_attention"]

_LOG2_E = 1.4426950408889634


@triton.jit
def _column_sparse_attn_fwd(
    Q, K, V, O, LSE, COLS, CNT, KEY_VALID,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_cb, stride_ch, stride_cg,
    stride_nb, stride_nh,
    stride_pb,
    H, R,
    GROUP_BLOCKS: tl.constexpr,  # query blocks per group
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # CPU interpreter: its bf16 dot is wrong, so dot upcast operands
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    group = pid_m // GROUP_BLOCKS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b_q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                  mask=offs_m[:, None] < R, other=0.0)
    if DOT_IN_FP32:
        b_q = b_q.to(tl.float32)

    p_cols = COLS + off_b * stride_cb + off_h * stride_ch + group * stride_cg
    count = tl.load(CNT + off_b * stride_nb + off_h * stride_nh + group)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, count, BLOCK_N):
        listed = start + offs_n < count
        cols = tl.load(p_cols + start + offs_n, mask=listed, other=0).to(tl.int64)
        b_k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=listed[:, None], other=0.0)
        if DOT_IN_FP32:
            b_k = b_k.to(tl.float32)
        qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        key_ok = listed
        if HAS_KEY_PADDING:
            valid = tl.load(KEY_VALID + off_b * stride_pb + cols, mask=listed, other=0)
            key_ok = key_ok & (valid != 0)
        qk = qk * qk_scale + tl.where(key_ok, 0.0, float("-inf"))[None, :]
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no valid key so far keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
        m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        b_v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=listed[:, None], other=0.0)
        # P is rounded to the input dtype before the second product on the GPU.  The interpreter's
        # float32 -> bf16 conversion truncates (a biased rounding): there P stays float32.
        if DOT_IN_FP32:
            b_p, b_v = p, b_v.to(tl.float32)
        else:
            b_p = p.to(b_v.dtype)
        acc = tl.dot(b_p, b_v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    p_o = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(p_o, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < R)
    if RETURN_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(LSE + pid_bh.to(tl.int64) * R + offs_m, lse, mask=offs_m < R)


def _check_inputs(q, k, v, columns, counts, group_size, block_m, key_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] + q.shape[3:] != k.shape[:2] + k.shape[3:]:
        raise ValueError(f"q must be (B, H, R, D) and k, v (B, H, S, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, rows, head_dim = q.shape
    seq_len = k.shape[2]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v must be contiguous in their last dim")
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(f"head dim {head_dim} is not supported (16, 32, 64 or 128)")
    if group_size < block_m or group_size % block_m:
        raise ValueError(f"group_size {group_size} must be a multiple of block_m {block_m}")
    groups = -(-rows // group_size)
    if columns.dtype != torch.int32 or counts.dtype != torch.int32:
        raise ValueError(f"columns and counts must be int32, got {columns.dtype} and {counts.dtype}")
    if columns.dim() != 4 or columns.shape[1:3] != (heads, groups) or columns.shape[0] not in (1, batch):
        raise ValueError(f"columns must be (1 or {batch}, {heads}, {groups}, K), got {tuple(columns.shape)}")
    if counts.shape != columns.shape[:3]:
        raise ValueError(f"counts must be {tuple(columns.shape[:3])}, got {tuple(counts.shape)}")
    if columns.stride(-1) != 1 or counts.stride(-1) != 1:
        raise ValueError("columns and counts must be contiguous in their last dim")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (batch, seq_len)):
        raise ValueError(f"key_padding_mask must be bool ({batch}, {seq_len}), got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def column_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    columns: torch.Tensor,
    counts: torch.Tensor,
    *,
    group_size: int,
    block_m: int = 64,
    block_n: int = 32,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Attention of q ``(B, H, R, D)`` over k, v ``(B, H, S, D)``, each group of ``group_size`` query rows over
    its listed columns.

    ``columns`` int32 ``(1 or B, H, G, K)``, ``G = ceil(R / group_size)``:
    group ``g`` attends to keys ``columns[b, h, g, :counts[b, h, g]]``.
    ``group_size`` is a multiple of ``block_m``.  The default blocks (64 query
    rows, 32 columns at a time, 4 warps) were the fastest of those timed by
    ``scripts/bench_column_sparse.py`` on an H200 at both real shapes
    (``benchmarks/results/column-sparse-h200.json``).  Returns the output, and with
    ``return_lse`` also the float32 log-sum-exp ``(B, H, R)`` of each row's
    scaled scores over its keys; ``key_padding_mask`` is bool ``(B, S)``.
    """
    _check_inputs(q, k, v, columns, counts, group_size, block_m, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _column_sparse_attention_op(
        q, k, v, columns, counts, group_size, block_m, block_n, scale, key_padding_mask, return_lse
    )
    return (out, lse) if return_lse else out


# A PyTorch custom op: torch.compile sees one node and never traces into Triton's launcher.
@torch.library.custom_op("vdit_sparse::column_sparse_attention", mutates_args=())
def _column_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    columns: torch.Tensor,
    counts: torch.Tensor,
    group_size: int,
    block_m: int,
    block_n: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor],
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, rows, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, rows) if return_lse else (0,), dtype=torch.float32, device=q.device)
    shared = columns.shape[0] == 1
    grid = (-(-rows // block_m), batch * heads)
    kernel = kernel_for(_column_sparse_attn_fwd, q.device)
    kernel[grid](
        q, k, v, out, lse if return_lse else out, columns, counts,
        key_padding_mask.view(torch.uint8) if key_padding_mask is not None else counts,
        scale * _LOG2_E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        0 if shared else columns.stride(0), *columns.stride()[1:3],
        0 if shared else counts.stride(0), counts.stride(1),
        key_padding_mask.stride(0) if key_padding_mask is not None else 0,
        heads, rows,
        GROUP_BLOCKS=group_size // block_m, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_KEY_PADDING=key_padding_mask is not None, RETURN_LSE=return_lse,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or q.device.type == "cpu" else "tf32",
        DOT_IN_FP32=q.device.type == "cpu",
        num_warps=4, num_stages=2,
    )
    return out, lse


@_column_sparse_attention_op.register_fake
def _(q, k, v, columns, counts, group_size, block_m, block_n, scale, key_padding_mask, return_lse):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3] if return_lse else (0,), dtype=torch.float32)
