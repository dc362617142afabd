"""The planted-attention generator: the structure it promises is really in softmax(q k^T / sqrt(D))."""

from __future__ import annotations

import pytest
import torch

from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.synthetic import HEAD_KINDS, pattern_mass, pattern_token_mask, planted_qkv, planted_stripe_columns

KINDS = list(HEAD_KINDS)
LAYOUTS = {
    "F5-8x8-prefix16": TokenLayout(LatentGrid(5, 8, 8), text_length=16, text_position="prefix"),
    "F4-6x10-suffix12": TokenLayout(LatentGrid(4, 6, 10), text_length=12, text_position="suffix"),
}


def _excess_over_chance(q, k, layout, kinds, stripes) -> torch.Tensor:
    """(mass - chance) / (1 - chance) per head; chance is the mass of uniform attention (q = 0).

    1 means all mass in the pattern, 0 no more than a head that looks nowhere in particular.
    """
    mass = pattern_mass(q, k, layout, kinds, stripe_columns=stripes)
    chance = pattern_mass(torch.zeros_like(q), k, layout, kinds, stripe_columns=stripes)
    return (mass - chance) / (1 - chance).clamp_min(1e-9)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_low_noise_puts_90_percent_of_each_heads_mass_in_its_pattern(layout):
    q, k, _ = planted_qkv(layout, KINDS, batch=2, noise=0.1, seed=0)
    stripes = planted_stripe_columns(layout, len(KINDS), seed=0)
    mass = pattern_mass(q, k, layout, KINDS, stripe_columns=stripes)
    for kind, value in zip(KINDS, mass.tolist()):
        assert value >= 0.9, f"{kind} head: only {value:.3f} of its mass lies in its planted pattern"


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_noise_dissolves_the_structure(layout):
    stripes = planted_stripe_columns(layout, len(KINDS), seed=0)
    structured = [h for h, kind in enumerate(KINDS) if kind != "dense"]
    excess = []
    for noise in (0.1, 2.0, 8.0):
        q, k, _ = planted_qkv(layout, KINDS, noise=noise, seed=0)
        excess.append(_excess_over_chance(q, k, layout, KINDS, stripes)[structured])
    low, mid, high = excess
    assert (low > mid).all() and (mid > high).all(), f"excess over chance not falling with noise: {excess}"
    assert (high < 0.25).all(), f"at noise 8 the planted patterns should be near chance, got excess {high.tolist()}"


def test_dense_heads_are_unstructured():
    layout = LAYOUTS["F5-8x8-prefix16"]
    q, k, _ = planted_qkv(layout, ["dense"] * 4, noise=0.1, seed=0)
    stripes = planted_stripe_columns(layout, 4, seed=0)
    for kind in KINDS[:-1]:  # the dense pattern is every key: chance is 1, nothing to lean towards
        excess = _excess_over_chance(q, k, layout, [kind] * 4, stripes)
        assert excess.abs().max() < 0.05, f"a dense head leans towards the {kind} pattern: excess {excess.tolist()}"


def test_stripe_heads_attend_to_their_planted_columns():
    layout = LAYOUTS["F5-8x8-prefix16"]
    q, k, _ = planted_qkv(layout, ["vertical_stripe"] * 3, noise=0.1, seed=4)
    stripes = planted_stripe_columns(layout, 3, seed=4)
    probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)[0, :, layout.video_start : layout.video_end]
    top = probs.sum(dim=1).topk(stripes.shape[1]).indices.sort().values
    assert torch.equal(top, stripes)
    assert len({tuple(row) for row in stripes.tolist()}) == 3, "each head should get its own columns"


def test_deterministic_by_seed():
    layout = LAYOUTS["F4-6x10-suffix12"]
    first = planted_qkv(layout, KINDS, batch=2, seed=3)
    again = planted_qkv(layout, KINDS, batch=2, seed=3)
    other = planted_qkv(layout, KINDS, batch=2, seed=4)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    # a head's codes are its own: changing head 0's kind leaves head 1 alone
    swapped = planted_qkv(layout, ["dense", *KINDS[1:]], batch=2, seed=3)
    assert torch.equal(swapped[0][:, 1:], first[0][:, 1:]) and torch.equal(swapped[1][:, 1:], first[1][:, 1:])
    assert not torch.equal(swapped[0][:, 0], first[0][:, 0])


def test_shapes_dtype_and_text_placement():
    layout = LAYOUTS["F4-6x10-suffix12"]
    q, k, v = planted_qkv(layout, ["spatial", "temporal"], batch=3, head_dim=32, dtype=torch.bfloat16)
    assert q.shape == k.shape == v.shape == (3, 2, layout.seq_len, 32)
    assert q.dtype == torch.bfloat16
    rows = torch.arange(layout.video_start, layout.video_end)
    temporal = pattern_token_mask(layout, "temporal", rows)
    assert temporal[:, layout.text_start : layout.text_end].all(), "text keys belong to every pattern"
    # the first video token's temporal partners: the same position in each of the 4 frames, plus the 12 text keys
    assert int(temporal[0].sum()) == 4 + 12


def test_refuses_bad_arguments():
    layout = LAYOUTS["F5-8x8-prefix16"]
    with pytest.raises(ValueError, match="unknown head kinds"):
        planted_qkv(layout, ["spatial", "sideways"])
    with pytest.raises(TypeError, match="one per head"):
        planted_qkv(layout, "spatial")
    q, k, _ = planted_qkv(layout, ["vertical_stripe"])
    with pytest.raises(ValueError, match="stripe_columns"):
        pattern_mass(q, k, layout, "vertical_stripe")
