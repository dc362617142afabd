"""Where each token of a video DiT's attention sequence sits.

A video DiT attends over one sequence that joins text tokens and video tokens.
The video tokens are frame-major: token ``f * (H * W) + h * W + w`` of the video
part is latent frame ``f``, row ``h``, column ``w`` (after patchification).
The text sits either before the video (CogVideoX: a prefix) or after it
(HunyuanVideo: a suffix).  Methods and kernels read positions from a
:class:`TokenLayout` and never hard-code a model's numbers.

Dimension letters used across the package: ``B`` batch, ``H`` heads, ``S``
sequence (text + video), ``D`` head dim, ``F`` latent frames.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["LatentGrid", "TokenLayout", "TokenOrder", "PositionMajor", "POSITION_MAJOR", "Voxels", "num_blocks"]


@dataclass(frozen=True)
class LatentGrid:
    """The video tokens' grid after patchification: frames x height x width."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LatentGrid.{name} must be a positive int, got {value!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclass(frozen=True)
class TokenLayout:
    """The attention sequence of one call: a text span and a frame-major video span.

    ``text_position`` is ``"prefix"`` when text comes first (CogVideoX) and
    ``"suffix"`` when it comes last (HunyuanVideo).  ``text_length`` counts the
    text tokens present in the sequence, padded ones included; padding is
    described separately by a key-padding mask.
    """

    grid: LatentGrid
    text_length: int
    text_position: Literal["prefix", "suffix"]

    def __post_init__(self) -> None:
        if self.text_position not in ("prefix", "suffix"):
            raise ValueError(f"text_position must be 'prefix' or 'suffix', got {self.text_position!r}")
        if self.text_length < 0:
            raise ValueError(f"text_length must be >= 0, got {self.text_length}")

    @property
    def seq_len(self) -> int:
        return self.grid.num_tokens + self.text_length

    @property
    def video_start(self) -> int:
        return self.text_length if self.text_position == "prefix" else 0

    @property
    def video_end(self) -> int:
        return self.video_start + self.grid.num_tokens

    @property
    def text_start(self) -> int:
        return 0 if self.text_position == "prefix" else self.grid.num_tokens

    @property
    def text_end(self) -> int:
        return self.text_start + self.text_length

    def token_frames(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Latent frame of every token in the sequence, ``-1`` for text. Shape ``(S,)``, int64."""
        frames = torch.full((self.seq_len,), -1, dtype=torch.long, device=device)
        video = torch.arange(self.grid.num_tokens, device=device) // self.grid.tokens_per_frame
        frames[self.video_start : self.video_end] = video
        return frames

    def order(self, order: TokenOrder, device: torch.device | str | None = None) -> torch.Tensor:
        """The permutation that puts this sequence in ``order``, derived once per layout, order and device.

        Every layer of every forward at this layout gets the same tensor: treat it as read-only.
        """
        return _order_permutation(self, order, str(torch.device(device if device is not None else "cpu")))

    def is_text(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean ``(S,)``: True where the token is text."""
        flags = torch.zeros(self.seq_len, dtype=torch.bool, device=device)
        flags[self.text_start : self.text_end] = True
        return flags


class TokenOrder:
    """An order of the attention sequence that some heads attend in (text tokens keep their places).

    Subclasses are frozen dataclasses (hashable: a layout caches each order's
    permutation) and implement :meth:`permutation`.
    """

    def permutation(self, layout: "TokenLayout") -> torch.Tensor:
        """int64 ``(S,)`` on the CPU: position ``i`` of the ordered sequence holds token ``perm[i]``."""
        raise NotImplementedError


@dataclass(frozen=True)
class PositionMajor(TokenOrder):
    """The video span transposed from frame-major to position-major: the frames of one position are neighbours.

    Video token (frame ``f``, spatial position ``p``) goes to video offset
    ``p * frames + f`` (Sparse VideoGen's layout transformation).
    """

    def permutation(self, layout):
        grid = layout.grid
        perm = torch.arange(layout.seq_len, dtype=torch.long)
        new_offset = torch.arange(grid.num_tokens)
        position, frame = new_offset // grid.frames, new_offset % grid.frames
        perm[layout.video_start : layout.video_end] = layout.video_start + frame * grid.tokens_per_frame + position
        return perm


POSITION_MAJOR = PositionMajor()


@dataclass(frozen=True)
class Voxels(TokenOrder):
    """The video span in voxels of ``frames x height x width`` tokens: neighbours in space and time are neighbours.

    Whole voxels come first, in frame-major voxel order, each holding its
    tokens in frame-major order, so every run of ``voxel_size`` tokens from
    the start of the video is one voxel (Chipmunk's query groups).  The
    tokens of the partial voxels at the edges of a grid the voxel does not
    divide follow, in frame-major order.  Text keeps its place.
    """

    frames: int = 4
    height: int = 6
    width: int = 8

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Voxels.{name} must be a positive int, got {value!r}")

    @property
    def voxel_size(self) -> int:
        return self.frames * self.height * self.width

    def whole_voxel_tokens(self, grid: LatentGrid) -> int:
        """How many video tokens lie in whole voxels (the rest follow them)."""
        return (grid.frames // self.frames) * (grid.height // self.height) * (grid.width // self.width) * self.voxel_size

    def permutation(self, layout):
        grid = layout.grid
        offsets = torch.arange(grid.num_tokens).view(grid.frames, grid.height, grid.width)
        ft, fh, fw = grid.frames // self.frames, grid.height // self.height, grid.width // self.width
        inner = offsets[: ft * self.frames, : fh * self.height, : fw * self.width]
        whole = inner.reshape(ft, self.frames, fh, self.height, fw, self.width).permute(0, 2, 4, 1, 3, 5).reshape(-1)
        in_whole = torch.zeros(grid.num_tokens, dtype=torch.bool)
        in_whole[whole] = True
        video = torch.cat([whole, offsets.reshape(-1)[~in_whole]])
        perm = torch.arange(layout.seq_len, dtype=torch.long)
        perm[layout.video_start : layout.video_end] = layout.video_start + video
        return perm


@functools.lru_cache(maxsize=128)
def _order_permutation(layout: "TokenLayout", order: TokenOrder, device: str) -> torch.Tensor:
    return order.permutation(layout).to(device)


def num_blocks(length: int, block_size: int) -> int:
    """Blocks of ``block_size`` needed to cover ``length`` tokens (the last one may be partial)."""
    return -(-length // block_size)
