"""Attention mass per key column, summed over groups of query rows, from a dense pass's log-sum-exp.

For q ``(B, H, R, D)``, k ``(B, H, S, D)`` and the row log-sum-exp ``lse``
``(B, H, R)`` of the scaled scores (what a flash-attention forward returns):

    mass[b, h, g, j] = sum over rows i of group g of exp(q_i . k_j * scale - lse[b, h, i])

i.e. the attention probabilities, summed over each group of ``group_size``
consecutive rows (Chipmunk's voxels).  One program owns ``block_n`` key
columns of one group of one (batch, head): it loads its keys once and streams
the group's rows ``block_m`` at a time (then the next group's, for
``groups_per_program`` groups), so the pass costs the ``q k^T`` products of
the rows and nothing of size ``R x S`` is stored.  Masked keys
(``key_padding_mask``) get no mass.  The plain-PyTorch version is
:func:`~vdit_sparse.kernels.reference.column_mass_reference`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_runtime import kernel_for

__all__ = ["column_mass"]

_LOG2_E = 1.4426950408889634


@triton.jit
def _column_mass(
    Q, K, LSE, KEY_VALID, MASS,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_mb, stride_mh, stride_mg,
    stride_pb,
    H, R, S, GROUP, G,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # CPU interpreter: its bf16 dot is wrong, so dot upcast operands
):
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < S
    if HAS_KEY_PADDING:
        valid = tl.load(KEY_VALID + off_b * stride_pb + offs_n, mask=key_ok, other=0)
        key_ok = key_ok & (valid != 0)
    b_k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                  mask=(offs_n < S)[:, None], other=0.0)
    if DOT_IN_FP32:
        b_k = b_k.to(tl.float32)
    for group in range(pid_g * GROUPS_PER_PROGRAM, tl.minimum(pid_g * GROUPS_PER_PROGRAM + GROUPS_PER_PROGRAM, G)):
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        first_row = group * GROUP
        for start in range(0, GROUP, BLOCK_M):
            in_group = start + tl.arange(0, BLOCK_M)
            rows = first_row + in_group
            row_ok = (in_group < GROUP) & (rows < R)
            b_q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                          mask=row_ok[:, None], other=0.0)
            if DOT_IN_FP32:
                b_q = b_q.to(tl.float32)
            lse = tl.load(LSE + pid_bh.to(tl.int64) * R + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            scores = tl.dot(b_q, tl.trans(b_k)) * qk_scale - lse[:, None]
            probs = tl.where(row_ok[:, None] & key_ok[None, :], tl.math.exp2(scores), 0.0)
            acc += tl.sum(probs, 0)
        tl.store(MASS + off_b * stride_mb + off_h * stride_mh + group * stride_mg + offs_n, acc, mask=offs_n < S)


def _prune(configs, named_args, **kwargs):
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(named_args["GROUP"]))]


# On a GPU the launch is tuned once per shape key (the fixed-argument launch is for the interpreter and tests).
_column_mass_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "GROUPS_PER_PROGRAM": g}, num_warps=w, num_stages=2)
             for m in (64, 128) for n in (64, 128) for g in (1, 4) for w in (4, 8)],
    key=["HEAD_DIM", "GROUP", "HAS_KEY_PADDING"],
    prune_configs_by={"early_config_prune": _prune},
)(_column_mass)


def column_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    group_size: int,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    block_m: int = 64,
    block_n: int = 64,
    groups_per_program: int = 1,
    num_warps: int = 4,
) -> torch.Tensor:
    """float32 ``(B, H, ceil(R / group_size), S)``: each group's summed attention probability per key.

    On a GPU the launch settings are tuned (once per head dim, group size and
    masking); ``block_m``, ``block_n``, ``groups_per_program`` and
    ``num_warps`` set them on the CPU interpreter."""
    batch, heads, rows, head_dim = q.shape
    if k.shape[:2] != (batch, heads) or k.shape[3] != head_dim or lse.shape != (batch, heads, rows):
        raise ValueError(f"expected q (B, H, R, D), k (B, H, S, D), lse (B, H, R); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(lse.shape)}")
    if lse.dtype != torch.float32 or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("lse must be float32 and q, k contiguous in their last dim")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    return _column_mass_op(q, k, lse.contiguous(), group_size, scale, key_padding_mask, block_m, block_n,
                           groups_per_program, num_warps)


@torch.library.custom_op("vdit_sparse::column_mass", mutates_args=())
def _column_mass_op(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    group_size: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor],
    block_m: int,
    block_n: int,
    groups_per_program: int,
    num_warps: int,
) -> torch.Tensor:
    batch, heads, rows, head_dim = q.shape
    seq_len = k.shape[2]
    groups = -(-rows // group_size)
    mass = torch.empty(batch, heads, groups, seq_len, dtype=torch.float32, device=q.device)
    args = (
        q, k, lse, key_padding_mask.view(torch.uint8) if key_padding_mask is not None else lse, mass,
        scale * _LOG2_E,
        *q.stride()[:3], *k.stride()[:3], *mass.stride()[:3],
        key_padding_mask.stride(0) if key_padding_mask is not None else 0,
        heads, rows, seq_len, group_size, groups,
    )
    flags = dict(HEAD_DIM=head_dim, HAS_KEY_PADDING=key_padding_mask is not None, DOT_IN_FP32=q.device.type == "cpu")
    if q.device.type == "cuda":
        grid = lambda meta: (-(-seq_len // meta["BLOCK_N"]), -(-groups // meta["GROUPS_PER_PROGRAM"]), batch * heads)  # noqa: E731
        _column_mass_tuned[grid](*args, **flags)
    else:
        grid = (-(-seq_len // block_n), -(-groups // groups_per_program), batch * heads)
        kernel_for(_column_mass, q.device)[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n,
                                                  GROUPS_PER_PROGRAM=groups_per_program, **flags,
                                                  num_warps=num_warps, num_stages=2)
    return mass


@_column_mass_op.register_fake
def _(q, k, lse, group_size, scale, key_padding_mask, block_m, block_n, groups_per_program, num_warps):
    groups = -(-q.shape[2] // group_size)
    return q.new_empty((q.shape[0], q.shape[1], groups, k.shape[2]), dtype=torch.float32)
