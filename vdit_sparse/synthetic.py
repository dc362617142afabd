"""Synthetic attention with a planted, known structure, for tests that need a known answer.

:func:`planted_qkv` builds q, k, v ``(B, H, S, D)`` on a :class:`TokenLayout`
in which every head is planted as one kind of video-attention head:

================== ===================================================================
kind               where a video query's attention mass lies (its token pattern)
================== ===================================================================
``spatial``        its own latent frame (and, less, the next ones): ``|dframe| <= 1``
``temporal``       the same spatial position in every frame
``diagonal``       a band of neighbouring tokens in frame-major order: ``|i - j| <= 8``
``multi_diagonal`` bands at offsets ``k x tokens_per_frame``: ``|i - j - k T| <= 2``
``vertical_stripe`` a few global key columns (4 per head) that every query attends to
``dense``          nowhere in particular: unstructured, the whole row
================== ===================================================================

Text keys are in every pattern (methods keep text columns dense), so a
pattern's mass is the mass on its video keys plus the mass on text.  The
widths are :class:`PlantedShapes`' fields; :func:`pattern_token_mask` gives
the token rule and :func:`pattern_mass` measures how much of each head's
attention really lies in a pattern.

How a structure is planted so that it is real in ``softmax(q k^T / sqrt(D))``:
every video token gets a unit-norm *code* per head, and

    q_i = a * (code_q(i) + noise * e_i),    k_j = a * (code_k(j) + noise * e'_j),

with ``e ~ N(0, I / D)`` (norm about 1, so ``noise`` is the ratio of noise to
code) and ``a = sqrt(sharpness * sqrt(D))``, so a pair with equal codes gets
the logit ``sharpness`` and a pair with orthogonal codes gets 0.  The codes:

- ``spatial``: a code per latent frame, with a Gaussian similarity between
  frames (length scale ``(spatial_window_frames + 0.5) / 3`` frames), built
  exactly from the frames' Gram matrix;
- ``temporal``: orthonormal codes per spatial position (every frame shares them);
- ``diagonal`` and ``multi_diagonal``: Fourier features of the video offset (the
  construction RoPE uses), whose inner product is a Gaussian bump in ``i - j``
  of length scale ``(width + 0.5) / 3``; periodic with period
  ``tokens_per_frame`` for ``multi_diagonal``;
- ``vertical_stripe``: every video query shares one direction ``u``; the stripe
  keys have code ``u``, the other keys codes orthogonal to ``u``;
- ``dense`` and text tokens: independent random unit vectors for q and k.

Codes are rotated by a random orthogonal matrix per head, so two heads of one
kind differ.  At ``noise=0.1`` and the default sharpness at least 90% of each
head's mass lies in its pattern (tests/test_synthetic.py).  Noise dissolves
the structure: at ``noise=2`` most kinds keep less than half of their mass
above chance; a spatial head, whose code a whole frame shares, holds out
until ``noise`` is about 8.

Example::

    layout = TokenLayout(LatentGrid(5, 8, 8), text_length=16, text_position="prefix")
    kinds = ["spatial", "temporal", "vertical_stripe"]
    q, k, v = planted_qkv(layout, kinds, noise=0.1, seed=0)
    stripes = planted_stripe_columns(layout, len(kinds), seed=0)
    pattern_mass(q, k, layout, kinds, stripe_columns=stripes)  # each head's mass in its own pattern
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .geometry import TokenLayout

__all__ = [
    "HEAD_KINDS",
    "PlantedShapes",
    "planted_qkv",
    "planted_stripe_columns",
    "pattern_token_mask",
    "pattern_mass",
    "default_sharpness",
]

HEAD_KINDS = ("spatial", "temporal", "diagonal", "multi_diagonal", "vertical_stripe", "dense")


@dataclass(frozen=True)
class PlantedShapes:
    """Widths of the planted patterns; the same numbers define where their mass is measured.

    ``spatial_window_frames``: a spatial head's pattern is the frames within this
    many of the query's.  ``diagonal_width_tokens``: half-width of the diagonal
    band in video tokens.  ``multi_diagonal_width_tokens``: half-width of each
    band at ``k x tokens_per_frame`` (0 is the temporal pattern).
    ``num_stripes``: key columns per vertical-stripe head.
    """

    spatial_window_frames: int = 1
    diagonal_width_tokens: int = 8
    multi_diagonal_width_tokens: int = 2
    num_stripes: int = 4

    def __post_init__(self) -> None:
        for name in ("spatial_window_frames", "diagonal_width_tokens", "multi_diagonal_width_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"PlantedShapes.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_stripes < 1:
            raise ValueError(f"PlantedShapes.num_stripes must be >= 1, got {self.num_stripes}")


def default_sharpness(seq_len: int) -> float:
    """The matched-pair logit used when none is given: ``max(10, 2 ln S)``.

    A pattern must outweigh the ``S`` keys outside it, whose total grows with
    ``S``; a logit margin of ``2 ln S`` keeps that total small at any length.
    """
    return max(10.0, 2.0 * math.log(max(seq_len, 2)))


def _check_kinds(head_kinds: Sequence[str]) -> list[str]:
    if isinstance(head_kinds, str):
        raise TypeError(f"head_kinds must be a list of kinds, one per head, got the string {head_kinds!r}")
    kinds = list(head_kinds)
    if not kinds:
        raise ValueError("head_kinds is empty; give one kind per head")
    bad = sorted({kind for kind in kinds if kind not in HEAD_KINDS})
    if bad:
        raise ValueError(f"unknown head kinds {bad}; allowed: {', '.join(HEAD_KINDS)}")
    return kinds


def _random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # sign fix: a uniformly random rotation


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _categorical_codes(num_labels: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """One unit code per label ``(num_labels, dim)``: orthonormal when they fit, else random."""
    if num_labels <= dim:
        return _random_orthogonal(dim, generator)[:num_labels]
    return _unit_rows(torch.randn(num_labels, dim, generator=generator, dtype=torch.float64))


def _gaussian_kernel_codes(
    num_labels: int, length_scale: float, dim: int, generator: torch.Generator, period: int | None = None
) -> torch.Tensor:
    """Unit codes ``(num_labels, dim)`` of integer labels whose inner products follow
    ``exp(-d^2 / (2 l^2))``, ``d`` the label distance (circular when ``period`` is given).

    Exact (from the eigen-decomposition of the Gram matrix) when the labels fit
    in ``dim`` dimensions; otherwise ``dim / 2`` random Fourier features
    ``[cos(w t), sin(w t)] / sqrt(dim / 2)``, which have unit norm and the
    kernel as their expected inner product (error about ``1 / sqrt(dim)``).
    """
    labels = torch.arange(num_labels, dtype=torch.float64)
    if num_labels <= dim:
        distance = (labels[:, None] - labels[None, :]).abs()
        if period is not None:
            distance = torch.minimum(distance % period, period - distance % period)
        gram = torch.exp(-(distance**2) / (2 * length_scale**2))
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        codes = eigenvectors * eigenvalues.clamp_min(0).sqrt()
        padded = torch.zeros(num_labels, dim, dtype=torch.float64)
        padded[:, :num_labels] = codes
        return _unit_rows(padded) @ _random_orthogonal(dim, generator)
    num_frequencies = dim // 2
    if period is None:
        frequencies = torch.randn(num_frequencies, generator=generator, dtype=torch.float64) / length_scale
    else:
        # integer cycles per period keep the features periodic; spread as the wrapped kernel's spectrum
        spread = period / (2 * math.pi * length_scale)
        cycles = torch.round(torch.randn(num_frequencies, generator=generator, dtype=torch.float64) * spread)
        frequencies = 2 * math.pi * cycles / period
    phases = labels[:, None] * frequencies[None, :]
    features = torch.cat([phases.cos(), phases.sin()], dim=-1) / math.sqrt(num_frequencies)
    padded = torch.zeros(num_labels, dim, dtype=torch.float64)
    padded[:, : features.shape[1]] = features
    return _unit_rows(padded) @ _random_orthogonal(dim, generator)


def _generator(seed: int, *stream: int) -> torch.Generator:
    # One independent stream per (seed, purpose, head): changing one head's kind leaves the others alone.
    value = seed
    for part in stream:
        value = value * 1_000_003 + part
    return torch.Generator().manual_seed(value % (2**63))


def planted_stripe_columns(
    layout: TokenLayout, num_heads: int, *, seed: int = 0, shapes: PlantedShapes = PlantedShapes()
) -> torch.Tensor:
    """The stripe key columns (sequence indices of video tokens) of every head, ``(H, num_stripes)`` int64.

    :func:`planted_qkv` with the same ``seed`` plants vertical-stripe heads on
    exactly these columns (the other kinds ignore them).
    """
    num_video = layout.grid.num_tokens
    if shapes.num_stripes > num_video:
        raise ValueError(f"num_stripes ({shapes.num_stripes}) exceeds the {num_video} video tokens of {layout}")
    columns = [
        torch.randperm(num_video, generator=_generator(seed, 1, head))[: shapes.num_stripes].sort().values
        for head in range(num_heads)
    ]
    return torch.stack(columns) + layout.video_start


def _head_codes(
    layout: TokenLayout, kind: str, dim: int, shapes: PlantedShapes, stripes: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit codes of the video tokens for queries and keys, each ``(num_video, dim)`` float64."""
    grid = layout.grid
    offsets = torch.arange(grid.num_tokens)
    frames, positions = offsets // grid.tokens_per_frame, offsets % grid.tokens_per_frame
    if kind == "spatial":
        per_frame = _gaussian_kernel_codes(grid.frames, (shapes.spatial_window_frames + 0.5) / 3, dim, generator)
        codes = per_frame[frames]
        return codes, codes
    if kind == "temporal":
        codes = _categorical_codes(grid.tokens_per_frame, dim, generator)[positions]
        return codes, codes
    if kind == "diagonal":
        codes = _gaussian_kernel_codes(grid.num_tokens, (shapes.diagonal_width_tokens + 0.5) / 3, dim, generator)
        return codes, codes
    if kind == "multi_diagonal":
        scale = (shapes.multi_diagonal_width_tokens + 0.5) / 3
        period = grid.tokens_per_frame
        per_position = _gaussian_kernel_codes(period, scale, dim, generator, period=period)
        codes = per_position[positions]
        return codes, codes
    if kind == "vertical_stripe":
        basis = _random_orthogonal(dim, generator)
        shared = basis[0]
        # other keys: random directions in the complement of `shared`, so their logit is 0 before noise
        others = _unit_rows(torch.randn(grid.num_tokens, dim - 1, generator=generator, dtype=torch.float64) @ basis[1:])
        keys = others.clone()
        keys[stripes - layout.video_start] = shared
        return shared.expand(grid.num_tokens, dim), keys
    # dense: unstructured
    queries = _unit_rows(torch.randn(grid.num_tokens, dim, generator=generator, dtype=torch.float64))
    keys = _unit_rows(torch.randn(grid.num_tokens, dim, generator=generator, dtype=torch.float64))
    return queries, keys


def planted_qkv(
    layout: TokenLayout,
    head_kinds: Sequence[str],
    *,
    batch: int = 1,
    head_dim: int = 64,
    noise: float = 0.1,
    sharpness: float | None = None,
    seed: int = 0,
    shapes: PlantedShapes = PlantedShapes(),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(batch, len(head_kinds), S, head_dim)`` with head ``h`` planted as ``head_kinds[h]``.

    ``noise`` is the norm of the Gaussian noise added to each unit code (0: the
    pure pattern; 2: mostly drowned; 8: near chance for every kind).  ``sharpness`` is the
    logit ``q.k / sqrt(D)`` of two tokens with equal codes (default
    :func:`default_sharpness`).  The codes depend on ``seed`` and the head only;
    the noise differs per batch element; v is standard normal.  The same
    arguments give bit-identical tensors.
    """
    kinds = _check_kinds(head_kinds)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if head_dim < 2:
        raise ValueError(f"head_dim must be >= 2, got {head_dim}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    sharpness = default_sharpness(layout.seq_len) if sharpness is None else float(sharpness)
    if sharpness <= 0:
        raise ValueError(f"sharpness must be positive, got {sharpness}")
    num_heads, seq_len = len(kinds), layout.seq_len
    scale = math.sqrt(sharpness * math.sqrt(head_dim))
    stripes = planted_stripe_columns(layout, num_heads, seed=seed, shapes=shapes)
    video = slice(layout.video_start, layout.video_end)

    q = torch.empty(batch, num_heads, seq_len, head_dim, dtype=torch.float64)
    k = torch.empty_like(q)
    for head, kind in enumerate(kinds):
        generator = _generator(seed, 2, head)
        query_codes, key_codes = _head_codes(layout, kind, head_dim, shapes, stripes[head], generator)
        # text: generic random directions, the same for every batch element
        text_q = _unit_rows(torch.randn(layout.text_length, head_dim, generator=generator, dtype=torch.float64))
        text_k = _unit_rows(torch.randn(layout.text_length, head_dim, generator=generator, dtype=torch.float64))
        q[:, head, video], k[:, head, video] = query_codes, key_codes
        q[:, head, layout.text_start : layout.text_end] = text_q
        k[:, head, layout.text_start : layout.text_end] = text_k
    noise_generator = _generator(seed, 3)
    q += noise * torch.randn(q.shape, generator=noise_generator, dtype=torch.float64) / math.sqrt(head_dim)
    k += noise * torch.randn(k.shape, generator=noise_generator, dtype=torch.float64) / math.sqrt(head_dim)
    v = torch.randn(q.shape, generator=noise_generator, dtype=torch.float64)
    return tuple(x.to(device=device, dtype=dtype) for x in (scale * q, scale * k, v))


def pattern_token_mask(
    layout: TokenLayout,
    kind: str,
    query_index: torch.Tensor,
    *,
    shapes: PlantedShapes = PlantedShapes(),
    stripe_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which keys lie in ``kind``'s pattern for the given video queries: bool ``(..., Q, S)``.

    ``query_index`` holds sequence indices of video tokens ``(Q,)``.  Text keys
    are always in the pattern.  For ``vertical_stripe``, ``stripe_columns``
    ``(K,)`` or ``(H, K)`` gives the columns (see :func:`planted_stripe_columns`)
    and the result gains the leading ``H`` dim when it has one.
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; allowed: {', '.join(HEAD_KINDS)}")
    device = query_index.device
    grid = layout.grid
    query_offsets = query_index.to(torch.long) - layout.video_start
    if query_offsets.numel() and (int(query_offsets.min()) < 0 or int(query_offsets.max()) >= grid.num_tokens):
        raise ValueError(f"query_index must hold video tokens, i.e. lie in [{layout.video_start}, {layout.video_end})")
    is_text = layout.is_text(device)
    key_offsets = torch.arange(layout.seq_len, device=device) - layout.video_start
    delta = query_offsets[:, None] - key_offsets[None, :]  # (Q, S); meaningless on text keys, masked below
    tokens_per_frame = grid.tokens_per_frame
    if kind == "spatial":
        key_frames = torch.div(key_offsets, tokens_per_frame, rounding_mode="floor")
        frame_distance = ((query_offsets // tokens_per_frame)[:, None] - key_frames[None, :]).abs()
        near = frame_distance <= shapes.spatial_window_frames
    elif kind == "temporal":
        near = delta % tokens_per_frame == 0
    elif kind == "diagonal":
        near = delta.abs() <= shapes.diagonal_width_tokens
    elif kind == "multi_diagonal":
        wrapped = delta % tokens_per_frame
        near = torch.minimum(wrapped, tokens_per_frame - wrapped) <= shapes.multi_diagonal_width_tokens
    elif kind == "vertical_stripe":
        if stripe_columns is None:
            raise ValueError("pattern 'vertical_stripe' needs stripe_columns (see planted_stripe_columns)")
        columns = stripe_columns.to(device=device, dtype=torch.long)
        listed = torch.zeros(*columns.shape[:-1], layout.seq_len, dtype=torch.bool, device=device)
        listed.scatter_(-1, columns, True)
        return (listed | is_text)[..., None, :].expand(*columns.shape[:-1], query_index.numel(), layout.seq_len)
    else:  # dense
        near = torch.ones(query_index.numel(), layout.seq_len, dtype=torch.bool, device=device)
    return near | is_text[None, :]


def pattern_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    kind: Union[str, Sequence[str]],
    *,
    shapes: PlantedShapes = PlantedShapes(),
    stripe_columns: torch.Tensor | None = None,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Fraction of each head's attention mass, over video query rows, that lies in a pattern: ``(H,)`` float64.

    ``kind`` is one kind for every head or a list with one kind per head
    (e.g. the planted kinds, to measure each head against its own pattern).
    The softmax of ``q k^T / sqrt(D)`` is computed exactly, in float32, in
    chunks of query rows of about ``chunk_elements`` scores; the mass is
    averaged over batch and video query rows.  ``stripe_columns`` ``(H, K)``
    is needed where a head is measured as ``vertical_stripe``.
    """
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, H, S, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, num_heads, seq_len, head_dim = q.shape
    if seq_len != layout.seq_len:
        raise ValueError(f"q has {seq_len} tokens but the layout has {layout.seq_len} ({layout})")
    kinds = [kind] * num_heads if isinstance(kind, str) else list(kind)
    if len(kinds) != num_heads:
        raise ValueError(f"got {len(kinds)} kinds for {num_heads} heads; give one kind, or one per head")
    for name in set(kinds):
        if name not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {name!r}; allowed: {', '.join(HEAD_KINDS)}")
    if "vertical_stripe" in kinds:
        if stripe_columns is None or stripe_columns.ndim != 2 or stripe_columns.shape[0] != num_heads:
            seen = None if stripe_columns is None else tuple(stripe_columns.shape)
            raise ValueError(f"a vertical_stripe head needs stripe_columns of shape ({num_heads}, K), got {seen}")

    queries = torch.arange(layout.video_start, layout.video_end, device=q.device)
    rows_per_chunk = max(1, chunk_elements // (batch * num_heads * seq_len))
    keys = k.float()
    total = torch.zeros(num_heads, dtype=torch.float64, device=q.device)
    for start in range(0, queries.numel(), rows_per_chunk):
        rows = queries[start : start + rows_per_chunk]
        scores = q[:, :, rows].float() @ keys.transpose(-1, -2) / math.sqrt(head_dim)
        probs = scores.softmax(dim=-1)  # (B, H, rows, S)
        inside = torch.empty(num_heads, rows.numel(), seq_len, dtype=torch.bool, device=q.device)
        for name in set(kinds):
            heads = [h for h, head_kind in enumerate(kinds) if head_kind == name]
            columns = stripe_columns[heads] if name == "vertical_stripe" else None
            mask = pattern_token_mask(layout, name, rows, shapes=shapes, stripe_columns=columns)
            inside[heads] = mask
        total += (probs * inside).sum(dim=(0, 2, 3), dtype=torch.float64)
    return total / (batch * queries.numel())
