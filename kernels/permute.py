"""Token permutations of ``(B, H, S, D)`` tensors: gather and scatter in Triton.

Some heads (the SVG "temporal" heads) attend along time: same spatial position
across frames.  In the frame-major token order those keys are ``H * W`` apart;
after the frame-major -> position-major transpose of the video span they are
neighbours, so a narrow band of blocks covers them.  :func:`permute_tokens`
applies such an order to the chosen heads and :func:`permute_tokens` with
``inverse=True`` brings the attention output back.  Text tokens stay put.

Example::

    perm = frame_to_position_permutation(layout, device=q.device)
    q_t = permute_tokens(q, perm, heads=temporal_heads)      # (B, H, S, D)
    ...
    out = permute_tokens(out_t, perm, inverse=True, heads=temporal_heads)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vdit_sparse.geometry import TokenLayout
from vdit_sparse.patterns import frame_to_position_permutation

from ._triton_runtime import kernel_for
from .indices import check_row_table, permutation_table

__all__ = ["gather_rows", "permute_tokens", "permutation_table", "frame_to_position", "position_to_frame"]


@triton.jit
def _permute_rows(
    X, O, PERM,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_ob, stride_oh, stride_os,
    stride_pb, stride_ph,
    H, S,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SCATTER: tl.constexpr,  # False: out[t] = x[perm[t]]; True: out[perm[t]] = x[t]
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    offs_t = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_t < S
    src = tl.load(PERM + off_b * stride_pb + off_h * stride_ph + offs_t, mask=row_ok, other=0).to(tl.int64)
    if SCATTER:
        rows_in = offs_t.to(tl.int64)
        rows_out = src
    else:
        rows_in = src
        rows_out = offs_t.to(tl.int64)
    p_x = X + off_b * stride_xb + off_h * stride_xh + rows_in[:, None] * stride_xs + offs_d[None, :] * stride_xd
    p_o = O + off_b * stride_ob + off_h * stride_oh + rows_out[:, None] * stride_os + offs_d[None, :]
    tl.store(p_o, tl.load(p_x, mask=row_ok[:, None], other=0.0), mask=row_ok[:, None])


def gather_rows(x: torch.Tensor, rows: torch.Tensor, *, scatter: bool = False) -> torch.Tensor:
    """``out[b, h, i] = x[b, h, rows[b, h, i]]`` (``scatter=True``: ``out[b, h, rows[b, h, i]] = x[b, h, i]``).

    ``x`` ``(B, H, S, D)`` with a contiguous ``D``; ``rows`` int32 ``(1 or B,
    H, S)`` with a contiguous ``S``, each ``[b, h]`` a permutation of
    ``range(S)`` (not checked: that costs a sync).  One launch for every head;
    returns a new contiguous tensor.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (B, H, S, D), got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    batch, num_heads, seq_len, head_dim = x.shape
    if head_dim & (head_dim - 1) or head_dim > 256:
        raise ValueError(f"head dim (x.shape[-1]) must be a power of two <= 256, got {head_dim}")
    check_row_table("rows", rows, batch, num_heads, seq_len, x.device)
    return _gather_rows_op(x, rows.contiguous(), scatter)


# A PyTorch custom op: torch.compile sees one node and never traces into Triton's launcher.
@torch.library.custom_op("vdit_sparse::gather_rows", mutates_args=())
def _gather_rows_op(x: torch.Tensor, rows: torch.Tensor, scatter: bool) -> torch.Tensor:
    batch, num_heads, seq_len, head_dim = x.shape
    out = torch.empty((batch, num_heads, seq_len, head_dim), dtype=x.dtype, device=x.device)
    block_s = 64
    grid = (triton.cdiv(seq_len, block_s), batch * num_heads)
    kernel = kernel_for(_permute_rows, x.device)
    kernel[grid](
        x, out, rows, *x.stride(), *out.stride()[:3],
        rows.stride(0) if rows.shape[0] > 1 else 0, rows.stride(1), num_heads, seq_len,
        HEAD_DIM=head_dim, BLOCK_S=block_s, SCATTER=scatter,
    )
    return out


@_gather_rows_op.register_fake
def _(x, rows, scatter):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def permute_tokens(x: torch.Tensor, perm: torch.Tensor, inverse: bool = False, *, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Reorder the tokens of ``x`` ``(B, H, S, D)``: ``out[:, h, t] = x[:, h, perm[h, t]]``.

    ``perm`` is a permutation of ``range(S)`` (not checked: that costs a sync),
    int32/int64, ``(S,)`` for every head or ``(H, S)`` per head.  ``heads``,
    an optional bool ``(H,)`` or ``(B, H)``, permutes only the marked heads
    (per batch entry with ``(B, H)``: the halves of a CFG batch may differ)
    and copies the rest.  ``inverse=True`` undoes the same call.  Returns a
    new contiguous tensor.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (B, H, S, D), got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    batch, num_heads, seq_len, head_dim = x.shape
    if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"perm must be an int32/int64 tensor, got {perm.dtype if isinstance(perm, torch.Tensor) else type(perm).__name__}")
    if tuple(perm.shape) not in ((seq_len,), (num_heads, seq_len)):
        raise ValueError(f"perm must have shape (S,) = ({seq_len},) or (H, S) = ({num_heads}, {seq_len}), got {tuple(perm.shape)}")
    if perm.device != x.device:
        raise ValueError(f"perm must be on x's device {x.device}, got {perm.device}")
    if heads is not None and (
        heads.dtype != torch.bool or tuple(heads.shape) not in ((num_heads,), (batch, num_heads)) or heads.device != x.device
    ):
        raise ValueError(
            f"heads must be a bool tensor of shape (H,) = ({num_heads},) or (B, H) = ({batch}, {num_heads}) "
            f"on {x.device}, got {heads.dtype} {tuple(heads.shape)} on {heads.device}"
        )
    return gather_rows(x, permutation_table(perm, heads, num_heads, seq_len), scatter=inverse)


def frame_to_position(x: torch.Tensor, layout: TokenLayout, *, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Video span of ``x`` ``(B, H, S, D)`` from frame-major to position-major order (text stays)."""
    return permute_tokens(x, frame_to_position_permutation(layout, device=x.device), heads=heads)


def position_to_frame(x: torch.Tensor, layout: TokenLayout, *, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`frame_to_position`."""
    return permute_tokens(x, frame_to_position_permutation(layout, device=x.device), inverse=True, heads=heads)
