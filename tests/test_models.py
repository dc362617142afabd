"""The families beyond the first two, and image-to-video, on their embedded pipelines: Wan 2.1 and 2.2 (two
experts), HunyuanVideo 1.5, CogVideoX image-to-video."""

from __future__ import annotations

import pytest
import torch

from conftest import run_pipeline
from vdit_sparse import accelerate_pipeline
from vdit_sparse.api import AccelerationHandle
from vdit_sparse.embedded import build_embedded_pipeline
from vdit_sparse.pipelines import find_adapter
from vdit_sparse.profile import ProfileError, load_profile

STEPS = 4  # DEMO_CALL_ARGS' num_inference_steps
MODELS = [("wan", "2.1"), ("wan", "2.2"), ("wan", "2.1-i2v"), ("wan", "2.2-i2v"), ("hunyuan-video-1.5", "t2v"),
          ("hunyuan-video-1.5", "i2v"), ("cogvideox", "5b-i2v"), ("hunyuan-video", "i2v"), ("wan", "2.1-vace")]
OTHER_FAMILY = {"wan": "hunyuan-video", "hunyuan-video-1.5": "hunyuan-video", "cogvideox": "wan2.1-14b",
                "hunyuan-video": "wan2.1-14b"}

# Each method at a setting that keeps everything (must equal dense) and at one that drops work.
METHODS = {
    "sliding_frames": ({"window_frames": 100, "block_size": 16}, {"window_frames": 0, "block_size": 16}),
    "svg": ({"density": 1.0, "block_size": 16}, {"density": 0.2, "block_size": 16}),
    "svdit": ({"mode": "diagonal", "density": 1.0, "block_size": 16}, {"mode": "diagonal", "density": 0.2, "block_size": 16}),
    "chipmunk": ({"top_k": 1.0, "random_fraction": 0.0, "voxel": [1, 2, 2], "mlp_top_k": 1.0, "mlp_block": 16},
                 {"top_k": 0.1, "voxel": [1, 2, 2], "mlp_top_k": 0.25, "mlp_block": 16, "dense_steps": [0],
                  "schedule_steps": STEPS}),
}


@pytest.fixture(scope="module", params=MODELS, ids=["-".join(m) for m in MODELS])
def model(request):
    """(family, variant, pipeline), one build per model."""
    family, variant = request.param
    pipe = build_embedded_pipeline(family, variant=variant, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return family, variant, pipe


@pytest.fixture(scope="module")
def dense_latents(model):
    return run_pipeline(model[2])


def layers_per_forward(pipe) -> int:
    adapter = find_adapter(pipe)
    return len(adapter.attention_modules(adapter.transformers(pipe)[0]))  # 2 (4 for HunyuanVideo's two kinds)


def forwards_per_step(family: str) -> int:
    # CogVideoX batches its CFG and HunyuanVideo embeds its guidance; the others call twice a step
    return 1 if family in ("cogvideox", "hunyuan-video") else 2


def test_the_adapter_takes_every_expert(model):
    family, variant, pipe = model
    adapter = find_adapter(pipe)
    experts = 2 if variant.startswith("2.2") else 1
    assert adapter.family == family and len(adapter.transformers(pipe)) == experts
    assert len(adapter.attention_layers(pipe)) == experts * layers_per_forward(pipe)
    expected = {"wan": "wan2.2-a14b" if experts == 2 else "wan2.1-1.3b", "cogvideox": "cogvideox-5b",
                "hunyuan-video-1.5": "hunyuan-video-1.5", "hunyuan-video": "hunyuan-video"}[family]
    assert adapter.default_profile(pipe) == expected


def test_the_dense_profile_is_exact_and_remove_restores_bit_for_bit(model, dense_latents):
    family, _, pipe = model
    transformers = find_adapter(pipe).transformers(pipe)
    processors = [dict(t.attn_processors) for t in transformers]
    with accelerate_pipeline(pipe, "dense") as handle:
        assert torch.equal(run_pipeline(pipe), dense_latents)
        assert handle.stats.calls == {"dense": layers_per_forward(pipe) * forwards_per_step(family) * STEPS}
    handle = accelerate_pipeline(pipe, {"method": "svg", "params": METHODS["svg"][1]})
    assert not torch.equal(run_pipeline(pipe), dense_latents)
    handle.remove()
    assert [dict(t.attn_processors) for t in transformers] == processors
    assert all(not hasattr(t, "_vdit_sparse_handle") for t in transformers)
    assert torch.equal(run_pipeline(pipe), dense_latents)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_keeping_everything_is_dense_and_otherwise_differs(model, dense_latents, method):
    _, _, pipe = model
    keep_all, sparse = METHODS[method]
    with accelerate_pipeline(pipe, {"method": method, "params": keep_all}) as handle:
        full = run_pipeline(pipe)
        assert handle.stats.calls.get(method, 0) > 0
    assert (full - dense_latents).abs().max() <= 1e-4 * dense_latents.abs().max()
    with accelerate_pipeline(pipe, {"method": method, "params": sparse}) as handle:
        out = run_pipeline(pipe)
        assert handle.stats.computed_fraction < 1.0 or method == "chipmunk"  # chipmunk's refresh steps add work
    assert torch.isfinite(out).all() and not torch.allclose(out, dense_latents, atol=1e-4)


def test_the_step_index_is_right_in_every_call(model, monkeypatch):
    """Separate conditional and unconditional calls, and for Wan 2.2 the switch between experts."""
    family, variant, pipe = model
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
    kinds = range(forwards_per_step(family))
    assert [(step, kind) for _, step, kind in seen] == [(s, k) for s in range(STEPS) for k in kinds]
    experts = [expert for expert, _, _ in seen]
    if variant.startswith("2.2"):  # the high-noise expert first, then the low-noise one; its layers come after
        switch = experts.index(1)
        assert 0 < switch < len(experts) and set(experts[switch:]) == {1} and set(experts[:switch]) == {0}
        assert sorted(set(layers)) == [0, 1, 2, 3] and layers[2 * switch :] == [2, 3] * (len(experts) - switch)
    else:
        assert set(experts) == {0} and sorted(set(layers)) == list(range(layers_per_forward(pipe)))


def test_step_caching_reuses_the_block_output(model, dense_latents):
    family, variant, pipe = model
    profile = {"method": "dense", "step_cache": {"skip_steps": [2], "schedule_steps": STEPS}}
    if variant == "2.1-vace":  # the control hints join between blocks: a reused output would take them twice
        with pytest.raises(ProfileError, match="step_cache.*WanVACETransformer3DModel.*control hints"):
            accelerate_pipeline(pipe, profile)
        return
    with accelerate_pipeline(pipe, profile) as handle:
        out = run_pipeline(pipe)
        assert handle.stats.calls["step_cache"] == forwards_per_step(family) * layers_per_forward(pipe)  # step 2
    assert torch.isfinite(out).all() and not torch.equal(out, dense_latents)


def test_a_profile_for_another_family_or_size_is_refused_by_name(model):
    family, _, pipe = model
    other = load_profile(OTHER_FAMILY[family]).profile.model.family
    with pytest.raises(ProfileError, match=f"'{other}'.*'{family}'"):
        accelerate_pipeline(pipe, OTHER_FAMILY[family])
    with pytest.raises(ProfileError, match="40 attention layers"):
        accelerate_pipeline(pipe, {"model": {"family": family, "num_layers": 40}, "method": "dense"})


def test_the_adapter_decodes_final_latents_as_the_pipeline_does(model, dense_latents):
    """What the quality harness decodes (the adapter's decode_latents) equals the pipeline's own decoded frames."""
    from conftest import PROMPT, embedded_kind
    from vdit_sparse.embedded import demo_call_args
    from vdit_sparse.evaluate import _decode_latents

    _, _, pipe = model
    call_args = demo_call_args(*embedded_kind(pipe))
    frames = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **call_args).frames
    torch.testing.assert_close(torch.as_tensor(_decode_latents(pipe, dense_latents, call_args)), torch.as_tensor(frames),
                               rtol=0, atol=1e-5)
