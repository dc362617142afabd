"""Chipmunk's building blocks: the voxel token order and the column-sparse attention kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_kernels import DEVICE, assert_attention_close, launches_kernel
from vdit_sparse.geometry import LatentGrid, TokenLayout, Voxels
from vdit_sparse.kernels.column_sparse_attention import column_sparse_attention
from vdit_sparse.kernels.reference import column_sparse_attention_reference, gather_rows_reference


@pytest.mark.parametrize("grid", [LatentGrid(8, 12, 16), LatentGrid(5, 7, 9), LatentGrid(3, 4, 5), LatentGrid(1, 1, 1),
                                  LatentGrid(13, 30, 45)])
@pytest.mark.parametrize("text_position", ["prefix", "suffix"])
def test_voxel_order_then_restore_is_the_identity(grid, text_position):
    layout = TokenLayout(grid, 7, text_position)
    voxels = Voxels(4, 6, 8)
    perm = layout.order(voxels)
    assert sorted(perm.tolist()) == list(range(layout.seq_len))  # a permutation
    assert torch.equal(perm[layout.text_start : layout.text_end], torch.arange(layout.text_start, layout.text_end))
    x = torch.randn(1, 2, layout.seq_len, 4)
    rows = perm.to(torch.int32).view(1, 1, -1)
    assert torch.equal(gather_rows_reference(gather_rows_reference(x, rows), rows, scatter=True), x)
    # every run of voxel_size tokens from the video's start is one whole voxel, up to the whole voxels' end
    video = perm[layout.video_start : layout.video_end] - layout.video_start
    frame, rest = video // grid.tokens_per_frame, video % grid.tokens_per_frame
    row, column = rest // grid.width, rest % grid.width
    whole = voxels.whole_voxel_tokens(grid)
    for start in range(0, whole, voxels.voxel_size):
        part = slice(start, start + voxels.voxel_size)
        for coordinate, size in ((frame, 4), (row, 6), (column, 8)):
            assert coordinate[part].max() - coordinate[part].min() == size - 1
            assert coordinate[part].min() % size == 0


def random_columns(batch, heads, seq_len, group_size, fraction, gen):
    groups = -(-seq_len // group_size)
    longest = max(1, int(fraction * seq_len))
    scores = torch.rand(batch, heads, groups, seq_len, generator=gen)
    columns = scores.argsort(dim=-1)[..., :longest].to(torch.int32)
    counts = torch.randint(1, longest + 1, (batch, heads, groups), generator=gen, dtype=torch.int32)
    if groups > 1:
        counts[..., 1] = 0  # one group with no key
    return columns.contiguous(), counts.contiguous()


CASES = [  # B, H, S, D, group size, block_m, fraction of keys, dtype, shared lists, padding
    (1, 2, 200, 32, 64, 32, 0.3, torch.float32, True, False),
    (2, 2, 150, 64, 64, 64, 0.1, torch.bfloat16, False, True),
    (2, 1, 257, 16, 128, 64, 0.5, torch.float16, False, False),
    (1, 3, 96, 128, 32, 16, 1.0, torch.float32, True, True),
]


@launches_kernel
@pytest.mark.parametrize("batch, heads, seq_len, head_dim, group, block_m, fraction, dtype, shared, padding", CASES)
def test_column_sparse_kernel_matches_its_reference(batch, heads, seq_len, head_dim, group, block_m, fraction, dtype,
                                                   shared, padding):
    gen = torch.Generator().manual_seed(seq_len)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    columns, counts = random_columns(1 if shared else batch, heads, seq_len, group, fraction, gen)
    columns, counts = columns.to(DEVICE), counts.to(DEVICE)
    mask = None
    if padding:
        mask = torch.ones(batch, seq_len, dtype=torch.bool, device=DEVICE)
        mask[-1, -7:] = False
    args = dict(group_size=group, key_padding_mask=mask)
    out, lse = column_sparse_attention(q, k, v, columns, counts, block_m=block_m, block_n=32, return_lse=True, **args)
    ref, ref_lse = column_sparse_attention_reference(q, k, v, columns, counts, return_lse=True, **args)
    # plain PyTorch in the inputs' dtype, probabilities rounded to it (the lse path; no fused SDPA)
    plain, _ = column_sparse_attention_reference(q, k, v, columns, counts, upcast=False, return_lse=True, **args)
    assert_attention_close(out, plain, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-4)
    if seq_len > group:
        assert out[:, :, group : 2 * group].abs().max() == 0  # the group with no key


@launches_kernel
def test_every_column_listed_is_dense_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 160, 32, generator=gen, device="cpu").to(DEVICE) for _ in range(3))
    groups = 160 // 32
    columns = torch.randperm(160, generator=gen).to(torch.int32).expand(1, 2, groups, 160).contiguous().to(DEVICE)
    counts = torch.full((1, 2, groups), 160, dtype=torch.int32, device=DEVICE)
    out = column_sparse_attention(q, k, v, columns, counts, group_size=32, block_m=32)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5


def test_column_sparse_inputs_are_checked():
    q = torch.zeros(1, 2, 100, 32)
    columns, counts = torch.zeros(1, 2, 2, 4, dtype=torch.int32), torch.zeros(1, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of block_m"):
        column_sparse_attention(q, q, q, columns, counts, group_size=48)
    with pytest.raises(ValueError, match=r"columns must be \(1 or 1, 2, 1, K\)"):
        column_sparse_attention(q, q, q, columns, counts, group_size=128)
    with pytest.raises(ValueError, match="int32"):
        column_sparse_attention(q, q, q, columns.long(), counts, group_size=64)
