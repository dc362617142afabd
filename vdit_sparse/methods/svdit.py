"""Sparse-vDiT: one static pattern per head, chosen offline (:mod:`vdit_sparse.search`).

Paper: Chen et al., "Sparse-vDiT: Unleashing the Power of Sparse Attention to
Accelerate Video Diffusion Transformers" (arXiv:2506.03065); no code of it was
released, so the widths below and how they are chosen are ours.

Every head of a layer runs one *mode*, a parameter of the method:

``dense``
    every key (a layer whose heads are all dense runs the model's own processor);
``skip``
    none: the head's output is zero and it costs nothing;
``diagonal``
    a band around the diagonal in frame-major order holding ``density`` of the
    video query-key pairs: each token sees its neighbours in its own frame and
    the frames next to it;
``multi_diagonal``
    the same band after the frame/position transpose
    (:class:`~vdit_sparse.geometry.PositionMajor`): each token sees the same
    spatial position (and its neighbours) in the other frames, which in
    frame-major order are bands at offsets ``k x tokens_per_frame``;
``vertical_stripe``
    a fixed set of key columns every query attends to: ``columns``, ranges of
    video token offsets (frame-major, ``"0-255"`` inclusive), as the search
    found them.

Text rows and columns are kept in every mode but ``skip`` (CogVideoX's text
prefix, HunyuanVideo's suffix, whose padded keys stay masked).  Plans depend
only on the token layout, so nothing is decided online: the heads of one layer
are joined into one launch of the block-sparse kernel (dense heads list every
key block, skipped heads none).

Example profile (what ``vdit-sparse search`` writes, shortened)::

    method: svdit
    params: {mode: dense}
    dense_warmup_fraction: 0.2
    layers:
      3:
        sensitivity: 0.012
        heads:
          "0-2": {params: {mode: diagonal, density: 0.1}}
          "3": {params: {mode: skip}}
          "4": {params: {mode: vertical_stripe, columns: ["0-255", "1024-1087"]}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from ..geometry import POSITION_MAJOR, TokenLayout
from ..patterns import diagonal_band_block_mask, vertical_stripe_block_mask
from ..plan import HeadPlan, dense_plan, skip_plan
from .base import register_method
from .block_sparse import BlockSparseMethod, BlockSparseParams
from .svg import band_half_width

__all__ = ["MODES", "SVDiTMethod", "SVDiTParams", "format_column_ranges", "mode_plan", "parse_column_ranges"]

MODES = ("dense", "skip", "diagonal", "multi_diagonal", "vertical_stripe")


def parse_column_ranges(columns: List[str]) -> list[tuple[int, int]]:
    """``["0-255", "1024"]`` -> ``[(0, 255), (1024, 1024)]`` (inclusive ranges); raises ValueError with the bad entry."""
    ranges = []
    for entry in columns:
        first, dash, last = str(entry).strip().partition("-")
        try:
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise ValueError(f"column range {entry!r} is not 'low-high' or a single token offset") from None
        if low < 0 or high < low:
            raise ValueError(f"column range {entry!r} must have 0 <= low <= high")
        ranges.append((low, high))
    return ranges


def format_column_ranges(offsets: torch.Tensor) -> list[str]:
    """Sorted unique video token offsets -> the fewest inclusive ranges, as profile strings."""
    values = sorted(set(int(v) for v in offsets.tolist()))
    ranges, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            ranges.append(f"{start}-{value}" if value != start else f"{start}")
            start = None
    return ranges


@dataclass
class SVDiTParams(BlockSparseParams):
    #: One of :data:`MODES`.
    mode: str = "dense"
    #: ``diagonal`` and ``multi_diagonal``: the share of video query-key pairs the band holds.
    density: float = 0.1
    #: ``vertical_stripe``: the key columns, as inclusive ranges of video token offsets.
    columns: List[str] = field(default_factory=list)

    def validate(self) -> str | None:
        if self.mode not in MODES:
            return f"field 'mode' must be one of {MODES}, got {self.mode!r}"
        if not 0.0 < self.density <= 1.0:
            return f"field 'density' must be in (0, 1], got {self.density}"
        if self.mode == "vertical_stripe" and not self.columns:
            return "field 'columns' must name at least one key column range for mode 'vertical_stripe'"
        try:
            parse_column_ranges(self.columns)
        except ValueError as error:
            return f"field 'columns': {error}"
        return super().validate()


def stripe_columns(layout: TokenLayout, columns: List[str], device) -> torch.Tensor:
    """The sequence indices of a stripe's video columns; refuses offsets past this layout's video."""
    ranges = parse_column_ranges(columns)
    last = max(high for _, high in ranges)
    if last >= layout.grid.num_tokens:
        raise ValueError(
            f"vertical_stripe columns reach video token {last}, but this call has {layout.grid.num_tokens} video "
            f"tokens ({layout.grid}); the profile was searched at another resolution or frame count"
        )
    offsets = torch.cat([torch.arange(low, high + 1) for low, high in ranges])
    return (layout.video_start + offsets).to(device)


def mode_plan(
    layout: TokenLayout, mode: str, block_m: int, block_n: int, device, *, density: float = 1.0,
    columns: torch.Tensor | None = None,
) -> HeadPlan:
    """The one-head plan of a mode at a layout (``columns``: sequence indices, for ``vertical_stripe``)."""
    if mode == "dense":
        return dense_plan(layout.seq_len, 1, block_m, block_n, device)
    if mode == "skip":
        return skip_plan(layout.seq_len, 1, block_m, block_n, device)
    if mode in ("diagonal", "multi_diagonal"):
        band = diagonal_band_block_mask(
            layout, block_m, band_half_width(layout, density), kv_block_size=block_n, device=device
        )
        rows = None
        if mode == "multi_diagonal":  # the band in position-major order: the kernel gathers rows into it
            rows = layout.order(POSITION_MAJOR, device).to(torch.int32).view(1, 1, -1)
        return HeadPlan.from_block_mask(band[None, None], block_m, block_n, rows)
    if mode == "vertical_stripe":
        mask = vertical_stripe_block_mask(layout, block_m, columns, kv_block_size=block_n, device=device)
        return HeadPlan.from_block_mask(mask[None, None], block_m, block_n)
    raise ValueError(f"unknown mode {mode!r}; allowed: {MODES}")


@register_method
class SVDiTMethod(BlockSparseMethod):
    """The static per-head patterns of Sparse-vDiT; see the module docstring."""

    name = "svdit"
    Params = SVDiTParams

    def uses_model_processor(self, call):
        return self.params.mode == "dense" or call.step.warmup

    def build_plan(self, layout, block_m, block_n, device):
        p = self.params
        columns = stripe_columns(layout, p.columns, device) if p.mode == "vertical_stripe" else None
        return mode_plan(layout, p.mode, block_m, block_n, device, density=p.density, columns=columns)
