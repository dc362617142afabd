"""Chipmunk: column-sparse attention deltas cached across steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_pipeline
from test_kernels import launches_kernel
from vdit_sparse import accelerate_pipeline
from vdit_sparse.context import AttentionCall, RunStats, StateStore, StepContext
from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.kernels.reference import column_mass_reference
from vdit_sparse.methods.chipmunk import ChipmunkMethod, select_columns
from vdit_sparse.profile import ProfileError, load_profile
from vdit_sparse.routing import HeadGroup, LayerRouting

LAYOUT = TokenLayout(LatentGrid(5, 6, 7), 11, "suffix")  # the voxel below does not divide this grid


def layer(backend="reference", **params) -> LayerRouting:
    method = ChipmunkMethod(ChipmunkMethod.parse_params({"voxel": [2, 2, 4], "backend": backend, **params}))
    return LayerRouting(0, [HeadGroup(method, (0, 1, 2))])


def call(step: int, padding=None) -> AttentionCall:
    return AttentionCall(0, StepContext(step, 50, 1.0, 0, LAYOUT), padding, RunStats())


def qkv(seed: int, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, LAYOUT.seq_len, 16, generator=gen) for _ in range(3))


def padding_mask(batch: int = 2) -> torch.Tensor:
    mask = torch.ones(batch, LAYOUT.seq_len, dtype=torch.bool)
    mask[-1, -4:] = False  # HunyuanVideo-style padded text at the end
    return mask


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=launches_kernel)])
def test_with_every_column_kept_a_sparse_step_is_dense_attention(backend):
    routing, store, padding = layer(backend, top_k=1.0, random_fraction=0.0), StateStore(), padding_mask()
    q, k, v = qkv(0)
    first = routing.attend(q, k, v, call(0, padding), store)  # a dense step: fills the cache
    assert (first - F.scaled_dot_product_attention(q, k, v, attn_mask=padding[:, None, None, :])).abs().max() <= 1e-5
    q, k, v = qkv(1)  # the next step's inputs differ
    out = routing.attend(q, k, v, call(3, padding), store)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=padding[:, None, None, :])
    assert (out - dense).abs().max() <= 1e-5


@launches_kernel
def test_the_kernel_path_matches_the_reference_path():
    outs = []
    for backend in ("reference", "triton"):
        routing, store = layer(backend, top_k=0.2), StateStore()
        q, k, v = qkv(0)
        routing.attend(q, k, v, call(0), store)
        outs.append(routing.attend(*qkv(1), call(5), store))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_sparse_steps_reuse_the_cache_and_dense_steps_refresh_it():
    routing, store = layer(top_k=0.1, dense_steps=[0, 10], schedule_steps=50), StateStore()
    stats = RunStats()
    q, k, v = qkv(0)
    routing.attend(q, k, v, AttentionCall(0, StepContext(0, 50, 1.0, 0, LAYOUT), None, stats), store)
    slot = store.slot((0, 0, 0))
    cache, columns = slot["o_cache"], slot["columns"]
    routing.attend(*qkv(1), AttentionCall(0, StepContext(5, 50, 1.0, 0, LAYOUT), None, stats), store)
    assert slot["o_cache"] is cache  # a sparse step reads it
    routing.attend(*qkv(2), AttentionCall(0, StepContext(10, 50, 1.0, 0, LAYOUT), None, stats), store)
    assert slot["o_cache"] is not cache and not torch.equal(slot["columns"], columns)  # step 10 is dense again
    assert columns.shape[-1] == 11 + 23 + 3  # every text key, 10% of the 221 keys by mass (rounded up), 1% at random
    assert (slot["counts"] >= 11 + 23).all() and (slot["counts"] <= 11 + 23 + 3).all()  # random draws may repeat
    assert stats.calls == {"chipmunk": 3}


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=launches_kernel)])
def test_the_mass_taken_a_few_heads_at_a_time_selects_the_same_columns(backend, monkeypatch):
    from vdit_sparse.methods import chipmunk

    chosen = []
    for budget in (chipmunk.MASS_CHUNK_BYTES, 1):  # all heads at once, then one head at a time
        monkeypatch.setattr(chipmunk, "MASS_CHUNK_BYTES", budget)
        routing, store = layer(backend, top_k=0.1, random_fraction=0.0), StateStore()
        routing.attend(*qkv(0), call(0), store)
        chosen.append(store.slot((0, 0, 0))["columns"])
    assert torch.equal(chosen[0], chosen[1])


def test_dense_steps_scale_with_the_step_count():
    method = ChipmunkMethod(ChipmunkMethod.parse_params({"dense_steps": [0, 1, 10, 40], "schedule_steps": 50}))
    dense = [s for s in range(25) if method.is_dense_step(StepContext(s, 25, 1.0, 0, LAYOUT))]
    assert dense == [0, 1, 5, 20]


def test_column_mass_and_selection():
    q, k, _ = qkv(3)
    mass = column_mass_reference(q, k, 16)
    groups = -(-LAYOUT.seq_len // 16)
    assert mass.shape == (2, 3, groups, LAYOUT.seq_len)
    full_groups = LAYOUT.seq_len // 16
    torch.testing.assert_close(mass[:, :, :full_groups].sum(-1), torch.full((2, 3, full_groups), 16.0))
    columns, counts = select_columns(mass.clone(), LAYOUT, 0.05, 0.0)
    assert (counts == columns.shape[-1]).all()
    text = torch.arange(LAYOUT.text_start, LAYOUT.text_end)
    assert torch.isin(text, columns[0, 0, 0].long()).all()  # text keys always kept
    heaviest = mass[0, 0, 0].masked_fill(LAYOUT.is_text(), -1).argmax()
    assert heaviest in columns[0, 0, 0].tolist()
    # with random columns: each group's list ascends without repeats up to its count, then holds S
    top, _ = select_columns(mass.clone(), LAYOUT, 0.05, 0.0)
    columns, counts = select_columns(mass.clone(), LAYOUT, 0.05, 0.2, torch.Generator().manual_seed(0))
    assert columns.shape[-1] == top.shape[-1] + 45 and (counts > top.shape[-1]).all()
    for group, count in zip(columns.flatten(0, 2), counts.flatten()):
        listed = group[:count]
        assert (listed[1:] > listed[:-1]).all() and (group[count:] == LAYOUT.seq_len).all()
    assert all(torch.isin(t, c).all() for t, c in zip(top.flatten(0, 2), columns.flatten(0, 2)))


def test_chipmunk_parameters_are_checked():
    for params, words in (({"top_k": 0}, "top_k"), ({"voxel": [4, 4]}, "voxel"),
                          ({"dense_steps": [60]}, "dense_steps"), ({"random_fraction": 1.0}, "random_fraction")):
        with pytest.raises(ProfileError, match=words):
            load_profile({"method": "chipmunk", "params": params})


@pytest.mark.parametrize("videos", [1, 2])
def test_in_a_pipeline_every_column_kept_gives_the_dense_video(family_pipe, videos):
    """Batched CFG (CogVideoX), padded text (HunyuanVideo), and several videos per prompt."""
    _, pipe = family_pipe
    pipe.set_progress_bar_config(disable=True)
    dense = run_pipeline(pipe, num_videos_per_prompt=videos)
    profile = {"method": "chipmunk", "params": {"top_k": 1.0, "random_fraction": 0.0, "voxel": [1, 2, 2]}}
    with accelerate_pipeline(pipe, profile) as handle:
        out = run_pipeline(pipe, num_videos_per_prompt=videos)
        summary = handle.summary()
    assert summary["calls"]["chipmunk"] > 0 and summary["peak_state_bytes"] > 0
    assert (out - dense).abs().max() <= 1e-4 * dense.abs().max()
    with accelerate_pipeline(pipe, {**profile, "params": {**profile["params"], "top_k": 0.1}}):
        assert not torch.allclose(run_pipeline(pipe, num_videos_per_prompt=videos), dense, atol=1e-3)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=launches_kernel)])
def test_mlp_delta_with_every_unit_recomputed_is_the_feed_forward(backend):
    from vdit_sparse.context import FeedForwardCall
    from vdit_sparse.pipelines.base import gelu_feed_forward_site
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    module = FeedForward(24, mult=4, activation_fn="gelu-approximate").eval()
    site = gelu_feed_forward_site(0, "joint", module)
    method = ChipmunkMethod(ChipmunkMethod.parse_params({"mlp_top_k": 1.0, "mlp_block": 16, "dense_steps": [0],
                                                         "backend": backend}))
    state: dict = {}

    def ff_call(step):
        return FeedForwardCall(0, "joint", StepContext(step, 50, 1.0, 0, LAYOUT), state)

    with torch.no_grad():
        x0, x1, x2 = (torch.randn(2, 37, 24) for _ in range(3))  # 37 tokens: the last block is partial
        torch.testing.assert_close(method.feed_forward(site, x0, ff_call(0)), module(x0))  # dense: fills the cache
        for step, x in ((1, x1), (2, x2)):  # sparse steps: deltas on top of the updated cache
            assert (method.feed_forward(site, x, ff_call(step)) - module(x)).abs().max() <= 1e-5
        partial = ChipmunkMethod(ChipmunkMethod.parse_params({"mlp_top_k": 0.25, "mlp_block": 16, "dense_steps": [0],
                                                              "backend": backend}))
        state.clear()
        partial.feed_forward(site, x0, ff_call(0))
        assert state["units"].shape == (2, 3, 24)  # 3 blocks of 16 tokens, a quarter of 96 hidden units each
        out = partial.feed_forward(site, x1, ff_call(1))
        assert not torch.allclose(out, module(x1), atol=1e-3) and not torch.allclose(out, module(x0), atol=1e-3)


def test_in_a_pipeline_every_column_and_unit_kept_gives_the_dense_video(family_pipe):
    _, pipe = family_pipe
    dense = run_pipeline(pipe)
    params = {"top_k": 1.0, "random_fraction": 0.0, "voxel": [1, 2, 2], "mlp_top_k": 1.0, "mlp_block": 8}
    with accelerate_pipeline(pipe, {"method": "chipmunk", "params": params}) as handle:
        out = run_pipeline(pipe)
        with_mlp = handle.summary()["peak_state_bytes"]
    assert (out - dense).abs().max() <= 1e-4 * dense.abs().max()
    with accelerate_pipeline(pipe, {"method": "chipmunk", "params": {**params, "mlp_top_k": None}}) as handle:
        run_pipeline(pipe)
        assert handle.summary()["peak_state_bytes"] < with_mlp  # the feed-forward caches were in use


@launches_kernel
@pytest.mark.parametrize("dtype, groups_per_program", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 2)])
def test_the_column_mass_kernel_matches_its_reference(dtype, groups_per_program):
    from vdit_sparse.kernels.column_mass import column_mass
    from vdit_sparse.kernels.reference import block_sparse_attention_reference
    from vdit_sparse.plan import dense_plan

    q, k, v = (t.to(dtype) for t in qkv(4))
    padding = padding_mask()
    rows = torch.randperm(LAYOUT.seq_len, generator=torch.Generator().manual_seed(0))[:150]  # 150 rows: a partial group
    plan = dense_plan(LAYOUT.seq_len, 3, 16, 16, "cpu")
    _, lse = block_sparse_attention_reference(q, k, v, plan.kv_block_indices, plan.kv_block_counts, block_m=16,
                                              block_n=16, key_padding_mask=padding, return_lse=True)
    got = column_mass(q[:, :, rows], k, lse[:, :, rows], 48, key_padding_mask=padding, block_m=16, block_n=32,
                      groups_per_program=groups_per_program)
    expected = column_mass_reference(q[:, :, rows].float(), k.float(), 48, padding)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    assert got[..., ~padding[1]][1].abs().max() == 0  # masked keys get no mass


def test_under_true_cfg_each_call_keeps_its_own_cache(monkeypatch):
    """HunyuanVideo's true CFG calls the transformer twice a step: two caches, and everything kept is still dense."""
    from vdit_sparse.embedded import build_embedded_pipeline

    pipe = build_embedded_pipeline("hunyuan-video", seed=0)
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(true_cfg_scale=2.0, negative_prompt="blurry")
    dense = run_pipeline(pipe, **cfg)
    seen, real_attend = [], ChipmunkMethod.attend

    def attend(self, q, k, v, call):
        seen.append((call.step.step_index, call.step.call_kind, "o_cache" in call.state))
        return real_attend(self, q, k, v, call)

    monkeypatch.setattr(ChipmunkMethod, "attend", attend)
    params = {"top_k": 1.0, "random_fraction": 0.0, "voxel": [1, 2, 2], "dense_steps": [0], "schedule_steps": 4}
    with accelerate_pipeline(pipe, {"method": "chipmunk", "params": params}):
        out = run_pipeline(pipe, **cfg)
    assert {kind for _, kind, _ in seen} == {0, 1}
    assert all(cached for step, _, cached in seen if step > 0)  # both calls read their own cache after step 0
    assert (out - dense).abs().max() <= 1e-4 * dense.abs().max()


def test_caches_in_host_memory_give_the_same_video(family_pipe, monkeypatch):
    from vdit_sparse.context import Slot

    _, pipe = family_pipe
    params = {"top_k": 0.2, "voxel": [1, 2, 2], "dense_steps": [0], "schedule_steps": 4}
    offloaded, fetched, real_offload, real_fetch = [], [], Slot.offload, Slot.fetch

    def offload(self, name, tensor):
        offloaded.append(name)
        real_offload(self, name, tensor)

    def fetch(self, name):
        fetched.append((name, type(self[name]).__name__))
        return real_fetch(self, name)

    monkeypatch.setattr(Slot, "offload", offload)
    monkeypatch.setattr(Slot, "fetch", fetch)
    outs = []
    for where in ("device", "cpu"):
        offloaded.clear(), fetched.clear()
        with accelerate_pipeline(pipe, {"method": "chipmunk", "params": {**params, "cache_device": where}}) as handle:
            outs.append(run_pipeline(pipe))
            layers = handle.num_layers
        kinds = {kind for _, kind in fetched}
        if where == "cpu":
            assert sorted(set(offloaded)) == ["columns", "o_cache"] and kinds == {"Offloaded"}
            assert len(offloaded) == 2 * len(fetched) // 6  # filled once, read on 3 sparse steps
        else:
            assert not offloaded and kinds == {"Tensor"}
        assert len(fetched) >= 2 * 3 * layers
    assert torch.equal(outs[0], outs[1])


@launches_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu, bias", [("tanh", True), ("none", False)])
def test_the_mlp_delta_kernels_match_their_references(dtype, gelu, bias):
    """The FlashAttention ratio rule: the kernel's error against the float64 reference is at most twice that of
    the same PyTorch in the inputs' dtype, plus a small absolute slack."""
    from vdit_sparse.kernels.mlp_delta import mlp_delta_down, mlp_delta_up
    from vdit_sparse.kernels.reference import mlp_delta_down_reference, mlp_delta_up_reference

    gen = torch.Generator().manual_seed(0)
    batch, tokens, features, hidden, out_features, block = 2, 45, 40, 96, 24, 16  # 3 blocks, the last partial
    x = torch.randn(batch, tokens, features, generator=gen)
    w_up, b_up = torch.randn(hidden, features, generator=gen) / 6, torch.randn(hidden, generator=gen) if bias else None
    w_down_t = torch.randn(hidden, out_features, generator=gen) / 10
    units = torch.stack([torch.randperm(hidden, generator=gen)[:20] for _ in range(batch * 3)]).view(batch, 3, 20)
    activation = torch.randn(batch, 3, block, hidden, generator=gen)
    out = torch.randn(batch, tokens, out_features, generator=gen)

    def run(kind, cast):
        args = [t.to(cast) if t is not None and t.is_floating_point() else t for t in (x, w_up, b_up, w_down_t)]
        act, result = activation.to(cast).clone(), out.to(cast).clone()
        if kind == "kernel":
            delta = mlp_delta_up(args[0], args[1], args[2], units.to(torch.int32), act, gelu)
            mlp_delta_down(delta, args[3], units.to(torch.int32), result)
        else:
            delta = mlp_delta_up_reference(args[0], args[1], args[2], units, act, gelu)
            mlp_delta_down_reference(delta, args[3], units, result)
        return delta.double(), act.double(), result.double()

    exact = run("reference", torch.float64)
    kernel, same_dtype = run("kernel", dtype), run("reference", dtype)
    for got, baseline, truth in zip(kernel, same_dtype, exact):
        slack = 1e-5 if dtype == torch.float32 else 1e-2
        assert (got - truth).abs().max() <= 2 * (baseline - truth).abs().max() + slack * truth.abs().max()
    untouched = torch.ones(batch, 3, hidden, dtype=torch.bool).scatter_(-1, units, False)
    assert torch.equal(kernel[1].permute(0, 1, 3, 2)[untouched], activation.to(dtype).double().permute(0, 1, 3, 2)[untouched])


def test_hunyuan_single_stream_mlps_are_computed_by_the_method_and_handed_back(monkeypatch):
    """The single-stream blocks inline their MLP (proj_mlp, act_mlp, then proj_out over [attention | MLP]):
    the method computes it there too, exactly with every unit kept, and remove() takes the hooks away."""
    from vdit_sparse.embedded import build_embedded_pipeline

    pipe = build_embedded_pipeline("hunyuan-video", seed=0)
    pipe.set_progress_bar_config(disable=True)
    dense = run_pipeline(pipe)
    streams, real = [], ChipmunkMethod.feed_forward

    def feed_forward(self, site, x, call):
        streams.append((call.step.step_index, site.stream))
        return real(self, site, x, call)

    monkeypatch.setattr(ChipmunkMethod, "feed_forward", feed_forward)
    single = pipe.transformer.single_transformer_blocks[0]
    parts = (single.proj_mlp, single.act_mlp, single.proj_out)
    forwards = [part.forward for part in parts]
    params = {"top_k": 1.0, "random_fraction": 0.0, "voxel": [1, 2, 2], "mlp_top_k": 1.0, "mlp_block": 8,
              "dense_steps": [0], "schedule_steps": 4}
    handle = accelerate_pipeline(pipe, {"method": "chipmunk", "params": params})
    out = run_pipeline(pipe)
    assert (out - dense).abs().max() <= 1e-4 * dense.abs().max()
    joint = [step for step, stream in streams if stream == "joint"]
    assert len(joint) == 4 * len(pipe.transformer.single_transformer_blocks) and set(joint) == {0, 1, 2, 3}
    handle.remove()
    assert [part.forward for part in parts] == forwards and not any(hasattr(p, "_diffusers_hook") for p in parts)
    assert torch.equal(run_pipeline(pipe), dense)
