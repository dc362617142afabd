"""Block masks built from patterns agree with the token rule they lift."""

from __future__ import annotations

import pytest
import torch

from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.patterns import dense_block_mask, frame_band_block_mask
from vdit_sparse.plan import HeadPlan, run_plan


def masked_block_attention(q, k, v, block_mask, block_m, block_n, key_padding_mask=None):
    """The reference executor on a block mask."""
    plan = HeadPlan.from_block_mask(block_mask, block_m, block_n).for_heads(q.shape[1])
    return run_plan(q, k, v, plan, key_padding_mask, backend="reference")


def _lift_token_mask(token_mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Brute force: a block pair is kept when any token pair in it is kept."""
    s = token_mask.shape[0]
    nq, nk = -(-s // block_m), -(-s // block_n)
    padded = torch.zeros(nq * block_m, nk * block_n, dtype=torch.bool)
    padded[:s, :s] = token_mask
    return padded.view(nq, block_m, nk, block_n).any(dim=3).any(dim=1)


LAYOUTS = [
    TokenLayout(LatentGrid(5, 4, 6), 10, "prefix"),
    TokenLayout(LatentGrid(3, 3, 5), 7, "suffix"),
    TokenLayout(LatentGrid(4, 2, 2), 0, "prefix"),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"F{l.grid.frames}-T{l.text_length}-{l.text_position}")
@pytest.mark.parametrize("block_m, block_n", [(16, 16), (8, 32), (32, 8)])
@pytest.mark.parametrize("width", [0, 1, 3])
def test_frame_band_matches_token_rule(layout, block_m, block_n, width):
    frames = layout.token_frames()
    text = layout.is_text()
    token_mask = ((frames[:, None] - frames[None, :]).abs() <= width) | text[:, None] | text[None, :]
    expected = _lift_token_mask(token_mask, block_m, block_n)
    assert torch.equal(frame_band_block_mask(layout, block_m, block_n, width), expected)


def test_full_window_is_dense():
    layout = LAYOUTS[0]
    assert torch.equal(frame_band_block_mask(layout, 16, 16, layout.grid.frames), dense_block_mask(layout, 16, 16))


def test_reference_path_with_full_mask_equals_dense_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 77, 16).unbind(0)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    torch.testing.assert_close(masked_block_attention(q, k, v, mask, 16, 16), torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-6)


def test_reference_path_drops_masked_blocks_and_padding():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 8, 4).unbind(0)
    mask = torch.tensor([[True, False], [True, True]])[None, None]
    padding = torch.tensor([[True] * 6 + [False] * 2])
    out = masked_block_attention(q, k, v, mask, 4, 4, padding)
    # Rows 0-3 see keys 0-3 only; rows 4-7 see keys 0-5 (6 and 7 are padding).
    top = torch.nn.functional.scaled_dot_product_attention(q[..., :4, :], k[..., :4, :], v[..., :4, :])
    bottom = torch.nn.functional.scaled_dot_product_attention(q[..., 4:, :], k[..., :6, :], v[..., :6, :])
    torch.testing.assert_close(out, torch.cat([top, bottom], dim=-2))
