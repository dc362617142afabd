"""Per-head plans: heads of one layer mixing methods in one launch, head offsets, and method state across steps."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from conftest import run_pipeline
from vdit_sparse import accelerate_pipeline
from vdit_sparse.context import AttentionCall, RunStats, StateStore, StepContext
from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.methods import DenseMethod, SkipMethod, SVGMethod, register_method
from vdit_sparse.methods.block_sparse import BlockSparseParams, SlidingFramesMethod
from vdit_sparse.methods.svg import band_half_width, row_masks
from vdit_sparse.patterns import diagonal_band_block_mask
from vdit_sparse.routing import HeadGroup, LayerRouting

LAYOUT = TokenLayout(LatentGrid(5, 4, 6), 9, "suffix")
BLOCK = 16
SVG_HEADS, DENSE_HEADS, SKIP_HEADS = (0, 2, 5), (1,), (3, 4)


def mixed_layer(backend: str) -> LayerRouting:
    params = {"density": 0.3, "block_size": BLOCK, "backend": backend}
    return LayerRouting(0, [
        HeadGroup(SVGMethod(SVGMethod.parse_params(params)), SVG_HEADS),
        HeadGroup(DenseMethod(DenseMethod.parse_params({})), DENSE_HEADS),
        HeadGroup(SkipMethod(SkipMethod.parse_params({})), SKIP_HEADS),
    ])


def make_call(padding=None, head_offset=0, step=0) -> AttentionCall:
    return AttentionCall(0, StepContext(step, 4, 999.0, 0, LAYOUT), padding, RunStats(), head_offset)


def qkv(heads=6, seed=0):
    from vdit_sparse.synthetic import planted_qkv

    kinds = ["spatial", "temporal"] * (heads // 2)
    return planted_qkv(LAYOUT, kinds, batch=2, head_dim=32, noise=0.5, seed=seed)


def per_head_reference(q, k, v, padding, temporal) -> torch.Tensor:
    """Each head alone in plain PyTorch: its token mask (svg: spatial or temporal band), SDPA, or zeros."""
    seq = LAYOUT.seq_len
    band = diagonal_band_block_mask(LAYOUT, BLOCK, band_half_width(LAYOUT, 0.3))
    spatial_mask, temporal_mask = row_masks(LAYOUT, band, torch.arange(seq), BLOCK, BLOCK)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            if h in SKIP_HEADS:
                continue
            mask = torch.ones(seq, seq, dtype=torch.bool)
            if h in SVG_HEADS:
                mask = temporal_mask if temporal[b, SVG_HEADS.index(h)] else spatial_mask
            mask = mask & padding[b][None, :]
            out[b, h] = F.scaled_dot_product_attention(q[b, h], k[b, h], v[b, h], attn_mask=mask)
    return out


@pytest.fixture
def padding():
    mask = torch.ones(2, LAYOUT.seq_len, dtype=torch.bool)
    mask[1, -3:] = False  # HunyuanVideo-style padded text at the end of the second batch entry
    return mask


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mixed_heads_run_in_one_launch_and_match_each_head_alone(backend, padding, monkeypatch):
    from vdit_sparse.kernels import block_sparse_attention as kernel_module
    from vdit_sparse.kernels._triton_runtime import interpreter_active

    if backend == "triton" and not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    launches = []
    real_kernel_for = kernel_module.kernel_for

    def counting_kernel_for(function, device):
        launches.append(function.__name__ if hasattr(function, "__name__") else str(function))
        return real_kernel_for(function, device)

    monkeypatch.setattr(kernel_module, "kernel_for", counting_kernel_for)
    q, k, v = qkv()
    store, call = StateStore(), make_call(padding)
    out = mixed_layer(backend).attend(q, k, v, call, store)
    temporal = store.slot((0, 0, 0))["temporal"]
    assert temporal.any() and not temporal.all()  # both orders ran
    if backend == "triton":
        assert len(launches) == 1, launches  # one attention launch for svg, dense and skipped heads
    torch.testing.assert_close(out, per_head_reference(q, k, v, padding, temporal), rtol=0, atol=1e-4)
    assert out[:, list(SKIP_HEADS)].abs().max() == 0
    assert call.stats.calls == {"svg": 1, "dense": 1, "skip": 1}
    band_fraction = diagonal_band_block_mask(LAYOUT, BLOCK, band_half_width(LAYOUT, 0.3)).float().mean().item()
    assert band_fraction < 1
    assert call.stats.computed_fraction == pytest.approx((3 * band_fraction + 1 * 1.0 + 2 * 0.0) / 6)


def test_a_call_holding_some_heads_uses_their_plans(padding):
    """Under Ulysses a rank holds heads 2..4 of 6: its output equals those heads of the whole call."""
    q, k, v = qkv()
    layer = mixed_layer("reference")
    store = StateStore()
    whole = layer.attend(q, k, v, make_call(padding), store)
    temporal = store.slot((0, 0, 0))["temporal"]
    part = layer.attend(q[:, 2:5], k[:, 2:5], v[:, 2:5], make_call(padding, head_offset=2), StateStore())
    torch.testing.assert_close(part, whole[:, 2:5], rtol=0, atol=1e-6)
    assert temporal.shape == (2, 3)


def test_per_head_profile_in_a_pipeline(family_pipe):
    family, pipe = family_pipe
    dense = run_pipeline(pipe)
    heads = {"0": {"method": "dense"}, "1": {"method": "skip"}}
    profile = {"name": "mixed", "method": "svg", "params": {"density": 0.3, "block_size": 16, "backend": "reference"},
               "layers": {1: {"heads": heads}}}
    with accelerate_pipeline(pipe, profile) as handle:
        output = run_pipeline(pipe)
        layers = handle.num_layers
        assert handle.stats.calls == {"svg": 4 * layers, "dense": 4, "skip": 4}
    assert torch.isfinite(output).all() and not torch.equal(output, dense)
    all_dense = {"name": "heads-dense", "method": "sliding_frames", "params": {"backend": "reference"},
                 "layers": {i: {"heads": {f"0-{handle.num_heads - 1}": {"method": "dense"}}} for i in range(layers)}}
    with accelerate_pipeline(pipe, all_dense) as handle:
        assert torch.equal(run_pipeline(pipe), dense)  # a layer of dense heads runs the model's own processor
        assert handle.stats.calls == {"dense": 4 * layers}


@dataclass
class CacheParams(BlockSparseParams):
    pass


@register_method
class DenseOutputCache(SlidingFramesMethod):
    """A test method: fills a cache with its dense output on warm-up steps and returns it on sparse steps."""

    name = "test_dense_output_cache"
    Params = CacheParams
    events: list = []

    def uses_model_processor(self, call):
        return False  # it must see the warm-up steps to fill its cache

    def plan(self, q, k, v, call):
        if call.step.warmup:
            from vdit_sparse.plan import dense_plan

            return dense_plan(q.shape[2], q.shape[1], call.block_m, call.block_n, q.device)
        return super().plan(q, k, v, call)

    def layout_block_mask(self, layout, block_m, block_n, device):
        from vdit_sparse.patterns import frame_band_block_mask

        return frame_band_block_mask(layout, block_m, block_n, 0, device=device)[None, None]

    def finish(self, out, q, k, v, call):
        if call.step.warmup:
            call.state["dense_out"] = out.clone()
            self.events.append(("filled", call.layer_index, call.step.step_index))
            return out
        self.events.append(("read", call.layer_index, call.step.step_index))
        return call.state["dense_out"]


def test_a_method_fills_a_cache_on_a_dense_step_and_reads_it_on_the_next(family_pipe):
    _, pipe = family_pipe
    profile = {"name": "cache", "method": "test_dense_output_cache", "params": {"backend": "reference"},
               "dense_warmup_steps": 1}
    DenseOutputCache.events.clear()
    with accelerate_pipeline(pipe, profile) as handle:
        run_pipeline(pipe)
        summary = handle.summary()
    layers = handle.num_layers
    assert DenseOutputCache.events[:layers] == [("filled", layer, 0) for layer in range(layers)]
    assert DenseOutputCache.events[layers : 2 * layers] == [("read", layer, 1) for layer in range(layers)]
    assert summary["calls"] == {"test_dense_output_cache": 4 * layers}  # warm-up steps reach the method too
    assert summary["peak_state_bytes"] > 0 and summary["state_bytes"] == 0  # freed when the call ended
    assert handle.state.nbytes() == 0


def test_feed_forward_sites_compute_each_blocks_feed_forward(family_pipe):
    from vdit_sparse.pipelines import find_adapter

    family, pipe = family_pipe
    adapter = find_adapter(pipe)
    sites = adapter.feed_forward_sites(pipe.transformer)
    layers = len(adapter.attention_modules(pipe.transformer))
    if family == "cogvideox":
        assert [(s.layer_index, s.stream) for s in sites] == [(i, "joint") for i in range(layers)]
    else:  # dual-stream blocks have a video and a text feed-forward, single-stream blocks one joint MLP
        dual = len(pipe.transformer.transformer_blocks)
        expected = [(i, stream) for i in range(dual) for stream in ("video", "text")]
        assert [(s.layer_index, s.stream) for s in sites] == expected + [(i, "joint") for i in range(dual, layers)]
    torch.manual_seed(0)
    with torch.no_grad():
        for site in sites:
            x = torch.randn(2, 5, site.up.in_features)
            mlp = site.activation(site.up(x))
            if site.module is not None:
                torch.testing.assert_close(site.module(x), site.down(mlp))
            else:  # the MLP's share of the joint projection
                attention_width = site.down.in_features - site.up.out_features
                joint = site.down(torch.cat([torch.zeros(2, 5, attention_width), mlp], dim=-1))
                torch.testing.assert_close(joint, torch.nn.functional.linear(mlp, site.down.weight[:, site.down_columns], site.down.bias))


@register_method
class FeedForwardCache(SlidingFramesMethod):
    """A test method: computes its layers' feed-forwards on warm-up steps, caches them and reuses them after."""

    name = "test_feed_forward_cache"
    uses_feed_forward = True
    events: list = []

    def feed_forward(self, site, x, call):
        if call.step.warmup:
            call.state["out"] = out = site.down_out(site.activation(site.up(x)))
            self.events.append(("filled", site.layer_index, site.stream, call.step.step_index))
            return out
        self.events.append(("read", site.layer_index, site.stream, call.step.step_index))
        return call.state["out"]


def test_a_method_caches_feed_forward_outputs_across_steps(family_pipe):
    family, pipe = family_pipe
    params = {"window_frames": 0, "block_size": 16, "backend": "reference"}
    attention_only = {"name": "window", "method": "sliding_frames", "params": params, "dense_warmup_steps": 1}
    with accelerate_pipeline(pipe, attention_only):
        expected_attention_only = run_pipeline(pipe)
    FeedForwardCache.events.clear()
    with accelerate_pipeline(pipe, {**attention_only, "method": "test_feed_forward_cache"}) as handle:
        output = run_pipeline(pipe)
        summary = handle.summary()
    intercepted = {(layer, stream) for _, layer, stream, _ in FeedForwardCache.events}
    steps = {(kind, step) for kind, _, _, step in FeedForwardCache.events}
    assert steps == {("filled", 0), ("read", 1), ("read", 2), ("read", 3)}
    # every site is intercepted: HunyuanVideo's dual-stream blocks have two, its single-stream blocks an inlined one
    dual = 0 if family == "cogvideox" else len(pipe.transformer.transformer_blocks)
    assert len(intercepted) == handle.num_layers + dual
    assert not torch.equal(output, expected_attention_only)  # the cached feed-forwards were used
    assert summary["peak_state_bytes"] > 0 and summary["state_bytes"] == 0
    assert all(not hasattr(site_module, "_diffusers_hook") or not site_module._diffusers_hook.hooks
               for site_module in (b.ff for b in pipe.transformer.transformer_blocks))  # remove() dropped the hooks
