"""Per-head attention plans, and the one executor that runs a plan for every head of a layer at once.

A method turns an attention call into a :class:`HeadPlan`: for every (batch,
head), the key blocks each query block attends to (the kernel's index lists:
every block for a dense head, none for a skipped head, whose output is zero)
and, optionally, the token order the head attends in.  Heads of one layer may
come from different methods: :func:`combine_plans` joins their plans along
the head axis, and :func:`run_plan` runs the joined plan in one launch of the
block-sparse kernel (the Triton backend) or in plain PyTorch (the reference
backend, which expands the plan to token masks: for checking and for small
models on the CPU).

Plans are tensors on the attention's device.  Building one from a block mask
reads its density back to the host once; methods build static plans once per
token layout and keep them, so a sparse forward reads nothing back.

Dimension letters: ``B`` batch, ``H`` heads, ``S`` tokens, ``D`` head dim,
``nQB`` / ``nKB`` query / key blocks, ``maxK`` the longest index list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .geometry import num_blocks

__all__ = ["HeadPlan", "combine_plans", "dense_plan", "gather_rows", "run_plan", "skip_plan"]

Density = Union[float, torch.Tensor]


@dataclass(eq=False)
class HeadPlan:
    """What one attention call computes, per (batch, head).

    ``kv_block_indices`` int32 ``(Bi, H, nQB, maxK)`` and ``kv_block_counts``
    int32 ``(Bi, H, nQB)``, ``Bi`` 1 (shared by the batch) or ``B``: query
    block ``i`` of head ``h`` attends to key blocks
    ``kv_block_indices[b, h, i, :kv_block_counts[b, h, i]]`` (see
    :mod:`vdit_sparse.kernels.block_sparse_attention`).  Expanded views with
    zero strides are fine and cost no memory.

    ``query_rows`` int32 ``(Br, H, S)`` or None: the token order of each
    head.  Slot ``i`` of head ``h`` is token ``query_rows[b, h, i]``: the
    executor gathers keys and values into that order, and the kernel gathers
    the queries and scatters the outputs back to frame-major order.  Orders
    keep text tokens in place (key padding is read in frame-major order).
    None: every head attends in frame-major order.

    ``density`` is the fraction of (query block, key block) pairs computed,
    averaged over batch and heads: a float, or a 0-d tensor on the device
    (read only when a summary asks for it).
    """

    kv_block_indices: torch.Tensor
    kv_block_counts: torch.Tensor
    block_m: int
    block_n: int
    density: Density
    query_rows: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.kv_block_counts.shape[1]

    @classmethod
    def from_block_mask(
        cls, block_mask: torch.Tensor, block_m: int, block_n: int, query_rows: torch.Tensor | None = None
    ) -> "HeadPlan":
        """The plan of a bool block mask ``(Bi, H, nQB, nKB)`` (reads its density and longest row back once)."""
        from .kernels.indices import block_mask_to_indices

        indices, counts = block_mask_to_indices(block_mask)
        return cls(indices, counts, block_m, block_n, block_mask.float().mean().item(), query_rows)

    def for_heads(self, heads: int) -> "HeadPlan":
        """This plan for ``heads`` heads: a plan built for one head is expanded (a view)."""
        if self.num_heads == heads:
            return self
        if self.num_heads != 1:
            raise ValueError(f"a plan for {self.num_heads} heads cannot serve {heads}")

        def expand(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.expand(t.shape[0], heads, *t.shape[2:])

        return HeadPlan(
            expand(self.kv_block_indices), expand(self.kv_block_counts), self.block_m, self.block_n, self.density,
            expand(self.query_rows),
        )


def dense_plan(seq_len: int, heads: int, block_m: int, block_n: int, device) -> HeadPlan:
    """Every query block attends to every key block (views of one row: no memory per head or block)."""
    q_blocks, kv_blocks = num_blocks(seq_len, block_m), num_blocks(seq_len, block_n)
    row = torch.arange(kv_blocks, dtype=torch.int32, device=device)
    indices = row.expand(1, heads, q_blocks, kv_blocks)
    counts = torch.full((1, 1, 1), kv_blocks, dtype=torch.int32, device=device).expand(1, heads, q_blocks)
    return HeadPlan(indices, counts, block_m, block_n, 1.0)


def skip_plan(seq_len: int, heads: int, block_m: int, block_n: int, device) -> HeadPlan:
    """No key block for any query: the heads output zeros."""
    q_blocks = num_blocks(seq_len, block_m)
    indices = torch.zeros((1, 1, 1, 1), dtype=torch.int32, device=device).expand(1, heads, q_blocks, 1)
    counts = torch.zeros((1, 1, 1), dtype=torch.int32, device=device).expand(1, heads, q_blocks)
    return HeadPlan(indices, counts, block_m, block_n, 0.0)


def combine_plans(parts: Sequence[tuple[torch.Tensor, HeadPlan]], heads: int, seq_len: int) -> HeadPlan:
    """One plan for ``heads`` heads from plans of disjoint head sets ``(head indices, plan)``.

    All parts share one block geometry.  Index lists are padded to the
    longest; a part without a token order gets the identity where another
    part has one.  The result holds new tensors (one small copy per call).
    """
    first = parts[0][1]
    if any((plan.block_m, plan.block_n) != (first.block_m, first.block_n) for _, plan in parts):
        raise ValueError("the heads of one layer must share one block geometry")
    device = first.kv_block_counts.device
    batch = max(plan.kv_block_counts.shape[0] for _, plan in parts)
    q_blocks = first.kv_block_counts.shape[2]
    longest = max(plan.kv_block_indices.shape[3] for _, plan in parts)
    indices = torch.zeros((batch, heads, q_blocks, longest), dtype=torch.int32, device=device)
    counts = torch.zeros((batch, heads, q_blocks), dtype=torch.int32, device=device)
    rows = None
    if any(plan.query_rows is not None for _, plan in parts):
        rows_batch = max(plan.query_rows.shape[0] for _, plan in parts if plan.query_rows is not None)
        rows = torch.arange(seq_len, dtype=torch.int32, device=device).repeat(rows_batch, heads, 1)
    density: Density = 0.0
    for head_index, plan in parts:
        width = plan.kv_block_indices.shape[3]
        indices[:, head_index, :, :width] = plan.kv_block_indices
        counts[:, head_index] = plan.kv_block_counts
        if plan.query_rows is not None:
            rows[:, head_index] = plan.query_rows
        density = density + plan.density * len(head_index) / heads
    return HeadPlan(indices, counts, first.block_m, first.block_n, density, rows)


def gather_rows(x: torch.Tensor, rows: torch.Tensor, backend: str) -> torch.Tensor:
    """``out[b, h, i] = x[b, h, rows[b, h, i]]`` for ``x`` ``(B, H, S, D)`` and int32 ``rows`` ``(1 or B, H, S)``."""
    if backend == "triton":
        from .kernels.permute import gather_rows as gather

        return gather(x, rows)
    from .kernels.reference import gather_rows_reference

    return gather_rows_reference(x, rows)


def run_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HeadPlan,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """Attention of q, k, v ``(B, H, S, D)`` under ``plan``: one kernel launch for all heads.

    With a token order, keys and values are gathered into it first (one
    gather each); queries and outputs move inside the kernel.  ``backend``
    ``"reference"`` computes the same in plain PyTorch, in q's dtype.
    """
    if plan.num_heads != q.shape[1]:
        raise ValueError(f"the plan covers {plan.num_heads} heads, the call has {q.shape[1]}")
    if plan.query_rows is not None:
        k, v = gather_rows(k, plan.query_rows, backend), gather_rows(v, plan.query_rows, backend)
    kwargs = dict(
        block_m=plan.block_m, block_n=plan.block_n, key_padding_mask=key_padding_mask, query_rows=plan.query_rows
    )
    if backend == "reference":
        from .kernels.reference import block_sparse_attention_reference

        return block_sparse_attention_reference(
            q, k, v, plan.kv_block_indices, plan.kv_block_counts, upcast=False, **kwargs
        )
    from .kernels.block_sparse_attention import block_sparse_attention

    return block_sparse_attention(q, k, v, plan.kv_block_indices, plan.kv_block_counts, **kwargs)
