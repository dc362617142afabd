"""Attention patterns as block masks over the joined text + video sequence.

A block mask is a boolean tensor ``(num_q_blocks, num_kv_blocks)`` (or with
leading batch/head dims): entry ``[i, j]`` is True when query block ``i``
computes against key block ``j``.  Query blocks are ``block_m`` consecutive
tokens of the whole sequence, text included, key blocks ``block_n``; the last
block of each may be partial.

Patterns are defined on tokens and then lifted to blocks conservatively: a
block pair is kept when *any* token pair in it is kept.  Text rows and text
columns are always kept, so a block holding a text token is dense in its row
and its column.  Everything here is vectorised over blocks; nothing builds an
``S x S`` token mask.
"""

from __future__ import annotations

import torch

from .geometry import POSITION_MAJOR, TokenLayout, num_blocks

__all__ = [
    "block_frame_ranges",
    "block_has_text",
    "frame_band_block_mask",
    "dense_block_mask",
    "diagonal_band_block_mask",
    "frame_to_position_permutation",
    "temporal_band_block_mask",
    "vertical_stripe_block_mask",
]


def _pad_to_blocks(values: torch.Tensor, block_size: int, fill: int | bool) -> torch.Tensor:
    n = num_blocks(values.numel(), block_size)
    padded = values.new_full((n * block_size,), fill)
    padded[: values.numel()] = values
    return padded.view(n, block_size)


def _block_ranges(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest non-negative value in each block of ``values`` ``(S,)`` (text is -1).

    A block with no video token gets the empty range ``(+big, -big)`` so it
    overlaps nothing.
    """
    big = 1 << 40
    blocks = _pad_to_blocks(values, block_size, -1)
    is_video = blocks >= 0
    first = torch.where(is_video, blocks, torch.full_like(blocks, big)).amin(dim=1)
    last = torch.where(is_video, blocks, torch.full_like(blocks, -big)).amax(dim=1)
    return first, last


def block_frame_ranges(layout: TokenLayout, block_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last latent frame of the video tokens in each block, shape ``(num_blocks,)``."""
    return _block_ranges(layout.token_frames(device), block_size)


def block_has_text(layout: TokenLayout, block_size: int, device=None) -> torch.Tensor:
    """True for each block that holds at least one text token, shape ``(num_blocks,)``."""
    return _pad_to_blocks(layout.is_text(device), block_size, False).any(dim=1)


def dense_block_mask(layout: TokenLayout, block_m: int, block_n: int, device=None) -> torch.Tensor:
    """Every block pair kept: the mask whose sparse attention equals dense attention."""
    shape = (num_blocks(layout.seq_len, block_m), num_blocks(layout.seq_len, block_n))
    return torch.ones(shape, dtype=torch.bool, device=device)


def _band_block_mask(
    layout: TokenLayout, values: torch.Tensor, block_m: int, block_n: int, width: int
) -> torch.Tensor:
    """Keep video pairs with ``|values[i] - values[j]| <= width`` and every text row and column, lifted to blocks.

    Within a block the video tokens are contiguous, so its values span exactly
    ``[first, last]``, and ranges ``[a0, a1]`` and ``[b0, b1]`` hold a pair
    within ``width`` iff ``b0 <= a1 + width`` and ``b1 >= a0 - width``.
    """
    q_first, q_last = _block_ranges(values, block_m)
    k_first, k_last = _block_ranges(values, block_n)
    near = (k_first[None, :] <= q_last[:, None] + width) & (k_last[None, :] >= q_first[:, None] - width)
    q_text = block_has_text(layout, block_m, values.device)
    k_text = block_has_text(layout, block_n, values.device)
    return near | q_text[:, None] | k_text[None, :]


def _video_offsets(layout: TokenLayout, device=None) -> torch.Tensor:
    """Each token's offset within the video span, ``-1`` for text. Shape ``(S,)``."""
    offsets = torch.full((layout.seq_len,), -1, dtype=torch.long, device=device)
    offsets[layout.video_start : layout.video_end] = torch.arange(layout.grid.num_tokens, device=device)
    return offsets


def frame_band_block_mask(
    layout: TokenLayout, block_m: int, block_n: int, width_frames: int, device=None
) -> torch.Tensor:
    """Each video token attends to video tokens within ``width_frames`` latent frames, plus all text.

    Token rule: keep ``(i, j)`` when ``|frame(i) - frame(j)| <= width_frames``
    or either token is text.  ``width_frames >= frames - 1`` gives the dense mask.
    """
    if width_frames < 0:
        raise ValueError(f"width_frames must be >= 0, got {width_frames}")
    return _band_block_mask(layout, layout.token_frames(device), block_m, block_n, width_frames)


def diagonal_band_block_mask(
    layout: TokenLayout, block_size: int, width_tokens: int, *, kv_block_size: int | None = None, device=None
) -> torch.Tensor:
    """Each video token attends to video tokens at most ``width_tokens`` positions away, plus all text.

    Token rule: keep ``(i, j)`` when both are video and ``|i - j| <= width_tokens``
    (frame-major order), or either is text.  Query blocks have ``block_size``
    tokens, key blocks ``kv_block_size`` (default the same); the result is
    ``(num_q_blocks, num_kv_blocks)``.
    """
    if width_tokens < 0:
        raise ValueError(f"width_tokens must be >= 0, got {width_tokens}")
    return _band_block_mask(layout, _video_offsets(layout, device), block_size, kv_block_size or block_size, width_tokens)


def frame_to_position_permutation(layout: TokenLayout, device=None) -> torch.Tensor:
    """Token order with the video span transposed from frame-major to position-major, shape ``(S,)``.

    ``x[..., perm, :]`` puts video token (frame ``f``, spatial position ``p``)
    at video offset ``p * frames + f``; text tokens keep their places.  So the
    frames of one spatial position become neighbours.  Derived once per layout
    and device (:meth:`TokenLayout.order`); read-only.
    """
    return layout.order(POSITION_MAJOR, device)


def temporal_band_block_mask(
    layout: TokenLayout, block_size: int, width_frames: int, *, kv_block_size: int | None = None, device=None
) -> torch.Tensor:
    """Same spatial position within ``width_frames`` frames, plus all text, on position-major tokens.

    The mask indexes blocks of the sequence AFTER
    :func:`frame_to_position_permutation` (queries and keys both permuted).
    Token rule: keep ``(i, j)`` when both are video at the same spatial
    position with ``|frame(i) - frame(j)| <= width_frames``, or either is text.
    It is lifted through the band ``|i' - j'| <= width_frames`` of permuted
    offsets, which holds every kept pair (a superset only where a block spans
    two positions).
    """
    if width_frames < 0:
        raise ValueError(f"width_frames must be >= 0, got {width_frames}")
    return _band_block_mask(layout, _video_offsets(layout, device), block_size, kv_block_size or block_size, width_frames)


def vertical_stripe_block_mask(
    layout: TokenLayout,
    block_size: int,
    key_columns: torch.Tensor,
    *,
    kv_block_size: int | None = None,
    device=None,
) -> torch.Tensor:
    """Every query attends to the given key tokens (global sequence indices), plus all text.

    ``key_columns`` is an integer tensor ``(..., K)``: leading dims (e.g. heads)
    give one stripe set each, and the result is ``(..., num_q_blocks,
    num_kv_blocks)``.  Token rule: keep ``(i, j)`` when ``j`` is listed or
    either token is text.  A key block holding a listed column is kept for
    every query block.
    """
    if key_columns.dtype in (torch.bool,) or key_columns.is_floating_point():
        raise ValueError(f"key_columns must be an integer tensor of token indices, got {key_columns.dtype}")
    if key_columns.numel() and (int(key_columns.min()) < 0 or int(key_columns.max()) >= layout.seq_len):
        raise ValueError(f"key_columns must lie in [0, {layout.seq_len}) (the sequence), got values outside it")
    kv_block_size = kv_block_size or block_size
    device = key_columns.device if device is None else device
    num_q = num_blocks(layout.seq_len, block_size)
    num_kv = num_blocks(layout.seq_len, kv_block_size)
    key_columns = key_columns.to(device=device, dtype=torch.long)
    stripes = torch.zeros(*key_columns.shape[:-1], num_kv, dtype=torch.bool, device=device)
    stripes.scatter_(-1, key_columns // kv_block_size, True)
    stripes = stripes | block_has_text(layout, kv_block_size, device)
    q_text = block_has_text(layout, block_size, device)
    return stripes[..., None, :].expand(*stripes.shape[:-1], num_q, num_kv) | q_text[:, None]
