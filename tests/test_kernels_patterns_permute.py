"""Block-mask builders against brute-force token masks, and the token-permutation kernel.

The permutation kernel runs in the Triton interpreter when there is no GPU
(see tests/test_kernels.py for why TRITON_INTERPRET is set before import).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.kernels.permute import frame_to_position, permute_tokens, position_to_frame
from vdit_sparse.kernels.reference import permute_tokens_reference
from vdit_sparse.patterns import (
    diagonal_band_block_mask,
    frame_to_position_permutation,
    temporal_band_block_mask,
    vertical_stripe_block_mask,
)

from vdit_sparse.kernels._triton_runtime import interpreter_active

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Tests that launch a Triton kernel; the rest (references, indices, patterns) always run.
launches_kernel = pytest.mark.skipif(
    DEVICE.type == "cpu" and not interpreter_active(),
    reason="triton was imported before TRITON_INTERPRET=1 was set: export TRITON_INTERPRET=1 to run kernel tests on CPU",
)

LAYOUTS = {
    "prefix": TokenLayout(LatentGrid(frames=4, height=3, width=5), text_length=7, text_position="prefix"),
    "suffix": TokenLayout(LatentGrid(frames=5, height=2, width=3), text_length=11, text_position="suffix"),
}


def lift(token_mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Block pair kept when any token pair in it is kept (brute force)."""
    s = token_mask.shape[-1]
    nq, nk = -(-s // block_m), -(-s // block_n)
    padded = torch.zeros(nq * block_m, nk * block_n, dtype=torch.bool)
    padded[:s, :s] = token_mask
    return padded.view(nq, block_m, nk, block_n).any(dim=3).any(dim=1)


def text_dense(layout: TokenLayout, token_mask: torch.Tensor) -> torch.Tensor:
    text = layout.is_text()
    return token_mask | text[:, None] | text[None, :]


def video_offsets(layout: TokenLayout) -> torch.Tensor:
    offsets = torch.full((layout.seq_len,), -1)
    offsets[layout.video_start : layout.video_end] = torch.arange(layout.grid.num_tokens)
    return offsets


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("width", [0, 3, 17])
@pytest.mark.parametrize("block_m,block_n", [(8, 8), (8, 16), (16, 4)])
def test_diagonal_band_matches_token_rule(layout_name, width, block_m, block_n):
    layout = LAYOUTS[layout_name]
    offsets = video_offsets(layout)
    video = offsets >= 0
    near = (offsets[:, None] - offsets[None, :]).abs() <= width
    tokens = text_dense(layout, near & video[:, None] & video[None, :])
    got = diagonal_band_block_mask(layout, block_m, width, kv_block_size=block_n)
    assert torch.equal(got, lift(tokens, block_m, block_n))


def test_frame_to_position_permutation_by_loop():
    for layout in LAYOUTS.values():
        perm = frame_to_position_permutation(layout)
        grid = layout.grid
        expected = list(range(layout.seq_len))
        for p in range(grid.tokens_per_frame):
            for f in range(grid.frames):
                expected[layout.video_start + p * grid.frames + f] = layout.video_start + f * grid.tokens_per_frame + p
        assert perm.tolist() == expected
        assert torch.equal(torch.sort(perm).values, torch.arange(layout.seq_len))


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("width", [0, 1, 2])
def test_temporal_band_covers_same_position_rule(layout_name, width):
    layout = LAYOUTS[layout_name]
    grid = layout.grid
    perm = frame_to_position_permutation(layout)
    frames, video = layout.token_frames(), ~layout.is_text()
    position = torch.where(video, (torch.arange(layout.seq_len) - layout.video_start) % grid.tokens_per_frame, -1)
    # The token rule in frame-major order, then viewed in permuted order.
    rule = (position[:, None] == position[None, :]) & ((frames[:, None] - frames[None, :]).abs() <= width)
    rule = text_dense(layout, rule & video[:, None] & video[None, :])[perm][:, perm]
    got = temporal_band_block_mask(layout, 8, width, kv_block_size=16)
    exact = lift(rule, 8, 16)
    assert torch.all(got >= exact), "every kept token pair must be in a kept block"
    offsets = video_offsets(layout)  # after the permutation the video span is still contiguous
    band = (offsets[:, None] - offsets[None, :]).abs() <= width
    band = text_dense(layout, band & video[:, None] & video[None, :])
    assert torch.equal(got, lift(band, 8, 16))


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_vertical_stripes_match_token_rule(layout_name):
    layout = LAYOUTS[layout_name]
    columns = torch.tensor([[layout.video_start + 3, layout.video_end - 1], [layout.video_start + 20, layout.video_start + 21]])
    got = vertical_stripe_block_mask(layout, 8, columns, kv_block_size=4)
    assert got.shape == (2, -(-layout.seq_len // 8), -(-layout.seq_len // 4))
    for head in range(2):
        tokens = torch.zeros(layout.seq_len, layout.seq_len, dtype=torch.bool)
        tokens[:, columns[head]] = True
        assert torch.equal(got[head], lift(text_dense(layout, tokens), 8, 4))
    with pytest.raises(ValueError, match="key_columns must lie in"):
        vertical_stripe_block_mask(layout, 8, torch.tensor([layout.seq_len]))


def _x(B=2, H=3, S=67, D=32, dtype=torch.float32, seed=0):
    return torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@launches_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared-perm", "per-head-perm"])
@pytest.mark.parametrize("inverse", [False, True], ids=["gather", "scatter"])
def test_permute_tokens_matches_reference(dtype, per_head, inverse):
    x = _x(dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(67, generator=gen) for _ in range(3)]) if per_head else torch.randperm(67, generator=gen)
    perm = perm.to(DEVICE)
    heads = torch.tensor([True, False, True], device=DEVICE)
    per_batch = torch.tensor([[True, False, True], [False, False, True]], device=DEVICE)
    for head_mask in (None, heads, per_batch):
        got = permute_tokens(x, perm, inverse, heads=head_mask)
        assert got.is_contiguous()
        assert torch.equal(got, permute_tokens_reference(x, perm, inverse, head_mask))
        if head_mask is not None:
            assert torch.equal(got[:, 1], x[:, 1])
        if head_mask is per_batch:  # head 0 moves in batch entry 0 only
            assert torch.equal(got[1, 0], x[1, 0]) and not torch.equal(got[0, 0], x[0, 0])
        assert torch.equal(permute_tokens(got, perm, not inverse, heads=head_mask), x)


@launches_kernel
def test_frame_position_round_trip_keeps_text_and_accepts_views():
    layout = LAYOUTS["suffix"]
    x = _x(S=layout.seq_len, D=64).transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    assert not x.is_contiguous()
    y = frame_to_position(x, layout)
    assert torch.equal(y[:, :, layout.text_start : layout.text_end], x[:, :, layout.text_start : layout.text_end])
    grid = layout.grid
    # Video token (frame 1, position 2) lands at position-major offset 2 * frames + 1.
    assert torch.equal(y[:, :, layout.video_start + 2 * grid.frames + 1], x[:, :, layout.video_start + grid.tokens_per_frame + 2])
    assert torch.equal(position_to_frame(y, layout), x)


@pytest.mark.parametrize(
    "perm,heads,match",
    [
        (torch.arange(10), None, r"perm must have shape \(S,\) = \(67,\) or \(H, S\) = \(3, 67\), got \(10,\)"),
        (torch.arange(67).float(), None, r"perm must be an int32/int64 tensor, got torch\.float32"),
        (torch.arange(67), torch.ones(2, dtype=torch.bool), r"heads must be a bool tensor of shape \(H,\) = \(3,\) or \(B, H\)"),
    ],
    ids=["perm-shape", "perm-dtype", "heads-shape"],
)
def test_permute_tokens_bad_arguments(perm, heads, match):
    with pytest.raises(ValueError, match=match):
        permute_tokens(_x(), perm.to(DEVICE), heads=None if heads is None else heads.to(DEVICE))


def test_a_layout_derives_each_token_order_once():
    """Every layer of every forward at one layout gets the same permutation tensor, built once."""
    from vdit_sparse.geometry import POSITION_MAJOR

    layout = TokenLayout(LatentGrid(3, 2, 4), 5, "suffix")
    first = layout.order(POSITION_MAJOR)
    assert layout.order(POSITION_MAJOR) is first
    assert TokenLayout(LatentGrid(3, 2, 4), 5, "suffix").order(POSITION_MAJOR) is first  # an equal layout, another forward
    assert torch.equal(first[-5:], torch.arange(24, 29))  # text keeps its place
    assert torch.equal(first[:3], torch.tensor([0, 8, 16]))  # position 0 of frames 0, 1, 2
