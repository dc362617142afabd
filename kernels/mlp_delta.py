"""Sparse updates of a cached GELU feed-forward ``down(gelu(up(x)))`` in Triton: Chipmunk's MLP deltas.

Dimension letters: ``B`` batch, ``T`` tokens, ``C`` input features, ``N``
hidden units, ``O`` output features, ``nb`` token blocks of ``block``
tokens, ``m`` units recomputed per block.  Each token block ``n`` has its own
list of hidden units ``units[b, n, :m]``.

- :func:`mlp_delta_up`: for each block, the chosen units' pre-activations
  ``x @ W_up[units].T + b_up[units]`` (the weight rows gathered inside the
  matmul), their GELU, the change against the cached activations, and the
  cache updated in place.  Returns the change ``(B, nb, block, m)``.
- :func:`mlp_delta_down`: adds ``change @ W_down_t[units]`` to the cached
  output ``(B, T, O)`` in place, ``W_down_t`` being the down projection's
  weight transposed ``(N, O)`` (its rows gathered inside the matmul).

Tokens past ``T`` in the last block read zeros and are never written to the
output.  Both run as PyTorch custom ops.  The references are
:func:`~vdit_sparse.kernels.reference.mlp_delta_up_reference` and
:func:`~vdit_sparse.kernels.reference.mlp_delta_down_reference`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_runtime import kernel_for

__all__ = ["mlp_delta_up", "mlp_delta_down", "GELU_KINDS"]

#: The activations the up kernel computes: torch's ``F.gelu(x, approximate=...)``.
GELU_KINDS = ("tanh", "none")


@triton.jit
def _mlp_delta_up_kernel(
    X, W, BIAS, UNITS, ACT, DELTA,
    T, C, M,
    stride_xb, stride_xt,
    stride_wn,
    stride_ub, stride_un,
    stride_ab, stride_at,
    stride_db, stride_dn, stride_dt,
    TILES_PER_BLOCK: tl.constexpr,  # token tiles per token block
    BLOCK_T: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # CPU interpreter: its bf16 dot is wrong, so dot upcast operands
):
    pid_u, pid_t, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_b = pid_b.to(tl.int64)
    block = pid_t // TILES_PER_BLOCK
    tile = pid_t % TILES_PER_BLOCK
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # padded token index
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = offs_u < M
    units = tl.load(UNITS + off_b * stride_ub + block * stride_un + offs_u, mask=u_ok, other=0).to(tl.int64)
    real = tokens < T
    acc = tl.zeros([BLOCK_T, BLOCK_U], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        b_x = tl.load(X + off_b * stride_xb + tokens[:, None] * stride_xt + offs_c[None, :],
                      mask=real[:, None] & c_ok[None, :], other=0.0)
        b_w = tl.load(W + units[:, None] * stride_wn + offs_c[None, :], mask=u_ok[:, None] & c_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            b_x, b_w = b_x.to(tl.float32), b_w.to(tl.float32)
        acc = tl.dot(b_x, tl.trans(b_w), acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + units, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    if TANH:
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        new = acc * tl.sigmoid(2.0 * inner)  # 0.5 x (1 + tanh(inner))
    else:
        new = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    p_act = ACT + off_b * stride_ab + tokens[:, None] * stride_at + units[None, :]
    old = tl.load(p_act, mask=u_ok[None, :], other=0.0)
    new = new.to(old.dtype)
    tl.store(p_act, new, mask=u_ok[None, :])
    p_delta = DELTA + off_b * stride_db + block * stride_dn + (tile * BLOCK_T + tl.arange(0, BLOCK_T))[:, None] * stride_dt
    tl.store(p_delta + offs_u[None, :], (new.to(tl.float32) - old.to(tl.float32)).to(old.dtype), mask=u_ok[None, :])


@triton.jit
def _mlp_delta_down_kernel(
    DELTA, WT, UNITS, OUT,
    T, M, O,
    stride_db, stride_dn, stride_dt,
    stride_wn,
    stride_ub, stride_un,
    stride_ob, stride_ot,
    TILES_PER_BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_O: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_o, pid_t, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_b = pid_b.to(tl.int64)
    block = pid_t // TILES_PER_BLOCK
    tile = pid_t % TILES_PER_BLOCK
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # within the token block
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < O
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    for start in range(0, M, BLOCK_U):
        offs_u = start + tl.arange(0, BLOCK_U)
        u_ok = offs_u < M
        units = tl.load(UNITS + off_b * stride_ub + block * stride_un + offs_u, mask=u_ok, other=0).to(tl.int64)
        b_d = tl.load(DELTA + off_b * stride_db + block * stride_dn + rows[:, None] * stride_dt + offs_u[None, :],
                      mask=u_ok[None, :], other=0.0)
        b_w = tl.load(WT + units[:, None] * stride_wn + offs_o[None, :], mask=u_ok[:, None] & o_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            b_d, b_w = b_d.to(tl.float32), b_w.to(tl.float32)
        acc = tl.dot(b_d, b_w, acc)
    p_out = OUT + off_b * stride_ob + tokens[:, None] * stride_ot + offs_o[None, :]
    keep = (tokens < T)[:, None] & o_ok[None, :]
    out = tl.load(p_out, mask=keep, other=0.0)
    tl.store(p_out, (out.to(tl.float32) + acc).to(out.dtype), mask=keep)


def _tile(block: int, largest: int) -> int:
    """The token tile: the largest of ``largest``, 64, 32, 16 that divides the token block."""
    tile = next((t for t in (largest, 64, 32, 16) if t <= largest and block % t == 0), None)
    if tile is None:
        raise ValueError(f"the MLP delta kernels need token blocks of a multiple of 16 tokens, got {block}")
    return tile


def mlp_delta_up(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], units: torch.Tensor,
                 activation: torch.Tensor, gelu: str = "tanh", *, block_t: int = 64, block_u: int = 64,
                 block_c: int = 64, num_warps: int = 8) -> torch.Tensor:
    """x ``(B, T, C)``, the up projection ``weight (N, C)`` and ``bias (N)``, int ``units (B, nb, m)``, the cached
    activations ``(B, nb, block, N)`` (updated in place) -> the change ``(B, nb, block, m)`` in x's dtype.

    ``gelu`` is the GELU's ``approximate`` (``"tanh"`` or ``"none"``).  One
    program computes ``block_t`` tokens (at most the token block) by
    ``block_u`` units, ``block_c`` input features at a time.  The defaults
    were the fastest of those ``scripts/check_mlp_delta_gpu.py`` timed on an
    H200 at both real shapes (``benchmarks/results/mlp-delta-h200.json``).
    """
    batch, tokens, features = x.shape
    if gelu not in GELU_KINDS:
        raise ValueError(f"gelu must be one of {GELU_KINDS}, got {gelu!r}")
    if activation.dim() != 4 or activation.shape[0] != batch or activation.shape[1] * activation.shape[2] < tokens:
        raise ValueError(f"activation must be (B, nb, block, N) covering {tokens} tokens, got {tuple(activation.shape)}")
    if weight.shape != (activation.shape[3], features) or units.shape[:2] != activation.shape[:2]:
        raise ValueError(f"weight {tuple(weight.shape)} / units {tuple(units.shape)} do not fit the activation "
                         f"{tuple(activation.shape)} and x {tuple(x.shape)}")
    block_t = _tile(activation.shape[2], block_t)
    if not (x.stride(-1) == weight.stride(-1) == activation.stride(-1) == units.stride(-1) == 1):
        raise ValueError("x, weight, units and activation must be contiguous in their last dim")
    return _mlp_delta_up_op(x, weight, bias, units, activation, gelu == "tanh", block_t, block_u, block_c, num_warps)


@torch.library.custom_op("vdit_sparse::mlp_delta_up", mutates_args=("activation",))
def _mlp_delta_up_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], units: torch.Tensor,
                     activation: torch.Tensor, tanh: bool, block_t: int, block_u: int, block_c: int,
                     num_warps: int) -> torch.Tensor:
    batch, tokens, features = x.shape
    _, blocks, block, _ = activation.shape
    count = units.shape[-1]
    delta = x.new_empty(batch, blocks, block, count)
    flat = activation.view(batch, blocks * block, -1)
    grid = (triton.cdiv(count, block_u), blocks * (block // block_t), batch)
    kernel_for(_mlp_delta_up_kernel, x.device)[grid](
        x, weight, bias if bias is not None else weight, units, flat, delta,
        tokens, features, count,
        x.stride(0), x.stride(1), weight.stride(0), units.stride(0), units.stride(1),
        flat.stride(0), flat.stride(1), *delta.stride()[:3],
        TILES_PER_BLOCK=block // block_t, BLOCK_T=block_t, BLOCK_U=block_u, BLOCK_C=block_c,
        HAS_BIAS=bias is not None, TANH=tanh, DOT_IN_FP32=x.device.type == "cpu", num_warps=num_warps, num_stages=3,
    )
    return delta


@_mlp_delta_up_op.register_fake
def _(x, weight, bias, units, activation, tanh, block_t, block_u, block_c, num_warps):
    return x.new_empty(*activation.shape[:3], units.shape[-1])


def mlp_delta_down(delta: torch.Tensor, weight_t: torch.Tensor, units: torch.Tensor, out: torch.Tensor, *,
                   block_t: int = 64, block_o: int = 128, block_u: int = 32, num_warps: int = 4) -> None:
    """Adds ``delta (B, nb, block, m) @ weight_t[units] (m, O)`` per token block to ``out (B, T, O)`` in place.

    One program computes ``block_t`` tokens by ``block_o`` output features, ``block_u`` units at a time (the
    defaults: as for :func:`mlp_delta_up`)."""
    batch, blocks, block, count = delta.shape
    if units.shape != (batch, blocks, count) or weight_t.dim() != 2:
        raise ValueError(f"units {tuple(units.shape)} / weight_t {tuple(weight_t.shape)} do not fit delta {tuple(delta.shape)}")
    if out.dim() != 3 or out.shape[0] != batch or out.shape[2] != weight_t.shape[1] or out.shape[1] > blocks * block:
        raise ValueError(f"out must be (B, T <= {blocks * block}, {weight_t.shape[1]}), got {tuple(out.shape)}")
    block_t = _tile(block, block_t)
    if not (delta.stride(-1) == weight_t.stride(-1) == units.stride(-1) == out.stride(-1) == 1):
        raise ValueError("delta, weight_t, units and out must be contiguous in their last dim")
    _mlp_delta_down_op(delta, weight_t, units, out, block_t, block_o, block_u, num_warps)


@torch.library.custom_op("vdit_sparse::mlp_delta_down", mutates_args=("out",))
def _mlp_delta_down_op(delta: torch.Tensor, weight_t: torch.Tensor, units: torch.Tensor, out: torch.Tensor,
                       block_t: int, block_o: int, block_u: int, num_warps: int) -> None:
    batch, blocks, block, count = delta.shape
    grid = (triton.cdiv(out.shape[2], block_o), blocks * (block // block_t), batch)
    kernel_for(_mlp_delta_down_kernel, delta.device)[grid](
        delta, weight_t, units, out,
        out.shape[1], count, out.shape[2],
        *delta.stride()[:3], weight_t.stride(0), units.stride(0), units.stride(1), out.stride(0), out.stride(1),
        TILES_PER_BLOCK=block // block_t, BLOCK_T=block_t, BLOCK_U=block_u, BLOCK_O=block_o,
        DOT_IN_FP32=delta.device.type == "cpu", num_warps=num_warps, num_stages=3,
    )
