"""The quality harness on a real (embedded) pipeline, and SSIM on known inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vdit_sparse.embedded import REFERENCE_MODEL_ID, call_args_for, load_pipeline
from vdit_sparse.evaluate import evaluate_profiles, write_report
from vdit_sparse.metrics import ssim

# The trained reference model (learned attention), at its own size (9 latent
# frames of 16 x 16 tokens) with 10 instead of 25 steps to keep CI short.
MODEL = REFERENCE_MODEL_ID
CALL_ARGS = {**call_args_for(MODEL), "num_inference_steps": 10}
PROMPTS = ["red circle moving right"]
SEEDS = [0]

# The built-in profile: +-1 latent frame, the first layer and the first 25% of steps dense.
SLIDING_PSNR_FLOOR_DB = 26.0  # measured 28.17 dB (SSIM 0.924, computed 0.663) on embedded:reference, 10 steps


@pytest.fixture(scope="module")
def results():
    pipe = load_pipeline(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return evaluate_profiles(
        pipe, ["dense", "sliding-frames"], PROMPTS, SEEDS, CALL_ARGS, model_name=MODEL, warmup=False
    )


def test_dense_profile_scores_identical_to_dense(results):
    dense = results["profiles"][0]
    assert dense["label"] == "dense"
    for run in dense["runs"]:
        assert run["psnr_db"] == math.inf
        assert run["ssim"] == 1.0
        assert run["latent_relative_l2"] == 0.0
        assert run["computed_fraction"] == 1.0


def test_sliding_frames_scores_above_the_recorded_floor(results):
    sliding = results["profiles"][1]
    assert sliding["label"] == "sliding-frames"
    mean = sliding["mean"]
    assert math.isfinite(mean["psnr_db"]) and mean["psnr_db"] >= SLIDING_PSNR_FLOOR_DB, mean
    assert 0.0 < mean["latent_relative_l2"] < 1.0
    assert 0.0 < mean["ssim"] < 1.0
    assert mean["computed_fraction"] < 0.8, "+-1 of 9 latent frames should skip a good part of attention"
    for run in sliding["runs"]:
        # 10 steps: 3 warm-up steps (25%, rounded up) of 6 layers dense, then layer 0 dense.
        assert run["attention_calls"] == {"dense": 3 * 6 + 7, "sliding_frames": 7 * 5}


def test_results_record_the_setup(results):
    assert results["prompts"] == PROMPTS and results["seeds"] == SEEDS
    assert results["call_args"] == CALL_ARGS
    assert results["machine"]["torch"] == torch.__version__
    assert results["pipeline"] == "CogVideoXPipeline"
    assert len(results["dense"]["runs"]) == len(PROMPTS) * len(SEEDS)
    for entry in results["profiles"]:
        assert len(entry["runs"]) == len(PROMPTS) * len(SEEDS)
        assert entry["mean"]["seconds"] > 0


def test_write_report(results, tmp_path):
    paths = write_report(results, tmp_path / "quality")
    written = json.loads(paths["json"].read_text())
    assert written["profiles"][0]["mean"]["psnr_db"] == "inf"  # JSON has no inf
    assert written["profiles"][1]["mean"]["psnr_db"] == pytest.approx(results["profiles"][1]["mean"]["psnr_db"])
    table = paths["markdown"].read_text()
    assert "| sliding-frames |" in table and "| dense |" in table
    from PIL import Image

    with Image.open(paths["plot"]) as image:
        assert image.size[0] > 0 and image.format == "PNG"


def test_refuses_bad_call_args_and_profiles():
    with pytest.raises(ValueError, match="must not set"):
        evaluate_profiles(object(), ["dense"], PROMPTS, SEEDS, {"output_type": "np"})
    from vdit_sparse.profile import ProfileError

    with pytest.raises(ProfileError, match="unknown profile"):
        evaluate_profiles(object(), ["no-such-profile"], PROMPTS, SEEDS, {})


def test_eval_command_writes_the_report(tmp_path):
    from vdit_sparse.cli import main

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("blue square moving up\n\n")
    out_dir = tmp_path / "quality-cli"
    code = main([
        "eval", "--model", MODEL, "--profile", "sliding-frames", "--prompts-file", str(prompts_file),
        "--seeds", "1", "--steps", "2", "--no-warmup", "--out-dir", str(out_dir),
    ])
    assert code == 0
    written = json.loads((out_dir / "results.json").read_text())
    assert written["prompts"] == ["blue square moving up"] and written["seeds"] == [1]
    assert written["call_args"]["num_inference_steps"] == 2
    assert [entry["label"] for entry in written["profiles"]] == ["sliding-frames"]
    assert (out_dir / "results.md").is_file() and (out_dir / "psnr_vs_computed.png").is_file()


def test_ssim_on_known_inputs():
    rng = np.random.default_rng(0)
    frames = rng.random((3, 24, 24, 3))
    assert ssim(frames, frames) == 1.0
    light = np.clip(frames + 0.05 * rng.standard_normal(frames.shape), 0, 1)
    heavy = np.clip(frames + 0.3 * rng.standard_normal(frames.shape), 0, 1)
    assert 1.0 > ssim(light, frames) > ssim(heavy, frames)
    assert ssim(light, frames) == pytest.approx(ssim(frames, light))  # symmetric
    # channels-first tensors give the same figure
    as_tensor = torch.from_numpy(frames).permute(0, 3, 1, 2)
    light_tensor = torch.from_numpy(light).permute(0, 3, 1, 2)
    assert ssim(light_tensor, as_tensor, channel_axis=-3) == pytest.approx(ssim(light, frames))
    # flat images: only the luminance term is left, (2 a b + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    flat = ssim(np.full((16, 16, 1), a), np.full((16, 16, 1), b))
    assert flat == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(frames, frames[:2])
