"""accelerate_pipeline on the embedded CogVideoX and HunyuanVideo pipelines.

Exactness where it is promised (dense profile, removal, a full mask), change
where it is not, and proof that warm-up steps and dense layers really run dense.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_pipeline
from vdit_sparse import accelerate_pipeline

STEPS = 4  # DEMO_CALL_ARGS' num_inference_steps


def record_steps(handle) -> list[tuple[int, int]]:
    """(step index, call kind) of every transformer forward the handle sees from now on."""
    seen = []
    begin = handle._begin_forward

    def spy(*args):
        begin(*args)
        seen.append((handle._step.step_index, handle._step.call_kind))

    handle._begin_forward = spy
    return seen


def sparse_profile(window_frames: int, **extra) -> dict:
    return {"name": f"window-{window_frames}", "method": "sliding_frames",
            "params": {"window_frames": window_frames, "block_size": 16, "backend": "reference"}, **extra}


def test_dense_profile_reproduces_unaccelerated_output_exactly(family_pipe):
    _, pipe = family_pipe
    reference = run_pipeline(pipe)
    with accelerate_pipeline(pipe, "dense") as handle:
        output = run_pipeline(pipe)
        assert handle.stats.calls == {"dense": STEPS * handle.num_layers}
    assert (output - reference).abs().max().item() == 0.0


def test_remove_restores_the_pipeline_bit_for_bit(family_pipe):
    _, pipe = family_pipe
    processors = {name: proc for name, proc in pipe.transformer.attn_processors.items()}
    forward = pipe.transformer.forward
    reference = run_pipeline(pipe)
    handle = accelerate_pipeline(pipe, sparse_profile(0))
    assert not torch.equal(run_pipeline(pipe), reference)
    handle.remove()
    assert pipe.transformer.attn_processors == processors
    assert pipe.transformer.forward == forward
    assert torch.equal(run_pipeline(pipe), reference)
    handle.remove()  # a second remove is a no-op
    accelerate_pipeline(pipe, "dense").remove()  # and the pipeline can be accelerated again


def test_reference_sparse_path_with_a_full_mask_equals_dense(family_pipe):
    _, pipe = family_pipe
    reference = run_pipeline(pipe)
    with accelerate_pipeline(pipe, sparse_profile(window_frames=1000)) as handle:
        output = run_pipeline(pipe)
        assert handle.stats.calls == {"sliding_frames": STEPS * handle.num_layers}
        assert handle.stats.computed_fraction == 1.0
    assert (output - reference).abs().max().item() <= 1e-5


def test_sparse_profile_changes_the_output_and_keeps_it_finite(family_pipe):
    _, pipe = family_pipe
    reference = run_pipeline(pipe)
    with accelerate_pipeline(pipe, sparse_profile(window_frames=0)) as handle:
        output = run_pipeline(pipe)
        assert handle.stats.computed_fraction < 0.6
    assert torch.isfinite(output).all()
    assert (output - reference).abs().max().item() > 1e-3


def test_one_handle_serves_another_resolution_and_frame_count(family_pipe):
    family, pipe = family_pipe
    other = {"height": 48, "width": 64, "num_frames": 5 if family == "cogvideox" else 9}
    with accelerate_pipeline(pipe, sparse_profile(window_frames=0)) as handle:
        first = run_pipeline(pipe)
        second = run_pipeline(pipe, **other)
        assert handle.stats.calls == {"sliding_frames": STEPS * handle.num_layers}
    dense_second = run_pipeline(pipe, **other)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert second.shape == dense_second.shape and second.shape != first.shape
    assert not torch.equal(second, dense_second)


def test_warmup_steps_and_dense_layers_run_dense(family_pipe):
    _, pipe = family_pipe
    profile = sparse_profile(0, dense_warmup_steps=2, dense_layers=[0])
    with accelerate_pipeline(pipe, profile) as handle:
        seen = record_steps(handle)
        run_pipeline(pipe)
        layers = handle.num_layers
        warm, sparse = 2, STEPS - 2
        assert seen == [(i, 0) for i in range(STEPS)]
        assert handle.stats.calls == {"dense": warm * layers + sparse * 1, "sliding_frames": sparse * (layers - 1)}


def test_warmup_fraction_and_per_layer_override(family_pipe):
    _, pipe = family_pipe
    profile = sparse_profile(0, dense_warmup_fraction=0.25, layers={1: {"method": "dense", "sensitivity": 0.2}})
    with accelerate_pipeline(pipe, profile) as handle:
        run_pipeline(pipe)
        layers = handle.num_layers
        # 0.25 of 4 steps = 1 warm-up step; layer 1 always dense.
        assert handle.stats.calls == {"dense": layers + 3, "sliding_frames": 3 * (layers - 1)}


def test_stats_describe_the_last_run(family_pipe):
    _, pipe = family_pipe
    with accelerate_pipeline(pipe, sparse_profile(0)) as handle:
        run_pipeline(pipe)
        run_pipeline(pipe)
        summary = handle.summary()
    assert summary["calls"] == {"sliding_frames": STEPS * summary["num_layers"]}
    assert 0.0 < summary["computed_fraction"] < 1.0


def test_true_cfg_calls_share_the_step_and_differ_in_call_kind():
    from vdit_sparse.embedded import build_embedded_pipeline

    pipe = build_embedded_pipeline("hunyuan-video", seed=0)
    with accelerate_pipeline(pipe, sparse_profile(0, dense_warmup_steps=1)) as handle:
        seen = record_steps(handle)
        output = run_pipeline(pipe, true_cfg_scale=2.0, negative_prompt="blurry")
        layers = handle.num_layers
        assert seen == [(step, kind) for step in range(STEPS) for kind in (0, 1)]
        assert handle.stats.calls == {"dense": 2 * layers, "sliding_frames": 2 * (STEPS - 1) * layers}
    assert torch.isfinite(output).all()


def interrupt_after(step: int):
    """A ``callback_on_step_end`` that stops the call after ``step``, before the pipeline resets its hooks."""

    def stop(pipe, step_index, timestep, callback_kwargs):
        if step_index == step:
            raise KeyboardInterrupt
        return callback_kwargs

    return stop


def test_a_call_interrupted_midway_does_not_leak_into_the_next(family_pipe):
    _, pipe = family_pipe
    profile = sparse_profile(0, dense_warmup_steps=1)
    with accelerate_pipeline(pipe, profile) as handle:
        expected = run_pipeline(pipe)
        calls = dict(handle.stats.calls)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(pipe, callback_on_step_end=interrupt_after(1))
        output = run_pipeline(pipe)
        assert handle.stats.calls == calls
    assert torch.equal(output, expected)


def test_a_call_interrupted_in_its_first_step_does_not_leak_into_the_next(family_pipe):
    """Without ``handle.reset()``: the next call's new scheduler timesteps start a new run."""
    _, pipe = family_pipe
    profile = {"name": "svg-reprofile-5", "method": "svg",
               "params": {"density": 0.3, "reprofile_every": 5, "block_size": 16, "backend": "reference"}}
    with accelerate_pipeline(pipe, profile) as handle:
        expected = run_pipeline(pipe)
        summary = handle.summary()
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(pipe, seed=1, callback_on_step_end=interrupt_after(0))  # other inputs, other head decisions
        output = run_pipeline(pipe)
        assert handle.summary() == summary
    assert torch.equal(output, expected)


def test_hunyuan_video_in_bf16_runs_exactly_its_warm_up_steps_dense():
    """Its pipeline casts the timestep to bf16, where steps 1 and 2 of 50 round to one value."""
    from vdit_sparse.embedded import build_embedded_pipeline

    pipe = build_embedded_pipeline("hunyuan-video", seed=0, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    steps = 50
    with accelerate_pipeline(pipe, sparse_profile(0, dense_warmup_steps=2, dense_layers=[0])) as handle:
        seen = record_steps(handle)
        run_pipeline(pipe, num_inference_steps=steps)
        layers = handle.num_layers
        assert [step for step, _ in seen] == list(range(steps))
        sparse_steps = steps - 2
        assert handle.stats.calls == {"dense": 2 * layers + sparse_steps, "sliding_frames": sparse_steps * (layers - 1)}


def test_reset_starts_a_new_run(family_pipe):
    _, pipe = family_pipe
    with accelerate_pipeline(pipe, sparse_profile(0)) as handle:
        seen = record_steps(handle)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(pipe, callback_on_step_end=interrupt_after(0))
        handle.reset()
        run_pipeline(pipe)
        assert seen[0] == (0, 0) and seen[1:] == [(i, 0) for i in range(STEPS)]
