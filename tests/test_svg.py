"""Sparse VideoGen: head classification, the layout transformation, and exactness at density 1."""

from __future__ import annotations

import pytest
import torch

from conftest import run_pipeline
from vdit_sparse import accelerate_pipeline
from vdit_sparse.context import StateStore
from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.methods.svg import band_half_width, row_masks
from vdit_sparse.patterns import diagonal_band_block_mask, frame_to_position_permutation
from vdit_sparse.plan import run_plan

LAYOUT = TokenLayout(LatentGrid(6, 4, 5), 7, "prefix")


def test_temporal_heads_attend_to_the_same_position_across_frames():
    """A temporal head's band, in position-major order, covers a query's own position in every frame."""
    block = 4
    mask = diagonal_band_block_mask(LAYOUT, block, band_half_width(LAYOUT, 0.25))
    query = LAYOUT.video_start + 2 * LAYOUT.grid.tokens_per_frame + 7  # frame 2, position 7
    same_position = LAYOUT.video_start + torch.arange(LAYOUT.grid.frames) * LAYOUT.grid.tokens_per_frame + 7
    _, temporal = row_masks(LAYOUT, mask, torch.tensor([query]), block, block)
    assert temporal[0, same_position].all()
    assert temporal[0, : LAYOUT.text_length].all()  # text columns stay dense


def test_svg_plan_equals_attending_in_the_permuted_order():
    """The plan's token order says exactly what permute -> band -> unpermute computes."""
    from vdit_sparse.kernels.reference import permute_tokens_reference
    from vdit_sparse.methods.svg import SVGMethod

    torch.manual_seed(1)
    q, k, v = torch.randn(3, 2, 3, LAYOUT.seq_len, 16).unbind(0)
    method = SVGMethod(SVGMethod.parse_params({"density": 0.3, "block_size": 16, "backend": "reference"}))
    call = _svg_call(LAYOUT, block=16)
    plan = method.plan(q, k, v, call)
    out = run_plan(q, k, v, plan, backend="reference")
    temporal = call.state["temporal"]
    assert temporal.any() and not temporal.all()

    perm = frame_to_position_permutation(LAYOUT)
    band = diagonal_band_block_mask(LAYOUT, 16, band_half_width(LAYOUT, 0.3))
    qp, kp, vp = (permute_tokens_reference(t, perm, heads=temporal) for t in (q, k, v))
    token_mask = band.repeat_interleave(16, 0)[: LAYOUT.seq_len].repeat_interleave(16, 1)[:, : LAYOUT.seq_len]
    expected = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=token_mask)
    expected = permute_tokens_reference(expected, perm, inverse=True, heads=temporal)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan-video"])
def test_svg_at_density_one_reproduces_dense(family):
    from vdit_sparse.embedded import build_embedded_pipeline

    pipe = build_embedded_pipeline(family, seed=0)
    reference = run_pipeline(pipe)
    profile = {"method": "svg", "params": {"density": 1.0, "backend": "reference", "block_size": 16}}
    with accelerate_pipeline(pipe, profile) as handle:
        output = run_pipeline(pipe)
        assert handle.stats.calls == {"svg": 4 * handle.num_layers}
    assert (output - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan-video"])
def test_svg_changes_output_and_reuses_decisions(family):
    from vdit_sparse.embedded import build_embedded_pipeline
    from vdit_sparse.methods import svg

    pipe = build_embedded_pipeline(family, seed=0)
    reference = run_pipeline(pipe)
    profile = {"method": "svg", "params": {"density": 0.2, "backend": "reference", "block_size": 16, "reprofile_every": 2}}
    classified = []
    original = svg.classify_heads

    def spy(*args, **kwargs):
        classified.append(True)
        return original(*args, **kwargs)

    svg.classify_heads = spy
    try:
        with accelerate_pipeline(pipe, profile) as handle:
            output = run_pipeline(pipe)
            assert handle.stats.computed_fraction < 0.7
            summary = handle.summary()
    finally:
        svg.classify_heads = original
    # 4 steps, reprofile every 2: classify at steps 0 and 2 of each layer, reuse at 1 and 3.
    assert len(classified) == 2 * handle.num_layers
    assert summary["state_bytes"] == 0 and summary["peak_state_bytes"] > 0  # the decisions, freed after the call
    assert torch.isfinite(output).all() and not torch.equal(output, reference)


# At this noise level a planted head keeps roughly half of its attention mass in
# its pattern (tests/test_synthetic.py); measured accuracy here: 128 of 128 at
# noise 1.0 and 126 of 128 at noise 2.0.
CLASSIFICATION_NOISE = 1.0


def test_classification_of_planted_heads():
    from vdit_sparse.methods.svg import classify_heads, row_masks, sample_rows
    from vdit_sparse.synthetic import planted_qkv

    layout = TokenLayout(LatentGrid(8, 6, 6), 12, "prefix")
    block = 16
    mask = diagonal_band_block_mask(layout, block, band_half_width(layout, 0.25))
    rows = sample_rows(layout, 64, "cpu")
    masks = torch.stack(row_masks(layout, mask, rows, block, block))
    correct = total = 0
    for seed in range(4):
        kinds = ["spatial", "temporal"] * 8
        q, k, v = planted_qkv(layout, kinds, batch=2, head_dim=32, noise=CLASSIFICATION_NOISE, seed=seed)
        temporal = classify_heads(q, k, v, rows, masks)
        planted = torch.tensor([kind == "temporal" for kind in kinds]).expand(2, -1)
        correct += (temporal == planted).sum().item()
        total += planted.numel()
    assert correct / total >= 0.98


def svg_layer(**params):
    """A layer whose every head runs svg with ``params``."""
    from vdit_sparse.methods.svg import SVGMethod
    from vdit_sparse.routing import HeadGroup, LayerRouting

    method = SVGMethod(SVGMethod.parse_params(params))
    return LayerRouting(0, [HeadGroup(method, tuple(range(64)))])


def _svg_call(layout, padding=None, block=8, backend="reference"):
    from vdit_sparse.context import AttentionCall, RunStats, StepContext

    return AttentionCall(0, StepContext(0, 1, 999.0, 0, layout), padding, RunStats(), block_m=block, block_n=block,
                         backend=backend, state={})


@pytest.mark.parametrize("text_position", ["prefix", "suffix"])
def test_svg_on_the_kernels_equals_the_masked_reference(text_position):
    from vdit_sparse.kernels._triton_runtime import interpreter_active
    from vdit_sparse.synthetic import planted_qkv

    if not torch.cuda.is_available() and not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    layout = TokenLayout(LatentGrid(5, 4, 6), 9, text_position)
    kinds = ["spatial", "temporal", "temporal", "spatial"]
    q, k, v = planted_qkv(layout, kinds, batch=2, head_dim=32, noise=0.5, seed=3)
    padding = None
    if text_position == "suffix":  # the last 4 text tokens of batch entry 1 are padding
        padding = torch.ones(2, layout.seq_len, dtype=torch.bool)
        padding[1, -4:] = False
    outputs = {}
    for backend in ("reference", "triton"):
        store = StateStore()
        outputs[backend] = svg_layer(density=0.3, block_size=16, backend=backend).attend(q, k, v, _svg_call(layout, padding), store)
        decisions = store.slot((0, 0, 0))["temporal"]
    assert decisions.any() and not decisions.all()  # both paths of the layout transformation ran
    assert (outputs["triton"] - outputs["reference"]).abs().max().item() <= 1e-4


def test_reference_and_kernel_paths_compute_one_mask_by_default():
    """Without block_size both backends take the kernels' block geometry (64 x 128 at head dim 32)."""
    from vdit_sparse.kernels._triton_runtime import interpreter_active
    from vdit_sparse.synthetic import planted_qkv

    if not torch.cuda.is_available() and not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    layout = TokenLayout(LatentGrid(5, 8, 10), 16, "prefix")
    q, k, v = planted_qkv(layout, ["spatial", "temporal"], batch=1, head_dim=32, noise=0.5, seed=4)
    outputs, fractions = {}, {}
    for backend in ("reference", "triton"):
        call = _svg_call(layout)
        outputs[backend] = svg_layer(density=0.3, backend=backend).attend(q, k, v, call, StateStore())
        fractions[backend] = call.stats.computed_fraction
    assert fractions["reference"] == fractions["triton"] < 1.0
    assert (outputs["triton"] - outputs["reference"]).abs().max().item() <= 1e-4
