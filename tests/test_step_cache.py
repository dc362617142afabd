"""Step caching: scheduled steps reuse the block stack's output of the last computed step."""

from __future__ import annotations

import pytest
import torch

from conftest import run_pipeline
from vdit_sparse import accelerate_pipeline
from vdit_sparse.pipelines import find_adapter
from vdit_sparse.profile import ProfileError, load_profile

STEPS = 4  # DEMO_CALL_ARGS' num_inference_steps


def watch_last_block(pipe) -> tuple[list, object]:
    """(the outputs the transformer's last block returns, in call order; the hook to remove)."""
    outputs = []
    last = find_adapter(pipe).blocks(pipe.transformer)[-1]
    hook = last.register_forward_hook(lambda module, args, output: outputs.append(tuple(output)))
    return outputs, hook


def test_skipped_steps_reuse_the_last_computed_block_output(family_pipe):
    _, pipe = family_pipe
    pipe.set_progress_bar_config(disable=True)
    dense = run_pipeline(pipe)
    outputs, hook = watch_last_block(pipe)
    profile = {"method": "dense", "step_cache": {"skip_steps": [2, 3], "schedule_steps": STEPS}}
    try:
        with accelerate_pipeline(pipe, profile) as handle:
            out = run_pipeline(pipe)
            calls = dict(handle.stats.calls)
            layers = handle.num_layers
    finally:
        hook.remove()
    forwards = len(outputs) // STEPS  # forwards per step (CogVideoX batches its CFG: one)
    assert len(outputs) == forwards * STEPS
    computed = outputs[forwards * 1 : forwards * 2]  # step 1, the last computed one
    for skipped in (outputs[forwards * 2 : forwards * 3], outputs[forwards * 3 :]):
        for mine, kept in zip(skipped, computed):
            assert all(a is b for a, b in zip(mine, kept))  # the very tensors of step 1
    assert calls == {"dense": 2 * forwards * layers, "step_cache": 2 * forwards * layers}
    assert not torch.allclose(out, dense, atol=1e-4)  # skipping changes the video
    assert torch.isfinite(out).all()


def test_under_true_cfg_each_call_kind_reuses_its_own_output():
    from vdit_sparse.embedded import build_embedded_pipeline

    pipe = build_embedded_pipeline("hunyuan-video", seed=0)
    pipe.set_progress_bar_config(disable=True)
    outputs, hook = watch_last_block(pipe)
    profile = {"method": "dense", "step_cache": {"skip_steps": [3], "schedule_steps": STEPS}}
    try:
        with accelerate_pipeline(pipe, profile):
            run_pipeline(pipe, true_cfg_scale=2.0, negative_prompt="blurry")
    finally:
        hook.remove()
    assert len(outputs) == 2 * STEPS  # conditional and unconditional call each step
    cond, uncond = outputs[4], outputs[5]  # step 2
    assert not torch.equal(cond[0], uncond[0])
    assert outputs[6][0] is cond[0] and outputs[7][0] is uncond[0]


def test_a_step_a_method_must_compute_is_not_skipped(family_pipe):
    _, pipe = family_pipe
    pipe.set_progress_bar_config(disable=True)
    params = {"top_k": 0.2, "voxel": [1, 2, 2], "dense_steps": [0, 2], "schedule_steps": STEPS}
    profile = {"method": "chipmunk", "params": params, "step_cache": {"skip_steps": [2, 3], "schedule_steps": STEPS}}
    with accelerate_pipeline(pipe, profile) as handle:
        run_pipeline(pipe)
        calls, layers = handle.stats.calls, handle.num_layers
    forwards = calls["step_cache"] // layers
    assert calls == {"chipmunk": 3 * forwards * layers, "step_cache": forwards * layers}  # step 2 refreshes, 3 skips


def test_remove_takes_the_block_hooks_away(family_pipe):
    _, pipe = family_pipe
    pipe.set_progress_bar_config(disable=True)
    reference = run_pipeline(pipe)
    blocks = find_adapter(pipe).blocks(pipe.transformer)
    forwards = [block.forward for block in blocks]
    handle = accelerate_pipeline(pipe, {"method": "dense", "step_cache": {"skip_steps": [1, 2, 3], "schedule_steps": 4}})
    assert not torch.equal(run_pipeline(pipe), reference)
    handle.remove()
    assert [block.forward for block in blocks] == forwards
    assert all(not hasattr(block, "_diffusers_hook") for block in blocks)
    assert torch.equal(run_pipeline(pipe), reference)


def test_skip_steps_scale_with_the_step_count():
    resolved = load_profile({"method": "dense", "step_cache": {"skip_steps": [7, 11, 13], "schedule_steps": 50}})
    assert resolved.skip_steps(50) == {7, 11, 13}
    assert resolved.skip_steps(25) == {4, 6, 7}  # floor(s / 2 + 1/2)
    assert load_profile({"method": "dense"}).skip_steps(50) == set()


@pytest.mark.parametrize("cache, words", [
    ({"skip_steps": [0]}, "step 0 has no step before it"),
    ({"skip_steps": [50]}, "step_cache.skip_steps"),
    ({"skip_steps": [3], "schedule_steps": 0}, "step_cache.schedule_steps"),
    ({"skip_step": [3]}, "skip_step"),
])
def test_bad_step_cache_fields_are_refused_by_name(cache, words):
    with pytest.raises(ProfileError, match=words):
        load_profile({"method": "dense", "step_cache": cache})
