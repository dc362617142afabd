"""Block-sparse attention kernel against its PyTorch reference.

Without a GPU the kernels run in the Triton interpreter.  Triton reads
TRITON_INTERPRET when its ``@triton.jit`` decorators run, its own
``triton.language`` helpers included, i.e. when triton is first imported.  It
is set here before that; if another test module imported triton first, the
tests that launch a kernel are skipped with a reason (run the suite with
``TRITON_INTERPRET=1`` exported, as scripts/test.sh should).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import random

import pytest

from vdit_sparse.kernels.block_sparse_attention import _forward, block_sparse_attention, default_block_sizes
from vdit_sparse.kernels.indices import block_density, block_mask_to_indices
from vdit_sparse.kernels.reference import block_sparse_attention_reference, indices_to_block_mask

from vdit_sparse.kernels._triton_runtime import interpreter_active

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Tests that launch a Triton kernel; the rest (references, indices, patterns) always run.
launches_kernel = pytest.mark.skipif(
    DEVICE.type == "cpu" and not interpreter_active(),
    reason="triton was imported before TRITON_INTERPRET=1 was set: export TRITON_INTERPRET=1 to run kernel tests on CPU",
)


def assert_attention_close(out, out_plain, ref, *, slack=None, what="out"):
    """Flash-attention tolerance rule: the kernel's error against the high-precision
    reference is at most 2x (max) / 1.5x (mean) the error of plain PyTorch run in the
    inputs' precision, plus a tiny absolute slack for exact-ish cases."""
    if slack is None:
        slack = 1e-5 if out.dtype == torch.float32 else 2e-4
    ref = ref.double()
    err = (out.double() - ref).abs()
    err_plain = (out_plain.double() - ref).abs()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert err.max() <= 2 * err_plain.max() + slack, (
        f"{what}: max error {err.max():.3e} > 2 x plain-PyTorch {err_plain.max():.3e} + {slack:g}"
    )
    assert err.mean() <= 1.5 * err_plain.mean() + slack, (
        f"{what}: mean error {err.mean():.3e} > 1.5 x plain-PyTorch {err_plain.mean():.3e} + {slack:g}"
    )


def random_plan(batch_plans, heads, seq_len, block_m, block_n, density, gen):
    n_q, n_kv = -(-seq_len // block_m), -(-seq_len // block_n)
    mask = torch.rand(batch_plans, heads, n_q, n_kv, generator=gen) < density
    if n_q > 1:
        mask[..., 1, :] = False  # always one empty row
    return mask


def _cases():
    rng = random.Random(1234)
    cases = []
    shapes = [(1, 1, 64, 32), (2, 3, 161, 64), (1, 2, 300, 64), (3, 2, 97, 32), (2, 2, 130, 128), (1, 4, 225, 64), (2, 2, 90, 16)]
    densities = [0.25, 0.5, 1.0, 0.1]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for i, (B, H, S, D) in enumerate(shapes):
        for j in range(3):
            density = densities[(i + j) % len(densities)]
            dtype = dtypes[(i + j) % len(dtypes)]
            block_m, block_n = rng.choice([(32, 32), (32, 64), (64, 32), (16, 32), (64, 64)])
            shared = rng.random() < 0.5
            padding = rng.random() < 0.5
            lse = rng.random() < 0.6
            cases.append(
                pytest.param(
                    B, H, S, D, density, dtype, block_m, block_n, shared, padding, lse,
                    id=f"B{B}-H{H}-S{S}-D{D}-d{density}-{str(dtype)[6:]}-bm{block_m}-bn{block_n}"
                    f"-{'Bi1' if shared else 'BiB'}{'-pad' if padding else ''}{'-lse' if lse else ''}",
                )
            )
    return cases


@launches_kernel
@pytest.mark.parametrize("B,H,S,D,density,dtype,block_m,block_n,shared,padding,return_lse", _cases())
def test_matches_reference(B, H, S, D, density, dtype, block_m, block_n, shared, padding, return_lse):
    gen = torch.Generator().manual_seed(B * 1000 + S * 10 + D)
    q, k, v = (torch.randn(B, H, S, D, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    mask = random_plan(1 if shared else B, H, S, block_m, block_n, density, gen).to(DEVICE)
    kv_idx, kv_cnt = block_mask_to_indices(mask)
    key_padding_mask = None
    if padding:
        key_padding_mask = (torch.rand(B, S, generator=gen) < 0.8).to(DEVICE)
        key_padding_mask[0, :] = False  # batch 0: every key padded, every row empty
    kwargs = dict(block_m=block_m, block_n=block_n, key_padding_mask=key_padding_mask, return_lse=return_lse)

    got = block_sparse_attention(q, k, v, kv_idx, kv_cnt, **kwargs)
    ref = block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, **kwargs)
    plain = block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, **kwargs, upcast=False)
    out, ref_out, plain_out = (got[0], ref[0], plain[0]) if return_lse else (got, ref, plain)

    assert out.shape == (B, H, S, D) and out.dtype == dtype and out.is_contiguous()
    assert_attention_close(out, plain_out, ref_out)
    if return_lse:
        lse, ref_lse = got[1], ref[1]
        assert lse.dtype == torch.float32 and lse.shape == (B, H, S)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse -inf rows differ"
        finite = torch.isfinite(ref_lse)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert finite.sum() == 0 or (lse[finite] - ref_lse[finite]).abs().max() <= tol


def _small(dtype=torch.float32, B=2, H=3, S=150, D=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=gen).to(dtype).to(DEVICE) for _ in range(3))


@launches_kernel
def test_empty_rows_output_zero_and_lse_neg_inf():
    q, k, v = _small()
    block_m, block_n = 32, 32
    mask = torch.ones(1, 3, 5, 5, dtype=torch.bool, device=DEVICE)
    mask[:, :, 2] = False
    kv_idx, kv_cnt = block_mask_to_indices(mask)
    out, lse = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_m=block_m, block_n=block_n, return_lse=True)
    assert torch.all(out[:, :, 64:96] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 64:96]))
    assert torch.isfinite(lse[:, :, :64]).all() and (out[:, :, :64].abs().sum() > 0)


@launches_kernel
def test_full_mask_equals_dense_attention():
    q, k, v = _small(S=130)
    mask = torch.ones(1, 3, 5, 3, dtype=torch.bool, device=DEVICE)
    kv_idx, kv_cnt = block_mask_to_indices(mask)
    out, lse = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_m=32, block_n=64, return_lse=True)
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(64)
    assert (out.double() - dense).abs().max() < 1e-4
    assert (lse.double() - scores.logsumexp(-1)).abs().max() < 1e-4


@launches_kernel
def test_shared_plan_equals_per_batch_plan():
    q, k, v = _small(B=2)
    mask = random_plan(1, 3, 150, 32, 32, 0.4, torch.Generator().manual_seed(3)).to(DEVICE)
    shared = block_mask_to_indices(mask)
    per_batch = block_mask_to_indices(mask.expand(2, -1, -1, -1).contiguous())
    a = block_sparse_attention(q, k, v, *shared, block_m=32, block_n=32)
    b = block_sparse_attention(q, k, v, *per_batch, block_m=32, block_n=32)
    assert torch.equal(a, b)


@launches_kernel
def test_transposed_views_and_custom_scale():
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 133, 3, 4, 32, generator=gen).to(DEVICE)  # (B, S, 3, H, D) as a fused projection
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, not contiguous
    assert not q.is_contiguous()
    mask = random_plan(2, 4, 133, 32, 32, 0.5, gen).to(DEVICE)
    kv_idx, kv_cnt = block_mask_to_indices(mask)
    out = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_m=32, block_n=32, scale=0.3)
    ref = block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, block_m=32, block_n=32, scale=0.3)
    plain = block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, block_m=32, block_n=32, scale=0.3, upcast=False)
    assert_attention_close(out, plain, ref)


@launches_kernel
@pytest.mark.parametrize("use_tma", [False, True], ids=["ptr", "tma"])
@pytest.mark.parametrize("mask_mode", [0, 1, 2], ids=["mask-none", "mask-every", "mask-tail-branch"])
def test_kernel_variants_agree(use_tma, mask_mode):
    seq_len = 128 if mask_mode == 0 else 141  # mode 0 is only valid without a tail
    q, k, v = _small(dtype=torch.bfloat16, B=1, H=2, S=seq_len)
    mask = random_plan(1, 2, seq_len, 64, 32, 0.6, torch.Generator().manual_seed(7)).to(DEVICE)
    kv_idx, kv_cnt = block_mask_to_indices(mask)
    kwargs = dict(block_m=64, block_n=32, return_lse=True)
    out, lse = _forward(q, k, v, kv_idx, kv_cnt, use_tma=use_tma, mask_mode=mask_mode, **kwargs)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, **kwargs)
    plain, _ = block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, **kwargs, upcast=False)
    assert_attention_close(out, plain, ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_default_block_sizes():
    assert default_block_sizes(64) == (64, 128)
    assert default_block_sizes(128) == (128, 64)
    assert default_block_sizes(32) == (64, 128)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"].to(torch.int32)), r"q\.dtype must be one of .* got torch\.int32"),
        (lambda a: a.update(k=a["k"][..., :100, :]), r"same shape"),
        (lambda a: a.update(q=a["q"][..., :48], k=a["k"][..., :48], v=a["v"][..., :48]), r"head dim .* got 48"),
        (lambda a: a.update(kv_block_indices=a["kv_block_indices"].long()), r"kv_block_indices must be an int32 tensor, got torch\.int64"),
        (lambda a: a.update(kv_block_indices=a["kv_block_indices"][:, :, :2]), r"num_q_blocks=5.*got \(1, 3, 2, "),
        (lambda a: a.update(kv_block_counts=a["kv_block_counts"][:, :1]), r"kv_block_counts must have shape"),
        (lambda a: a.update(block_m=48), r"block_m must be one of .* got 48"),
        (lambda a: a.update(key_padding_mask=torch.ones(2, 150, device=DEVICE)), r"key_padding_mask must be a bool"),
        (lambda a: a.update(key_padding_mask=torch.ones(2, 10, dtype=torch.bool, device=DEVICE)), r"key_padding_mask must have shape \(B, S\) = \(2, 150\), got \(2, 10\)"),
    ],
    ids=["dtype", "kv-shape", "head-dim", "index-dtype", "index-shape", "count-shape", "block-m", "padding-dtype", "padding-shape"],
)
def test_bad_arguments_are_named(change, match):
    q, k, v = _small()
    mask = torch.ones(1, 3, 5, 5, dtype=torch.bool, device=DEVICE)
    kv_idx, kv_cnt = block_mask_to_indices(mask)
    args = dict(q=q, k=k, v=v, kv_block_indices=kv_idx, kv_block_counts=kv_cnt, block_m=32, block_n=32)
    change(args)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(**args)


@pytest.mark.parametrize("seed", range(4))
def test_block_mask_to_indices_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 3, 7, 9, generator=gen) < [0.0, 0.3, 0.7, 1.0][seed]
    kv_idx, kv_cnt = block_mask_to_indices(mask.to(DEVICE))
    assert kv_idx.dtype == torch.int32 and kv_cnt.dtype == torch.int32
    assert torch.equal(kv_cnt.cpu(), mask.sum(-1).int())
    assert torch.equal(indices_to_block_mask(kv_idx, kv_cnt, 9).cpu(), mask)
    listed = torch.arange(kv_idx.shape[-1], device=DEVICE) < kv_cnt[..., None]
    steps = kv_idx[..., 1:] - kv_idx[..., :-1]
    assert torch.all(steps[listed[..., 1:]] > 0), "indices must be ascending"
    assert block_density(mask) == pytest.approx(mask.float().mean().item())
    assert block_density(kv_cnt, 9) == pytest.approx(mask.float().mean().item())


def test_block_mask_to_indices_rejects_non_bool():
    with pytest.raises(ValueError, match="block_mask must be a bool tensor"):
        block_mask_to_indices(torch.ones(1, 1, 2, 2))


@launches_kernel
@pytest.mark.parametrize("per_batch", [False, True], ids=["rows-shared", "rows-per-batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_query_rows_fuse_a_permutation_of_q_and_its_inverse_on_the_output(per_batch, dtype):
    """Slot i serves row query_rows[i]: the same as gathering q, attending, and scattering the output."""
    B, H, S, D, block_m, block_n = 2, 3, 150, 32, 32, 32
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, H, S, D, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    mask = random_plan(B, H, S, block_m, block_n, 0.4, gen).to(DEVICE)
    kv_idx, kv_cnt = block_mask_to_indices(mask)
    rows = torch.stack([torch.randperm(S, generator=gen) for _ in range((B if per_batch else 1) * H)])
    rows = rows.view(B if per_batch else 1, H, S).to(torch.int32).to(DEVICE)
    padding = (torch.rand(B, S, generator=gen) < 0.9).to(DEVICE)
    kwargs = dict(block_m=block_m, block_n=block_n, key_padding_mask=padding, return_lse=True, query_rows=rows)

    out, lse = block_sparse_attention(q, k, v, kv_idx, kv_cnt, **kwargs)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, **kwargs)
    plain_out, _ = block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, **kwargs, upcast=False)
    assert_attention_close(out, plain_out, ref_out)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - ref_lse[finite]).abs().max() <= (1e-4 if dtype == torch.float32 else 2e-2)

    # The reference's own meaning, spelled out: gather q, attend in slot order, scatter back.
    gathered = torch.gather(q, 2, rows.long().expand(B, H, S)[..., None].expand(B, H, S, D))
    slots = block_sparse_attention_reference(gathered, k, v, kv_idx, kv_cnt, block_m=block_m, block_n=block_n,
                                             key_padding_mask=padding)
    b, h = 1, 2
    row_of = rows[b if per_batch else 0, h].long()
    torch.testing.assert_close(ref_out[b, h, row_of], slots[b, h])


@launches_kernel
def test_query_rows_must_fit_q():
    q, k, v = _small()
    kv_idx, kv_cnt = block_mask_to_indices(torch.ones(1, 3, 3, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"query_rows must be an int32 tensor \(1 or B, H, S\)"):
        block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_m=64, block_n=64,
                               query_rows=torch.zeros(1, 3, 10, dtype=torch.int32, device=DEVICE))


# --- masked_row_errors: masked attention against full attention on sampled rows ---------------


@launches_kernel
@pytest.mark.parametrize(
    "B, H, S, D, R, M, dtype, padding",
    [
        (1, 2, 97, 32, 16, 2, torch.float32, False),
        (2, 3, 161, 64, 21, 2, torch.bfloat16, True),
        (1, 2, 300, 128, 40, 3, torch.bfloat16, False),
        (2, 1, 130, 64, 7, 1, torch.float16, True),
        (2, 2, 150, 32, 70, 4, torch.float32, True),  # two row blocks, two pairs of masks
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_masked_row_errors_matches_reference(B, H, S, D, R, M, dtype, padding):
    from vdit_sparse.kernels.reference import masked_row_errors_reference
    from vdit_sparse.kernels.row_errors import masked_row_errors

    gen = torch.Generator().manual_seed(S + R)
    q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
    rows = torch.randperm(S, generator=gen)[:R]
    masks = torch.rand(M, R, S, generator=gen) < 0.3
    masks[..., :4] = True  # every row keeps a few keys that are never padding
    key_padding = None
    if padding:
        key_padding = torch.ones(B, S, dtype=torch.bool)
        key_padding[-1, -S // 5 :] = False
    low = [t.to(dtype) for t in (q, k, v)]
    truth = masked_row_errors_reference(*(t.double() for t in low), rows, masks, key_padding)
    plain = masked_row_errors_reference(*low, rows, masks, key_padding)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = masked_row_errors(*(t.to(DEVICE) for t in low), dev(rows), dev(masks), dev(key_padding)).cpu()
    assert out.shape == (B, H, M) and out.dtype == torch.float32
    assert_attention_close(out, plain, truth, slack=1e-6, what="errors")


@launches_kernel
def test_masked_row_errors_tell_planted_heads_apart():
    """The kernel and the reference take the same spatial/temporal decision on planted heads."""
    from vdit_sparse.geometry import LatentGrid, TokenLayout
    from vdit_sparse.kernels.reference import masked_row_errors_reference
    from vdit_sparse.kernels.row_errors import masked_row_errors
    from vdit_sparse.methods.svg import band_half_width, row_masks, sample_rows
    from vdit_sparse.patterns import diagonal_band_block_mask
    from vdit_sparse.synthetic import planted_qkv

    layout = TokenLayout(LatentGrid(6, 6, 6), 12, "prefix")
    kinds = ["spatial", "temporal"] * 3
    q, k, v = planted_qkv(layout, kinds, batch=2, head_dim=32, noise=1.0, seed=5)
    band = diagonal_band_block_mask(layout, 16, band_half_width(layout, 0.25))
    rows = sample_rows(layout, 64, "cpu")
    masks = torch.stack(row_masks(layout, band, rows, 16, 16))
    reference = masked_row_errors_reference(q, k, v, rows, masks)
    out = masked_row_errors(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), rows.to(DEVICE), masks.to(DEVICE)).cpu()
    planted = torch.tensor([kind == "temporal" for kind in kinds]).expand(2, -1)
    assert torch.equal(out[..., 1] < out[..., 0], planted)
    assert torch.equal(reference[..., 1] < reference[..., 0], planted)
