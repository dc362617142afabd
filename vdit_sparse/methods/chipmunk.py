"""Chipmunk: column-sparse attention deltas against a cached dense pass.

Paper: Sharma et al., "Chipmunk: Training-Free Acceleration of Diffusion
Transformers with Dynamic Column-Sparse Deltas" (2025).  Ours is written from
its description, on our own kernels.

Video queries are taken in :class:`~vdit_sparse.geometry.Voxels` order, so
each run of ``voxel_size`` queries is one voxel of neighbouring tokens in
space and time (the partial voxels of a grid the voxel does not divide come
last).  A query group is one voxel.

- **Dense steps** (``dense_steps``, on a schedule of ``schedule_steps``
  steps, scaled to the run's step count; and any step without a cache)
  compute exact attention.  Per query group they sum the attention
  probabilities of each key column (over ``mass_rows`` of the group's rows,
  evenly spread: a third of the default voxel) and keep the ``top_k`` share of the keys
  with the most mass, plus up to a ``random_fraction`` share at random, plus
  every text key.  They cache ``o_cache = O_dense - O_selected`` for the video
  queries, where ``O_selected`` is attention over the kept columns only.
- **Sparse steps** compute ``O = o_cache + O_selected`` with the
  column-sparse kernel (:mod:`vdit_sparse.kernels.column_sparse_attention`),
  which gathers each group's key and value columns.  Text queries stay dense.

With ``top_k: 1`` every column is kept and a sparse step equals dense attention.
The cache is one ``(B, H, N_video, D)`` tensor per layer and call kind, and
the columns ``(B, H, groups, K)`` int32; the handle's summary reports their
size (``state_bytes``).  With ``cache_device: cpu`` both wait in pinned host
memory and each layer's are copied back on a side stream while the layer
before it runs (the feed-forward caches below, updated every step, stay on
the GPU).

**MLP deltas** (``mlp_top_k``, off by default): the feed-forwards of the
method's layers (every site its adapter names, HunyuanVideo's inlined
single-stream MLPs included) run dense on the dense steps and cache their
post-activation hidden units and output.  On a sparse step each block of
``mlp_block`` tokens recomputes only its ``mlp_top_k`` share of hidden units,
those whose activation changed most between the last two dense steps (by
magnitude after the first), and adds ``(a_new - a_cached) @ W_down`` for them
to the cached output; both caches take the new values (in place).  On a GPU
two Triton kernels (:mod:`vdit_sparse.kernels.mlp_delta`) gather the units'
weight rows inside their matmuls, for GELU activations.  With ``mlp_top_k:
1`` the feed-forward is exact.  The activation cache is ``B x tokens x
hidden`` per feed-forward: 0.9 GB a layer for CogVideoX-5B at 49 frames.

Example profile::

    method: chipmunk
    params: {top_k: 0.05, random_fraction: 0.01, voxel: [4, 6, 8], dense_steps: [0, 1, 10, 40]}
    dense_layers: [0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..context import AttentionCall
from ..geometry import TokenLayout, Voxels
from ..profile import scheduled_steps
from .base import AttentionMethod, register_method
from .block_sparse import BACKENDS, resolve_backend

__all__ = ["ChipmunkMethod", "ChipmunkParams", "select_columns"]

#: Bytes of column mass computed at once on a dense step (heads are taken a few at a time to stay under it).
MASS_CHUNK_BYTES = 2**30


@dataclass
class ChipmunkParams:
    #: Voxel (frames, height, width) in latent tokens: a query group.
    voxel: List[int] = field(default_factory=lambda: [4, 6, 8])
    #: Share of the keys each query group keeps on sparse steps (those with the most attention mass).
    top_k: float = 0.05
    #: Share of the keys added at random to each group's columns.
    random_fraction: float = 0.01
    #: Query rows per group whose attention ranks the columns, evenly spread over the voxel (None: all rows).
    mass_rows: Optional[int] = 64
    #: Steps that recompute dense attention and the cache, on a schedule of ``schedule_steps`` steps.
    dense_steps: List[int] = field(default_factory=lambda: [0, 1, 10, 40])
    schedule_steps: int = 50
    #: Share of hidden units each token block recomputes in the feed-forwards on sparse steps (None: MLPs dense).
    mlp_top_k: Optional[float] = None
    #: Tokens per block of the MLP deltas.
    mlp_block: int = 128
    #: Where the attention caches (``o_cache`` and the columns) live between steps: ``device`` (the GPU) or
    #: ``cpu`` (pinned host memory, each layer's copied back while the layer before it runs).
    cache_device: str = "device"
    backend: str = "auto"

    def validate(self) -> str | None:
        if len(self.voxel) != 3 or any(size < 1 for size in self.voxel):
            return f"field 'voxel' must be three positive sizes (frames, height, width), got {self.voxel}"
        if not 0.0 < self.top_k <= 1.0:
            return f"field 'top_k' must be in (0, 1], got {self.top_k}"
        if not 0.0 <= self.random_fraction < 1.0:
            return f"field 'random_fraction' must be in [0, 1), got {self.random_fraction}"
        if self.mass_rows is not None and self.mass_rows < 1:
            return f"field 'mass_rows' must be >= 1 or null, got {self.mass_rows}"
        if self.schedule_steps < 1:
            return f"field 'schedule_steps' must be >= 1, got {self.schedule_steps}"
        if not self.dense_steps or any(not 0 <= s < self.schedule_steps for s in self.dense_steps):
            return f"field 'dense_steps' must list steps in [0, {self.schedule_steps}), got {self.dense_steps}"
        if self.mlp_top_k is not None and not 0.0 < self.mlp_top_k <= 1.0:
            return f"field 'mlp_top_k' must be in (0, 1] or null, got {self.mlp_top_k}"
        if self.mlp_block < 1:
            return f"field 'mlp_block' must be >= 1, got {self.mlp_block}"
        if self.cache_device not in ("device", "cpu"):
            return f"field 'cache_device' must be 'device' or 'cpu', got {self.cache_device!r}"
        if self.backend not in BACKENDS:
            return f"field 'backend' must be one of {BACKENDS}, got {self.backend!r}"
        return None


def _attention(q, k, v, key_padding_mask) -> torch.Tensor:
    mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def select_columns(mass: torch.Tensor, layout: TokenLayout, top_k: float, random_fraction: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(B, H, G, K)`` columns and ``(B, H, G)`` counts: every text key, the ``top_k`` share of keys with
    the most mass, and up to a ``random_fraction`` share more, drawn at random (a draw of a column already
    listed is dropped).  Each group's listed columns ascend; entries past its count are ``S``.  ``mass`` is
    overwritten (its text columns)."""
    seq_len = mass.shape[-1]
    text = layout.is_text(mass.device)
    num_top = min(math.ceil(top_k * seq_len), seq_len - layout.text_length)
    num_random = min(math.ceil(random_fraction * seq_len), seq_len - layout.text_length - num_top)
    mass[..., text] = float("inf")  # text first, then the heaviest columns (in place: the mass is large)
    chosen = mass.topk(layout.text_length + num_top, dim=-1).indices
    if num_random > 0:
        drawn = torch.randint(seq_len, (*mass.shape[:-1], num_random), generator=generator, device=mass.device)
        chosen = torch.cat([chosen, drawn], dim=-1).sort(dim=-1).values
        repeat = torch.zeros_like(chosen, dtype=torch.bool)
        repeat[..., 1:] = chosen[..., 1:] == chosen[..., :-1]
        chosen = chosen.masked_fill(repeat, seq_len)  # repeats move past the count
        counts = chosen.shape[-1] - repeat.sum(dim=-1)
    else:
        counts = torch.full(chosen.shape[:-1], chosen.shape[-1], device=mass.device)
    columns = chosen.sort(dim=-1).values.to(torch.int32).contiguous()
    return columns, counts.to(torch.int32)


@register_method
class ChipmunkMethod(AttentionMethod):
    """Column-sparse attention deltas cached across steps; see the module docstring."""

    name = "chipmunk"
    Params = ChipmunkParams
    computes_attention = True

    @property
    def uses_feed_forward(self) -> bool:
        return self.params.mlp_top_k is not None

    def is_dense_step(self, step) -> bool:
        """Scheduled step ``s`` of ``schedule_steps`` is step ``floor(s * num_steps / schedule_steps + 1/2)`` of the run."""
        p = self.params
        return step.step_index in scheduled_steps(p.dense_steps, p.schedule_steps, step.num_steps)

    def needs_step(self, step) -> bool:
        return self.is_dense_step(step)

    def _selected(self, q_video, k, v, columns, counts, group_size, key_padding_mask, backend):
        if backend == "triton":
            from ..kernels.column_sparse_attention import column_sparse_attention

            block_m = next((m for m in (64, 32, 16) if group_size % m == 0), None)
            if block_m is None:
                raise ValueError(
                    f"chipmunk: a voxel of {group_size} tokens is no multiple of 16, which the column-sparse kernel "
                    "needs; choose voxel sizes whose product is a multiple of 16 (the default 4 x 6 x 8 is 192)"
                )
            return column_sparse_attention(q_video, k, v, columns, counts, group_size=group_size, block_m=block_m,
                                           key_padding_mask=key_padding_mask)
        from ..kernels.reference import column_sparse_attention_reference

        return column_sparse_attention_reference(q_video, k, v, columns, counts, group_size=group_size,
                                                 key_padding_mask=key_padding_mask, upcast=False)

    def attend(self, q, k, v, call: AttentionCall):
        layout, state, padding = call.layout, call.state, call.key_padding_mask
        backend = resolve_backend(self.params.backend, q)
        voxels = Voxels(*self.params.voxel)
        order = layout.order(voxels, q.device)
        video_rows = order[layout.video_start : layout.video_end]  # video tokens, voxel by voxel
        group_size = voxels.voxel_size
        q_video = q[:, :, video_rows]
        seq_len, num_video = layout.seq_len, video_rows.numel()
        if self.is_dense_step(call.step) or state.get("shape") != q_video.shape:
            ranking, ranking_size = _ranking_rows(num_video, group_size, self.params.mass_rows, q.device)
            picks = video_rows[ranking] if ranking is not None else video_rows
            if backend == "triton":  # the dense pass gives each row's lse, from which one kernel sums the mass
                from ..kernels.block_sparse_attention import block_sparse_attention, default_block_sizes
                from ..kernels.column_mass import column_mass
                from ..plan import dense_plan

                block_m, block_n = default_block_sizes(q.shape[-1])
                plan = dense_plan(seq_len, q.shape[1], block_m, block_n, q.device)
                out, lse = block_sparse_attention(q, k, v, plan.kv_block_indices, plan.kv_block_counts, block_m=block_m,
                                                  block_n=block_n, key_padding_mask=padding, return_lse=True)

                def mass_of(heads):
                    return column_mass(q[:, heads][:, :, picks], k[:, heads], lse[:, heads][:, :, picks], ranking_size,
                                       key_padding_mask=padding)
            else:
                from ..kernels.reference import column_mass_reference

                out = _attention(q, k, v, padding)

                def mass_of(heads):
                    return column_mass_reference(q[:, heads][:, :, picks], k[:, heads], ranking_size, padding)
            # The mass is (B, h, groups, S) float32: a few heads at a time bound it (and the selection's temporaries).
            groups = -(-picks.numel() // ranking_size)
            chunk = max(1, MASS_CHUNK_BYTES // (q.shape[0] * groups * seq_len * 4))
            generator = torch.Generator(q.device).manual_seed(call.layer_index * 1000 + call.step.step_index)
            parts = [select_columns(mass_of(slice(h, h + chunk)), layout, self.params.top_k, self.params.random_fraction,
                                    generator) for h in range(0, q.shape[1], chunk)]
            columns = torch.cat([c for c, _ in parts], dim=1) if len(parts) > 1 else parts[0][0]
            counts = torch.cat([n for _, n in parts], dim=1) if len(parts) > 1 else parts[0][1]
            selected = self._selected(q_video, k, v, columns, counts, group_size, padding, backend)
            o_cache = out[:, :, video_rows] - selected
            state.update(shape=q_video.shape, counts=counts)
            if self.params.cache_device == "cpu":
                state.offload("o_cache", o_cache)
                state.offload("columns", columns)
            else:
                state.update(o_cache=o_cache, columns=columns)
            # the dense pass, the column-mass pass (the ranking rows' q k^T again: half a pass) and the selected pass
            ranked = ranking.numel() if ranking is not None else num_video
            return out, 1.0 + 0.5 * ranked / seq_len + num_video * columns.shape[-1] / seq_len**2
        columns, counts = state.fetch("columns"), state["counts"]
        out = torch.empty_like(q)
        out[:, :, video_rows] = state.fetch("o_cache") + self._selected(q_video, k, v, columns, counts, group_size,
                                                                  padding, backend)
        text = slice(layout.text_start, layout.text_end)
        if layout.text_length:
            out[:, :, text] = _attention(q[:, :, text], k, v, padding)
        return out, (layout.text_length * seq_len + num_video * columns.shape[-1]) / seq_len**2

    def feed_forward(self, site, x, call):
        if call.step.warmup:
            return None
        p, state = self.params, call.state
        cached = state.get("activation")  # (B, nb, block, hidden): kept in token blocks
        if self.is_dense_step(call.step) or cached is None or state["tokens"] != x.shape[1] or cached.shape[0] != x.shape[0]:
            activation = site.activation(site.up(x))
            out = site.down_out(activation)
            blocks = _blocks(activation, p.mlp_block)
            if cached is not None and cached.shape == blocks.shape:  # the change on the real tokens (padding aside)
                change = _blocks((activation - cached.view(x.shape[0], -1, cached.shape[-1])[:, : x.shape[1]]).abs(),
                                 p.mlp_block)
            else:
                change = blocks.abs()
            units = _top_units(change, p.mlp_top_k)
            down_t = state["down_t"] if "down_t" in state else site.down_weight_t()
            state.update(activation=blocks, tokens=x.shape[1], out=out, units=units, down_t=down_t)
            return out
        units, activation, out = state["units"], state["activation"], state["out"]
        if resolve_backend(p.backend, x) == "triton" and site.gelu is not None:
            from ..kernels.mlp_delta import mlp_delta_down, mlp_delta_up

            if p.mlp_block % 16:
                raise ValueError(f"chipmunk: the MLP delta kernels need mlp_block to be a multiple of 16, got {p.mlp_block}")
            delta = mlp_delta_up(x, site.up.weight, site.up.bias, units, activation, site.gelu)
            mlp_delta_down(delta, state["down_t"], units, out)
        else:
            from ..kernels.reference import mlp_delta_down_reference, mlp_delta_up_reference

            delta = mlp_delta_up_reference(x, site.up.weight, site.up.bias, units, activation, site.activation)
            mlp_delta_down_reference(delta, state["down_t"], units, out)
        return out  # the cache, updated in place: each block's recomputed units' change added


def _ranking_rows(rows: int, group_size: int, per_group: int | None, device) -> tuple[torch.Tensor | None, int]:
    """(positions among ``rows`` video rows of ``per_group`` rows evenly spread over each group of
    ``group_size``, in group order, or None for all rows; the rows per group that gives)."""
    if per_group is None or per_group >= group_size:
        return None, group_size
    offsets = torch.arange(per_group, device=device) * group_size // per_group
    picks = (torch.arange(0, rows, group_size, device=device)[:, None] + offsets).flatten()
    return picks[picks < rows], per_group


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, T, C)`` -> ``(B, nb, block, C)``, the last block padded with zeros."""
    batch, tokens, width = x.shape
    padded = -(-tokens // block) * block
    return F.pad(x, (0, 0, 0, padded - tokens)).view(batch, padded // block, block, width)


def _top_units(change: torch.Tensor, share: float) -> torch.Tensor:
    """int32 ``(B, nb, m)``: per token block of ``change`` ``(B, nb, block, hidden)`` the ``share`` of hidden units
    with the largest summed change."""
    count = max(1, math.ceil(share * change.shape[-1]))
    return change.sum(dim=2).topk(count, dim=-1).indices.to(torch.int32)
