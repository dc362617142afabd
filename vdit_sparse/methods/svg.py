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
under each of the two masks; the kind with the smaller mean squared error
wins, per head and per batch element (conditional and unconditional halves of
a CFG batch may differ).  The decision is kept per ``(layer, call kind)`` and
reused for ``reprofile_every`` steps.

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
import torch.nn.functional as F

from ..context import AttentionCall
from ..geometry import TokenLayout
from ..patterns import diagonal_band_block_mask, frame_to_position_permutation
from .base import register_method
from .block_sparse import (
    BlockPlan,
    BlockSparseMethod,
    BlockSparseParams,
    block_sizes_for,
    resolve_backend,
    run_block_plan,
)

__all__ = [
    "SVGMethod",
    "SVGParams",
    "band_half_width",
    "classify_heads",
    "permute_heads",
    "row_masks",
    "sample_rows",
    "svg_token_masks",
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
    spatial_rows: torch.Tensor,
    temporal_rows: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``(B, H)``: True where a head is better served by the temporal mask than the spatial one.

    ``rows`` are the sampled query positions and ``spatial_rows`` /
    ``temporal_rows`` their ``(R, S)`` token masks (:func:`row_masks`).  One
    pass of scores over the sampled rows serves all three outputs: the
    unnormalised probabilities ``exp(s - max)`` are shared, and each output
    is its masked numerator over its masked denominator.  Matrix products run
    in q's dtype, the softmax and the errors in float32.
    """
    scores = torch.matmul(q[:, :, rows], k.transpose(-1, -2)).float()  # (B, H, R, S)
    scores.mul_(q.shape[-1] ** -0.5)
    if key_padding_mask is not None:
        scores.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    probs = scores.to(v.dtype)
    del scores
    outputs = []
    for mask in (None, spatial_rows, temporal_rows):
        weights = probs if mask is None else probs * mask
        outputs.append(torch.matmul(weights, v).float() / weights.sum(dim=-1, dtype=torch.float32)[..., None])
    exact, spatial, temporal = outputs
    spatial_error = (spatial - exact).pow(2).mean(dim=(-1, -2))
    temporal_error = (temporal - exact).pow(2).mean(dim=(-1, -2))
    return temporal_error < spatial_error


def svg_token_masks(layout: TokenLayout, block_mask: torch.Tensor, temporal: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Token masks ``(B, H, S, S)`` in frame-major order that the SVG kernel path computes (reference only)."""
    every_row = torch.arange(layout.seq_len, device=block_mask.device)
    spatial, temporal_mask = row_masks(layout, block_mask, every_row, block_m, block_n)
    return torch.where(temporal[:, :, None, None], temporal_mask, spatial)


def permute_heads(x: torch.Tensor, perm: torch.Tensor, selected: torch.Tensor, *, inverse: bool, backend: str) -> torch.Tensor:
    """Token order ``perm`` applied to the (batch, head) pairs ``selected`` ``(B, H)`` of ``x`` ``(B, H, S, D)``."""
    if backend == "triton":
        from ..kernels.permute import permute_tokens

        return permute_tokens(x, perm, inverse=inverse, heads=selected)
    from ..kernels.reference import permute_tokens_reference

    return permute_tokens_reference(x, perm, inverse=inverse, heads=selected)


@dataclass(eq=False, kw_only=True)
class SVGPlan(BlockPlan):
    """The band (the same for every head) plus what classification and the layout transformation need."""

    perm: torch.Tensor  # frame-major -> position-major token order
    rows: torch.Tensor  # sampled query positions for classification
    spatial_rows: torch.Tensor  # (R, S) token masks of those rows
    temporal_rows: torch.Tensor


@register_method
class SVGMethod(BlockSparseMethod):
    name = "svg"
    Params = SVGParams

    def __init__(self, params):
        super().__init__(params)
        self._decisions: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}

    def reset(self) -> None:
        self._decisions.clear()

    def build_plan(self, layout, block_m, block_n, device) -> SVGPlan:
        width = band_half_width(layout, self.params.density)
        band = diagonal_band_block_mask(layout, block_m, width, kv_block_size=block_n, device=device)
        rows = sample_rows(layout, self.params.num_samples, device)
        spatial_rows, temporal_rows = row_masks(layout, band, rows, block_m, block_n)
        return SVGPlan(
            band[None, None], band.float().mean().item(),
            perm=frame_to_position_permutation(layout, device=device),
            rows=rows, spatial_rows=spatial_rows, temporal_rows=temporal_rows,
        )

    def head_kinds(self, q, k, v, call: AttentionCall, plan: SVGPlan) -> torch.Tensor:
        """Bool ``(B, H)``, True for temporal heads; classified or reused from an earlier step."""
        batch, heads = q.shape[:2]
        if self.params.head_kind != "auto":
            return torch.full((batch, heads), self.params.head_kind == "temporal", device=q.device)
        step = call.step.step_index
        cached = self._decisions.get(call.cache_key)
        if cached is not None and 0 <= step - cached[0] < self.params.reprofile_every and cached[1].shape == (batch, heads):
            return cached[1]
        temporal = classify_heads(q, k, v, plan.rows, plan.spatial_rows, plan.temporal_rows, call.key_padding_mask)
        self._decisions[call.cache_key] = (step, temporal)
        return temporal

    def attend(self, q, k, v, call):
        backend = resolve_backend(self.params.backend, q)
        block_m, block_n = block_sizes_for(self.params, q.shape[-1])
        plan = self.layout_plan(call.layout, block_m, block_n, q.device)
        temporal = self.head_kinds(q, k, v, call, plan)
        batch, heads, seq_len, _ = q.shape
        call.stats.record(self.name, plan.density, batch * heads, seq_len)
        if backend == "reference":
            token_mask = svg_token_masks(call.layout, plan.mask[0, 0], temporal, block_m, block_n)
            if call.key_padding_mask is not None:
                token_mask = token_mask & call.key_padding_mask[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
        query_rows = None
        if bool(temporal.any()):  # with every head spatial there is nothing to transform
            from ..kernels.permute import permutation_table

            # Keys and values move to position-major order; the kernel gathers the query rows and
            # scatters the output rows itself (query_rows), so q and the output are never copied.
            k, v = (permute_heads(t, plan.perm, temporal, inverse=False, backend=backend) for t in (k, v))
            query_rows = permutation_table(plan.perm, temporal, heads, seq_len)
        # The key-padding mask needs no permuting: padding is on text tokens, which stay in place.
        return run_block_plan(q, k, v, plan, block_m, block_n, call.key_padding_mask, backend, query_rows)
