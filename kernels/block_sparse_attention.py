"""Block-sparse flash-attention forward in Triton.

Dimension letters: ``B`` batch, ``H`` heads, ``S`` sequence, ``D`` head dim.
A query block ``i`` (``block_m`` rows) attends only to the key blocks listed in
``kv_block_indices[b, h, i, :kv_block_counts[b, h, i]]``; key block ``j``
covers keys ``[j * block_n, (j + 1) * block_n)``.

The kernel follows the Triton fused-attention tutorial: one program owns one
query block of one (batch, head), keeps it in SRAM, and streams the selected
key/value blocks through an online softmax in base 2 (``log2(e)`` folded into
the scale so the exponential is one ``exp2``).  The grid is ``(query blocks,
B * H)``: every head of a layer, each with its own plan, runs in one launch.

Zero-row convention: a query row whose count is 0, or whose every selected key
is masked by ``key_padding_mask``, outputs zeros and (with ``return_lse``) a
log-sum-exp of ``-inf``.  Merging such a partial result with others by lse then
gives it weight 0, which is what an empty set of keys means.

CPU tensors run in the Triton interpreter, which needs ``TRITON_INTERPRET=1``
in the environment before triton is first imported (tests only; slow).

Example::

    block_m, block_n = default_block_sizes(q.shape[-1])
    mask = frame_band_block_mask(...)            # (H, nQB, nKB) bool, built for these blocks
    idx, cnt = block_mask_to_indices(mask[None])
    out = block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_runtime import is_hopper, kernel_for
from .block_sizes import SUPPORTED_BLOCK_SIZES, default_block_sizes
from .indices import check_row_table

__all__ = ["block_sparse_attention", "default_block_sizes"]

_LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))

# How the kernel masks keys (a compile-time switch):
_MASK_NONE = 0  # S is a multiple of block_n and no padding mask: no key is ever masked
_MASK_EVERY_BLOCK = 1  # add a 0/-inf bias row to every key block (tail and padding)
_MASK_TAIL_BRANCH = 2  # mask only inside a branch taken for the partial last key block


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, O, LSE, KV_IDX, KV_CNT, KEY_VALID, Q_ROWS,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    stride_pb,
    stride_rb, stride_rh,
    H, S,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,  # K and V are TensorDescriptors over (B, H, S, D)
    MASK_MODE: tl.constexpr,
    HAS_TAIL: tl.constexpr,  # S % BLOCK_N != 0 (read by the autotuner's pruning)
    HAS_KEY_PADDING: tl.constexpr,
    HAS_QUERY_ROWS: tl.constexpr,  # query slot i of the plan is row Q_ROWS[b, h, i] of q and of the output
    RETURN_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # CPU interpreter: its bf16 dot is wrong, so dot upcast operands
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit base offsets: B * H * S * D can pass 2**31 elements.
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    tma_b = pid_bh // H  # TensorDescriptor coordinates are int32
    tma_h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # Rows of q (and of the output) this program serves: its slots, or a gathered set of rows,
    # which fuses a token permutation of q and its inverse on the output into the load and store.
    if HAS_QUERY_ROWS:
        rows = tl.load(Q_ROWS + off_b * stride_rb + off_h * stride_rh + offs_m, mask=offs_m < S, other=0).to(tl.int64)
    else:
        rows = offs_m
    # The query block is loaded once and stays in SRAM for the whole key loop.
    p_q = Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=offs_m[:, None] < S, other=0.0)
    if DOT_IN_FP32:
        b_q = b_q.to(tl.float32)

    # stride_ib / stride_cb are 0 when one plan is shared by the whole batch.
    p_idx = KV_IDX + off_b * stride_ib + off_h * stride_ih + pid_m * stride_iq
    kv_count = tl.load(KV_CNT + off_b * stride_cb + off_h * stride_ch + pid_m * stride_cq)

    if not USE_TMA:
        p_k0 = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
        p_v0 = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for it in range(0, kv_count):
        kv_block = tl.load(p_idx + it * stride_ik)
        start_n = kv_block * BLOCK_N
        if USE_TMA:
            # Rows past S come back as zeros (TMA bounds the 4-D box per head).
            b_k = K.load([tma_b, tma_h, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        else:
            b_k = tl.load(p_k0 + start_n * stride_ks, mask=(start_n + offs_n)[:, None] < S, other=0.0)
        if DOT_IN_FP32:
            b_k = b_k.to(tl.float32)
        qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)

        if MASK_MODE == 1:
            key_ok = (start_n + offs_n) < S
            if HAS_KEY_PADDING:
                valid = tl.load(KEY_VALID + off_b * stride_pb + start_n + offs_n, mask=key_ok, other=0)
                key_ok = key_ok & (valid != 0)
            bias = tl.where(key_ok, 0.0, float("-inf"))
            qk = qk * qk_scale + bias[None, :]
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            # A row with no valid key so far keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
            m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            qk = qk - m_shift[:, None]
            alpha = tl.math.exp2(m_i - m_shift)
        else:
            if MASK_MODE == 2:
                if start_n + BLOCK_N > S:
                    qk = tl.where((start_n + offs_n)[None, :] < S, qk, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
            alpha = tl.math.exp2(m_i - m_ij)
        p = tl.math.exp2(qk)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]

        if USE_TMA:
            b_v = V.load([tma_b, tma_h, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        else:
            b_v = tl.load(p_v0 + start_n * stride_vs, mask=(start_n + offs_n)[:, None] < S, other=0.0)
        # P is rounded to the input dtype before the second product, as on the GPU.
        b_p = p.to(b_v.dtype)
        if DOT_IN_FP32:
            b_p = b_p.to(tl.float32)
            b_v = b_v.to(tl.float32)
        acc = tl.dot(b_p, b_v, acc, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + l_ij
        m_i = m_ij

    # Rows that saw no valid key have l = 0: they output zeros and lse = -inf.
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    p_o = O + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_os + offs_d[None, :]
    tl.store(p_o, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < S)
    if RETURN_LSE:
        # m is in log2 units of the scaled score; ln(sum e^s) = (m + log2(l)) * ln(2).
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(LSE + pid_bh.to(tl.int64) * S + rows, lse, mask=offs_m < S)


def _hopper_configs():
    # Block sizes are fixed by the caller's indices; warps, stages and the way
    # partial key blocks are masked are tuned.
    return [
        triton.Config({"MASK_MODE": mode}, num_warps=w, num_stages=st)
        for mode in (_MASK_NONE, _MASK_EVERY_BLOCK, _MASK_TAIL_BRANCH)
        for w, st in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3))
    ]


def _prune_configs(configs, named_args, **kwargs):
    def arg(name):
        return kwargs[name] if name in kwargs else named_args[name]

    if arg("HAS_KEY_PADDING"):
        modes = (_MASK_EVERY_BLOCK,)
    elif arg("HAS_TAIL"):
        modes = (_MASK_EVERY_BLOCK, _MASK_TAIL_BRANCH)
    else:
        modes = (_MASK_NONE,)
    # Eight warps only pay with 128 query rows (two warpgroups of 64 rows each).
    kept = [c for c in configs if c.kwargs["MASK_MODE"] in modes and (c.num_warps == 4 or arg("BLOCK_M") >= 128)]
    return kept


_block_sparse_attn_fwd_tuned = triton.autotune(
    configs=_hopper_configs(),
    key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "USE_TMA", "HAS_TAIL", "HAS_KEY_PADDING", "RETURN_LSE"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_block_sparse_attn_fwd)

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def _check_inputs(q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, H, S, D), got {shape}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be one of bfloat16, float16, float32, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape (B, H, S, D), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    batch, heads, seq_len, head_dim = q.shape
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim (q.shape[-1]) must be one of {_SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if seq_len < 1:
        raise ValueError(f"sequence length (q.shape[2]) must be >= 1, got {seq_len}")
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{name} must be one of {SUPPORTED_BLOCK_SIZES}, got {value!r}")
    num_q_blocks = -(-seq_len // block_m)
    if not isinstance(kv_block_indices, torch.Tensor) or kv_block_indices.dtype != torch.int32:
        got = kv_block_indices.dtype if isinstance(kv_block_indices, torch.Tensor) else type(kv_block_indices).__name__
        raise ValueError(f"kv_block_indices must be an int32 tensor, got {got}")
    if not isinstance(kv_block_counts, torch.Tensor) or kv_block_counts.dtype != torch.int32:
        got = kv_block_counts.dtype if isinstance(kv_block_counts, torch.Tensor) else type(kv_block_counts).__name__
        raise ValueError(f"kv_block_counts must be an int32 tensor, got {got}")
    if (
        kv_block_indices.dim() != 4
        or kv_block_indices.shape[0] not in (1, batch)
        or tuple(kv_block_indices.shape[1:3]) != (heads, num_q_blocks)
        or kv_block_indices.shape[3] < 1
    ):
        raise ValueError(
            f"kv_block_indices must have shape (1 or B={batch}, H={heads}, num_q_blocks={num_q_blocks}, max_kv_blocks>=1) "
            f"for S={seq_len}, block_m={block_m}; got {tuple(kv_block_indices.shape)}"
        )
    if tuple(kv_block_counts.shape) != tuple(kv_block_indices.shape[:3]):
        raise ValueError(
            f"kv_block_counts must have shape {tuple(kv_block_indices.shape[:3])} (kv_block_indices.shape[:3]), "
            f"got {tuple(kv_block_counts.shape)}"
        )
    for name, t in (("kv_block_indices", kv_block_indices), ("kv_block_counts", kv_block_counts)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            raise ValueError(f"key_padding_mask must be a bool tensor (True = valid key), got {got}")
        if tuple(key_padding_mask.shape) != (batch, seq_len):
            raise ValueError(f"key_padding_mask must have shape (B, S) = {(batch, seq_len)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")


def _tma_ready(t: torch.Tensor) -> bool:
    # TensorDescriptor needs a 16-byte aligned base, 16-byte aligned strides and a contiguous last dim.
    item = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * item) % 16 == 0 for s in t.stride()[:-1])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    query_rows: torch.Tensor | None = None,
):
    """Attention of each query block over its listed key blocks.

    Args:
        q, k, v: ``(B, H, S, D)``, one dtype (bf16/fp16; fp32 for CPU tests),
            ``D`` in {16, 32, 64, 128}, any strides with a contiguous ``D`` (a
            transposed view of a ``(B, S, H, D)`` tensor is fine).
        kv_block_indices: int32 ``(Bi, H, ceil(S / block_m), max_kv_blocks)``,
            ``Bi`` 1 (plan shared by the batch) or ``B``.  Each entry must be a
            key block in ``[0, ceil(S / block_n))``; entries at or past the
            row's count are ignored.  Build it with
            :func:`vdit_sparse.kernels.indices.block_mask_to_indices`.
        kv_block_counts: int32 ``(Bi, H, ceil(S / block_m))``.
        block_m, block_n: query and key block sizes the indices were built
            for (see :func:`default_block_sizes`).
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_padding_mask: optional bool ``(B, S)``, True where the key is valid.
        return_lse: also return the float32 ``(B, H, S)`` natural-log
            log-sum-exp of the scaled scores over the keys attended.
        query_rows: optional int32 ``(Bi, H, S)``, ``Bi`` 1 or ``B``, each
            ``[b, h]`` a permutation of ``range(S)``: query slot ``i`` of the
            plan is row ``query_rows[b, h, i]`` of q, and its output (and lse)
            goes to that same row.  Attending in a permuted token order then
            needs only k and v permuted: the gather of q and the scatter of
            the output happen in the kernel's own load and store.

    Returns:
        ``out`` ``(B, H, S, D)`` contiguous in q's dtype, or ``(out, lse)``.
        Rows with no valid key output zeros and lse ``-inf``.
    """
    _check_inputs(q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, key_padding_mask)
    if query_rows is not None:
        check_row_table("query_rows", query_rows, *q.shape[:3], q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _block_sparse_attention_op(
        q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, scale, key_padding_mask, query_rows, return_lse
    )
    return (out, lse) if return_lse else out


# A PyTorch custom op: torch.compile sees one node with a known output shape (the fake
# implementation) and never traces into Triton's launcher.
@torch.library.custom_op("vdit_sparse::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor],
    query_rows: Optional[torch.Tensor],
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    result = _forward(
        q, k, v, kv_block_indices, kv_block_counts, block_m=block_m, block_n=block_n, scale=scale,
        key_padding_mask=key_padding_mask, return_lse=return_lse, query_rows=query_rows,
    )
    return result if return_lse else (result, q.new_empty((0,), dtype=torch.float32))


@_block_sparse_attention_op.register_fake
def _(q, k, v, kv_block_indices, kv_block_counts, block_m, block_n, scale, key_padding_mask, query_rows, return_lse):
    lse_shape = q.shape[:3] if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _forward(
    q, k, v, kv_block_indices, kv_block_counts, *, block_m, block_n, scale=None, key_padding_mask=None,
    return_lse=False, query_rows=None, use_tma=None, mask_mode=None, num_warps=None, num_stages=None,
):
    """Launcher without argument checks.  ``use_tma``/``mask_mode``/``num_warps``/``num_stages``
    override the automatic choices (benchmarks compare variants through them)."""
    batch, heads, seq_len, head_dim = q.shape
    device = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    num_q_blocks = -(-seq_len // block_m)

    out = torch.empty((batch, heads, seq_len, head_dim), dtype=q.dtype, device=device)
    lse = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=device) if return_lse else out
    shared_plan = kv_block_indices.shape[0] == 1
    key_valid = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else kv_block_counts

    has_tail = seq_len % block_n != 0
    tuned = device.type == "cuda" and mask_mode is None and num_warps is None and num_stages is None
    if mask_mode is None:
        mask_mode = _MASK_EVERY_BLOCK if key_padding_mask is not None or has_tail else _MASK_NONE
    if key_padding_mask is not None and mask_mode != _MASK_EVERY_BLOCK:
        raise ValueError(f"a key_padding_mask needs mask_mode {_MASK_EVERY_BLOCK} (bias on every key block), got {mask_mode}")
    if has_tail and mask_mode == _MASK_NONE:
        raise ValueError(f"S={seq_len} is not a multiple of block_n={block_n}: mask_mode {_MASK_NONE} would read past S")

    if use_tma is None:
        use_tma = is_hopper(device) and _tma_ready(k) and _tma_ready(v)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        box = [1, 1, block_n, head_dim]
        k_arg = TensorDescriptor(k, list(k.shape), list(k.stride()), box)
        v_arg = TensorDescriptor(v, list(v.shape), list(v.stride()), box)
    else:
        k_arg, v_arg = k, v

    grid = (num_q_blocks, batch * heads)
    args = (
        q, k_arg, v_arg, out, lse, kv_block_indices, kv_block_counts, key_valid,
        query_rows if query_rows is not None else kv_block_counts,
        scale * _LOG2_E,
        *q.stride(), *k.stride(), *v.stride(),
        *out.stride()[:3],
        0 if shared_plan else kv_block_indices.stride(0), *kv_block_indices.stride()[1:],
        0 if shared_plan else kv_block_counts.stride(0), *kv_block_counts.stride()[1:],
        key_padding_mask.stride(0) if key_padding_mask is not None else 0,
        query_rows.stride(0) if query_rows is not None and query_rows.shape[0] > 1 else 0,
        query_rows.stride(1) if query_rows is not None else 0,
        heads, seq_len,
    )
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=use_tma, HAS_TAIL=has_tail,
        HAS_KEY_PADDING=key_padding_mask is not None, HAS_QUERY_ROWS=query_rows is not None,
        RETURN_LSE=return_lse,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or device.type == "cpu" else "tf32",
        DOT_IN_FP32=device.type == "cpu",
    )
    if tuned:
        _block_sparse_attn_fwd_tuned[grid](*args, **meta)
    else:
        kernel = kernel_for(_block_sparse_attn_fwd, device)
        kernel[grid](*args, **meta, MASK_MODE=mask_mode, num_warps=num_warps or 4, num_stages=num_stages or 2)
    return (out, lse) if return_lse else out
