"""Sparse VideoGen (SVG): each head is spatial or temporal, decided online.

Paper: Xi et al., "Sparse VideoGen: Accelerating Video Diffusion Transformers
with Spatial-Temporal Sparsity", ICML 2025 (arXiv:2502.01776).

A *spatial* head attends to tokens near the query in frame-major order: its
own frame and the frames around it.  A *temporal* head attends to the same
spatial position across frames: in frame-major order those keys are a frame
apart, but after transposing the video span to position-major order
(``(frame, position) -> (position, frame)``) they are neighbours.  So both
kinds use one block mask, a band around the diagonal holding ``density`` of
the video query-key pairs, each in its own token order ("layout
transformation"): a temporal head's keys and values are permuted before the
block-sparse kernel, and the kernel gathers its query rows and scatters its
output rows itself.  Text rows and columns stay dense.

Which kind a head is comes from online profiling: ``num_samples`` query rows,
spread over the whole video, get their exact attention output and the output
under each of the two masks (one fused kernel on the GPU,
:mod:`vdit_sparse.kernels.row_errors`); the kind with the smaller mean
squared error wins, per head and per batch element (conditional and unconditional halves of
a CFG batch may differ).  The decision never leaves the GPU: it selects, per
(batch, head), the token order of the plan (``query_rows``), and keys and
values are gathered into it for every head (the identity order for spatial
heads), so nothing is read back to the host.  The plan is kept in the call's
state (per layer and call kind) and reused for ``reprofile_every`` steps.

Example profile::

    method: svg
    params: {density: 0.2, num_samples: 64, reprofile_every: 1}
    dense_warmup_fraction: 0.25
    dense_layers: [0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..context import AttentionCall
from ..geometry import TokenLayout
from ..patterns import diagonal_band_block_mask, frame_to_position_permutation
from ..plan import HeadPlan
from .base import register_method
from .block_sparse import BlockSparseMethod, BlockSparseParams

__all__ = [
    "SVGMethod",
    "SVGParams",
    "band_half_width",
    "classify_heads",
    "row_masks",
    "sample_rows",
]

HEAD_KINDS = ("auto", "spatial", "temporal")


@dataclass
class SVGParams(BlockSparseParams):
    #: Fraction of the video query-key pairs kept (the band's area, before lifting to blocks).
    density: float = 0.2
    #: Query rows sampled per call to classify the heads.
    num_samples: int = 64
    #: Classify every this many steps, reusing the decision in between.
    reprofile_every: int = 1
    #: "auto" classifies; "spatial" or "temporal" forces every head (baselines).
    head_kind: str = "auto"

    def validate(self) -> str | None:
        if not 0.0 < self.density <= 1.0:
            return f"field 'density' must be in (0, 1], got {self.density}"
        if self.num_samples < 1:
            return f"field 'num_samples' must be >= 1, got {self.num_samples}"
        if self.reprofile_every < 1:
            return f"field 'reprofile_every' must be >= 1, got {self.reprofile_every}"
        if self.head_kind not in HEAD_KINDS:
            return f"field 'head_kind' must be one of {HEAD_KINDS}, got {self.head_kind!r}"
        return super().validate()


def band_half_width(layout: TokenLayout, density: float) -> int:
    """Half-width ``w`` of the band ``|i - j| <= w`` that holds ``density`` of the video query-key pairs.

    The band's share of an ``N x N`` square is ``1 - (1 - w / N) ** 2``; solving
    for ``w`` gives the value below, and ``density`` 1 gives the full square.
    """
    n = layout.grid.num_tokens
    return math.ceil(n * (1.0 - math.sqrt(1.0 - density)))


def sample_rows(layout: TokenLayout, num_samples: int, device) -> torch.Tensor:
    """``num_samples`` video query positions spread evenly over the whole video span."""
    count = min(num_samples, layout.grid.num_tokens)
    offsets = torch.linspace(0, layout.grid.num_tokens - 1, count, device=device).round().long()
    return layout.video_start + offsets


def row_masks(
    layout: TokenLayout, block_mask: torch.Tensor, rows: torch.Tensor, block_m: int, block_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token masks ``(R, S)`` of the sampled rows: spatial (frame-major) and temporal (mapped back from position-major)."""
    seq_len = layout.seq_len
    keys = torch.arange(seq_len, device=rows.device)
    spatial = block_mask[rows // block_m][:, keys // block_n]
    perm = frame_to_position_permutation(layout, device=rows.device)
    where = torch.empty_like(perm)
    where[perm] = torch.arange(seq_len, device=rows.device)  # where[t]: position of token t after permuting
    temporal = block_mask[where[rows] // block_m][:, where[keys] // block_n]
    return spatial, temporal


def classify_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    row_masks: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "reference",
) -> torch.Tensor:
    """Bool ``(B, H)``: True where a head is better served by the temporal mask than the spatial one.

    ``rows`` are the sampled query positions and ``row_masks`` bool ``(2, R,
    S)`` their spatial and temporal token masks (:func:`row_masks`).  On the
    Triton backend one fused kernel streams keys and values once
    (:mod:`vdit_sparse.kernels.row_errors`); the reference computes the same
    in plain PyTorch.  Nothing is read back to the host.
    """
    if backend == "triton":
        from ..kernels.row_errors import masked_row_errors as errors_of
    else:
        from ..kernels.reference import masked_row_errors_reference as errors_of
    errors = errors_of(q, k, v, rows, row_masks, key_padding_mask)
    return errors[..., 1] < errors[..., 0]


@dataclass(eq=False)
class _LayoutParts:
    """What SVG derives from one token layout, once: the band plan and what classification needs."""

    band: HeadPlan  # one head, frame-major
    order: torch.Tensor  # int32 (1, 1, S): frame-major -> position-major
    identity: torch.Tensor  # int32 (1, 1, S)
    rows: torch.Tensor  # sampled query positions
    row_masks: torch.Tensor  # bool (2, R, S): spatial and temporal token masks of those rows


@register_method
class SVGMethod(BlockSparseMethod):
    name = "svg"
    Params = SVGParams

    def build_plan(self, layout, block_m, block_n, device) -> _LayoutParts:
        width = band_half_width(layout, self.params.density)
        band = diagonal_band_block_mask(layout, block_m, width, kv_block_size=block_n, device=device)
        rows = sample_rows(layout, self.params.num_samples, device)
        order = frame_to_position_permutation(layout, device=device).to(torch.int32)
        return _LayoutParts(
            HeadPlan.from_block_mask(band[None, None], block_m, block_n),
            order.view(1, 1, -1), torch.arange(layout.seq_len, dtype=torch.int32, device=device).view(1, 1, -1),
            rows, torch.stack(row_masks(layout, band, rows, block_m, block_n)),
        )

    def plan(self, q, k, v, call: AttentionCall) -> HeadPlan:
        parts = self.layout_plan(call.layout, call.block_m, call.block_n, q.device)
        batch, heads = q.shape[:2]
        band = parts.band.for_heads(heads)
        if self.params.head_kind == "spatial":
            return band
        if self.params.head_kind == "temporal":
            return HeadPlan(band.kv_block_indices, band.kv_block_counts, band.block_m, band.block_n, band.density,
                            parts.order.expand(1, heads, -1))
        state, step = call.state, call.step.step_index
        temporal = state.get("temporal")
        if temporal is None or temporal.shape != (batch, heads) or not 0 <= step - state["decided_at"] < self.params.reprofile_every:
            temporal = classify_heads(q, k, v, parts.rows, parts.row_masks, call.key_padding_mask, call.backend)
            state.update(temporal=temporal, decided_at=step)
        rows = torch.where(temporal[..., None], parts.order, parts.identity)  # (B, h, S), on the device
        return HeadPlan(band.kv_block_indices, band.kv_block_counts, band.block_m, band.block_n, band.density, rows)
