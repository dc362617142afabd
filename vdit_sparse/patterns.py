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

from .geometry import TokenLayout, num_blocks

__all__ = ["block_frame_ranges", "block_has_text", "frame_band_block_mask", "dense_block_mask"]


def _pad_to_blocks(values: torch.Tensor, block_size: int, fill: int | bool) -> torch.Tensor:
    n = num_blocks(values.numel(), block_size)
    padded = values.new_full((n * block_size,), fill)
    padded[: values.numel()] = values
    return padded.view(n, block_size)


def block_frame_ranges(layout: TokenLayout, block_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last latent frame of the video tokens in each block, shape ``(num_blocks,)``.

    A block with no video token gets the empty range ``(+big, -big)`` so it
    overlaps nothing.
    """
    frames = layout.token_frames(device)
    big = 1 << 30
    blocks = _pad_to_blocks(frames, block_size, -1)
    is_video = blocks >= 0
    first = torch.where(is_video, blocks, torch.full_like(blocks, big)).amin(dim=1)
    last = torch.where(is_video, blocks, torch.full_like(blocks, -big)).amax(dim=1)
    return first, last


def block_has_text(layout: TokenLayout, block_size: int, device=None) -> torch.Tensor:
    """True for each block that holds at least one text token, shape ``(num_blocks,)``."""
    return _pad_to_blocks(layout.is_text(device), block_size, False).any(dim=1)


def dense_block_mask(layout: TokenLayout, block_m: int, block_n: int, device=None) -> torch.Tensor:
    """Every block pair kept: the mask whose sparse attention equals dense attention."""
    shape = (num_blocks(layout.seq_len, block_m), num_blocks(layout.seq_len, block_n))
    return torch.ones(shape, dtype=torch.bool, device=device)


def frame_band_block_mask(
    layout: TokenLayout, block_m: int, block_n: int, width_frames: int, device=None
) -> torch.Tensor:
    """Each video token attends to video tokens within ``width_frames`` latent frames, plus all text.

    Token rule: keep ``(i, j)`` when ``|frame(i) - frame(j)| <= width_frames``
    or either token is text.  ``width_frames >= frames - 1`` gives the dense mask.
    """
    if width_frames < 0:
        raise ValueError(f"width_frames must be >= 0, got {width_frames}")
    q_first, q_last = block_frame_ranges(layout, block_m, device)
    k_first, k_last = block_frame_ranges(layout, block_n, device)
    q_text = block_has_text(layout, block_m, device)
    k_text = block_has_text(layout, block_n, device)
    # Frame ranges [a0, a1] and [b0, b1] hold a pair within w frames iff b0 <= a1 + w and b1 >= a0 - w.
    near = (k_first[None, :] <= q_last[:, None] + width_frames) & (k_last[None, :] >= q_first[:, None] - width_frames)
    return near | q_text[:, None] | k_text[None, :]
