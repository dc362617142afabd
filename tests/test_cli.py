"""The vdit-sparse command line, end to end on the embedded pipeline."""

from __future__ import annotations

import json

import pytest

from vdit_sparse.cli import main


def test_generate_with_compare_dense_writes_video_and_summary(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code = main(["generate", "--model", "embedded:cogvideox", "--compare-dense", "--out", str(out), "--steps", "2",
                 "--frames", "9", "--profile", "sliding-frames", "--seed", "3"])
    assert code == 0
    assert out.stat().st_size > 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["call_args"]["num_inference_steps"] == 2 and summary["call_args"]["num_frames"] == 9
    assert summary["dense_seconds"] > 0 and summary["sparse_seconds"] > 0
    assert summary["attention"]["calls"]["sliding_frames"] > 0
    assert summary["psnr_db"] > 0 and summary["relative_l2"] > 0  # sparse differs from dense, a little
    printed = capsys.readouterr().out
    assert "dense  :" in printed and "PSNR" in printed


def test_generate_hunyuan_without_comparison(tmp_path):
    out = tmp_path / "h.mp4"
    assert main(["generate", "--model", "embedded:hunyuan-video", "--profile", "hunyuan-video", "--steps", "2",
                 "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["pipeline"] == "HunyuanVideoPipeline" and "psnr_db" not in summary


def test_bad_profile_exits_with_the_message(tmp_path, capsys):
    assert main(["generate", "--profile", "no-such-profile", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "unknown profile 'no-such-profile'" in capsys.readouterr().err


def test_bad_size_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be >= 1, got 0"):
        main(["generate", "--model", "embedded:cogvideox", "--steps", "0", "--out", str(tmp_path / "x.mp4")])


def test_generate_on_the_reference_model_by_default(tmp_path):
    out = tmp_path / "ref.mp4"
    assert main(["generate", "--steps", "3", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["model"] == "embedded:reference" and summary["profile"] == "cogvideox-5b"
    assert summary["call_args"]["height"] == 64 and summary["call_args"]["num_frames"] == 17
    assert summary["attention"]["calls"]["svg"] > 0


def test_profiles_lists_builtins(capsys):
    assert main(["profiles"]) == 0
    listed = capsys.readouterr().out
    assert "sliding-frames" in listed and "dense" in listed
