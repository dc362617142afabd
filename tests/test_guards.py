"""Misuse of accelerate_pipeline is refused with a message that says what to do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vdit_sparse import ProfileError, accelerate_pipeline
from vdit_sparse.api import StepTracker
from vdit_sparse.embedded import build_embedded_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_embedded_pipeline("cogvideox", seed=0)


def test_second_application_is_refused(pipe):
    with accelerate_pipeline(pipe, "dense"):
        with pytest.raises(RuntimeError, match="already been applied.*'dense'.*remove"):
            accelerate_pipeline(pipe, "sliding-frames")


def test_compiled_transformer_is_refused(pipe):
    original = pipe.transformer
    pipe.transformer = torch.compile(original)
    try:
        with pytest.raises(RuntimeError, match="torch.compile"):
            accelerate_pipeline(pipe, "dense")
    finally:
        pipe.transformer = original


def test_unsupported_pipeline_is_refused():
    class SomeImagePipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="unsupported pipeline SomeImagePipeline.*CogVideoXPipeline.*HunyuanVideoPipeline"):
        accelerate_pipeline(SomeImagePipeline(), "dense")


def test_pipeline_without_transformer_is_refused():
    class UNetPipeline:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="no `transformer`"):
        accelerate_pipeline(UNetPipeline(), "dense")


def test_supported_pipeline_with_foreign_transformer_is_refused(pipe):
    class CogVideoXPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="transformer of class Linear.*CogVideoXTransformer3DModel"):
        accelerate_pipeline(CogVideoXPipeline(), "dense")


def test_profile_for_a_bigger_model_is_refused(pipe):
    with pytest.raises(ProfileError, match="42 attention layers, but this transformer has 2"):
        accelerate_pipeline(pipe, {"method": "dense", "model": {"num_layers": 42}})
    with pytest.raises(ProfileError, match="48 attention heads, but this transformer has 4"):
        accelerate_pipeline(pipe, {"method": "dense", "model": {"num_heads": 48}})
    # nothing was installed by the refused calls
    accelerate_pipeline(pipe, "dense").remove()


def pipe_with_schedule(timesteps) -> SimpleNamespace:
    """What StepTracker reads of a pipeline: its scheduler's timesteps and its current (full-precision) timestep."""
    return SimpleNamespace(scheduler=SimpleNamespace(timesteps=torch.as_tensor(timesteps)), current_timestep=None)


def test_step_tracker_matches_bf16_timesteps_to_the_schedule():
    pipe = pipe_with_schedule([999, 979, 959, 939, 919])
    tracker = StepTracker(pipe)
    observed = [tracker.observe(torch.tensor([t], dtype=torch.bfloat16)) for t in pipe.scheduler.timesteps.tolist()]
    assert [(step, kind) for step, _, kind in observed] == [(i, 0) for i in range(5)]
    assert tracker.observe(torch.tensor(919.0)) == (4, 5, 1)  # a second call at the same step
    tracker.reset()
    assert tracker.observe(torch.tensor(979.0)) == (1, 5, 0)


def test_steps_that_round_to_one_bf16_value_are_told_apart():
    """HunyuanVideo's 50-step schedule (shift 7) puts its first steps closer together than bf16 can tell apart."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    scheduler.set_timesteps(50)
    schedule = scheduler.timesteps
    as_bf16 = schedule.to(torch.bfloat16)
    assert len(set(as_bf16[:4].tolist())) < 4  # the premise: neighbouring steps collide in bf16
    pipe = SimpleNamespace(scheduler=scheduler, current_timestep=None)
    tracker = StepTracker(pipe)
    seen = []
    for t in schedule:
        pipe.current_timestep = t  # what the diffusers pipelines set before calling the transformer
        seen.append(tracker.observe(t.expand(2).to(torch.bfloat16))[0])
    assert seen == list(range(50))


def test_step_tracker_without_a_schedule_counts_new_timesteps():
    tracker = StepTracker(SimpleNamespace(scheduler=None))
    assert [tracker.observe(t)[0] for t in (5.0, 5.0, 3.0, 1.0)] == [0, 0, 1, 2]


def test_step_tracker_starts_over_when_steps_go_back():
    """A run interrupted before the pipeline's reset must not leak its step counts into the next run."""
    tracker = StepTracker(pipe_with_schedule([999, 666, 333]))
    assert [tracker.observe(torch.tensor(t))[::2] for t in (999.0, 999.0, 666.0)] == [(0, 0), (0, 1), (1, 0)]
    assert not tracker.new_run
    assert tracker.observe(torch.tensor(999.0))[::2] == (0, 0) and tracker.new_run


def test_step_tracker_starts_over_when_the_pipeline_sets_new_timesteps():
    """Interrupted during its first step, a call leaves step 0 behind; the next call's new schedule starts a run."""
    pipe = pipe_with_schedule([999, 666, 333])
    tracker = StepTracker(pipe)
    assert tracker.observe(torch.tensor(999.0)) == (0, 3, 0) and tracker.new_run
    pipe.scheduler.timesteps = torch.tensor([999, 666, 333])  # set_timesteps of the next pipeline call
    assert tracker.observe(torch.tensor(999.0)) == (0, 3, 0) and tracker.new_run
    assert tracker.observe(torch.tensor(999.0)) == (0, 3, 1) and not tracker.new_run
