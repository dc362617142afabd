"""Wan 2.1 and 2.2 (two experts), text- and image-to-video, on the embedded pipelines."""

from __future__ import annotations

import pytest
import torch

from conftest import run_pipeline
from vdit_sparse import accelerate_pipeline
from vdit_sparse.api import AccelerationHandle
from vdit_sparse.embedded import build_embedded_pipeline
from vdit_sparse.pipelines import find_adapter
from vdit_sparse.profile import ProfileError

STEPS = 4  # DEMO_CALL_ARGS' num_inference_steps
VARIANTS = ["2.1", "2.2", "2.1-i2v", "2.2-i2v"]

# Each method at a setting that keeps everything (must equal dense) and at one that drops work.
METHODS = {
    "sliding_frames": ({"window_frames": 100, "block_size": 16}, {"window_frames": 0, "block_size": 16}),
    "svg": ({"density": 1.0, "block_size": 16}, {"density": 0.2, "block_size": 16}),
    "svdit": ({"mode": "diagonal", "density": 1.0, "block_size": 16}, {"mode": "diagonal", "density": 0.2, "block_size": 16}),
    "chipmunk": ({"top_k": 1.0, "random_fraction": 0.0, "voxel": [1, 2, 2], "mlp_top_k": 1.0, "mlp_block": 16},
                 {"top_k": 0.1, "voxel": [1, 2, 2], "mlp_top_k": 0.25, "mlp_block": 16, "dense_steps": [0],
                  "schedule_steps": STEPS}),
}


@pytest.fixture(scope="module", params=VARIANTS)
def wan(request):
    """(variant, pipeline), one build per variant."""
    pipe = build_embedded_pipeline("wan", variant=request.param, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


@pytest.fixture(scope="module")
def dense_latents(wan):
    return run_pipeline(wan[1])


def test_the_adapter_takes_every_expert(wan):
    variant, pipe = wan
    adapter = find_adapter(pipe)
    experts = 2 if variant.startswith("2.2") else 1
    assert adapter.family == "wan" and len(adapter.transformers(pipe)) == experts
    assert len(adapter.attention_layers(pipe)) == 2 * experts  # each embedded expert has 2 blocks
    assert adapter.default_profile(pipe) == ("wan2.2-a14b" if experts == 2 else "wan2.1-1.3b")


def test_the_dense_profile_is_exact_and_remove_restores_bit_for_bit(wan, dense_latents):
    _, pipe = wan
    transformers = find_adapter(pipe).transformers(pipe)
    processors = [dict(t.attn_processors) for t in transformers]
    with accelerate_pipeline(pipe, "dense") as handle:
        assert torch.equal(run_pipeline(pipe), dense_latents)
        assert handle.stats.calls == {"dense": 2 * 2 * STEPS}  # 2 layers, a cond and an uncond call a step
    handle = accelerate_pipeline(pipe, {"method": "svg", "params": METHODS["svg"][1]})
    assert not torch.equal(run_pipeline(pipe), dense_latents)
    handle.remove()
    assert [dict(t.attn_processors) for t in transformers] == processors
    assert all(not hasattr(t, "_vdit_sparse_handle") for t in transformers)
    assert torch.equal(run_pipeline(pipe), dense_latents)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_keeping_everything_is_dense_and_otherwise_differs(wan, dense_latents, method):
    _, pipe = wan
    keep_all, sparse = METHODS[method]
    with accelerate_pipeline(pipe, {"method": method, "params": keep_all}) as handle:
        full = run_pipeline(pipe)
        assert handle.stats.calls.get(method, 0) > 0
    assert (full - dense_latents).abs().max() <= 1e-4 * dense_latents.abs().max()
    with accelerate_pipeline(pipe, {"method": method, "params": sparse}) as handle:
        out = run_pipeline(pipe)
        assert handle.stats.computed_fraction < 1.0 or method == "chipmunk"  # chipmunk's refresh steps add work
    assert torch.isfinite(out).all() and not torch.allclose(out, dense_latents, atol=1e-4)


def test_the_step_index_is_right_in_every_call(wan, monkeypatch):
    """Separate conditional and unconditional calls, and for Wan 2.2 the switch between experts."""
    variant, pipe = wan
    seen, begin = [], AccelerationHandle._begin_forward

    def record(self, transformer, args, kwargs):
        begin(self, transformer, args, kwargs)
        seen.append((self.transformers.index(transformer), self._step.step_index, self._step.call_kind))

    monkeypatch.setattr(AccelerationHandle, "_begin_forward", record)
    layers = []
    with accelerate_pipeline(pipe, {"method": "svg", "params": METHODS["svg"][1]}) as handle:
        real_attend = handle.attend
        handle.attend = lambda q, k, v, call: layers.append(call.layer_index) or real_attend(q, k, v, call)
        run_pipeline(pipe)
    assert [(step, kind) for _, step, kind in seen] == [(s, k) for s in range(STEPS) for k in (0, 1)]
    experts = [expert for expert, _, _ in seen]
    if variant.startswith("2.2"):  # the high-noise expert first, then the low-noise one; its layers come after
        switch = experts.index(1)
        assert 0 < switch < len(experts) and set(experts[switch:]) == {1} and set(experts[:switch]) == {0}
        assert sorted(set(layers)) == [0, 1, 2, 3] and layers[2 * switch :] == [2, 3] * (len(experts) - switch)
    else:
        assert set(experts) == {0} and sorted(set(layers)) == [0, 1]


def test_step_caching_reuses_the_block_output(wan, dense_latents):
    _, pipe = wan
    profile = {"method": "dense", "step_cache": {"skip_steps": [2], "schedule_steps": STEPS}}
    with accelerate_pipeline(pipe, profile) as handle:
        out = run_pipeline(pipe)
        assert handle.stats.calls["step_cache"] == 2 * 2  # step 2's two calls, 2 layers each
    assert torch.isfinite(out).all() and not torch.equal(out, dense_latents)


def test_a_profile_for_another_family_or_size_is_refused_by_name(wan):
    _, pipe = wan
    with pytest.raises(ProfileError, match="'hunyuan-video'.*'wan'"):
        accelerate_pipeline(pipe, "hunyuan-video")
    with pytest.raises(ProfileError, match="attention layers"):
        accelerate_pipeline(pipe, "wan2.1-14b")  # 40 layers; the embedded model has 2 (or 4)
