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


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before checking its arguments")

    monkeypatch.setattr("vdit_sparse.cli._load_pipeline", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--steps", "0"], ["--steps must be >= 1, got 0"]),
        (["--fps", "0"], ["--fps must be >= 1, got 0"]),
        (["--out", "{tmp}"], ["is a directory", "video.mp4"]),
        (["--out", "{tmp}/clip"], ["expected a video file name ending in .mp4", "no extension"]),
        (["--out", "{tmp}/clip.json"], ["'.json'"]),
        (["--out", "{tmp}/a-file/clip.mp4"], ["--out: cannot write to", "a-file"]),
        (["--summary", "{tmp}/a-file/s.json"], ["--summary: cannot write to"]),
    ],
    ids=["steps", "fps", "out-directory", "out-no-extension", "out-wrong-extension", "out-unwritable",
         "summary-unwritable"],
)
def test_generate_arguments_are_checked_before_any_work(tmp_path, capsys, no_model_loading, extra, words):
    (tmp_path / "a-file").write_text("not a directory")
    argv = ["generate", "--out", str(tmp_path / "x.mp4"), *[arg.format(tmp=tmp_path) for arg in extra]]
    assert main(argv) == 2
    err = one_line_error(capsys)
    for word in words:
        assert word in err


def test_profile_for_another_family_fails_before_the_dense_run(tmp_path, capsys, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("a pipeline ran before the profile was checked against the model")

    monkeypatch.setattr("vdit_sparse.cli._generate", no_run)
    code = main(["generate", "--model", "embedded:hunyuan-video", "--profile", "cogvideox-5b", "--compare-dense",
                 "--out", str(tmp_path / "x.mp4")])
    assert code == 2
    assert "written for model family 'cogvideox', but the pipeline is 'hunyuan-video'" in one_line_error(capsys)


def test_eval_checks_profiles_against_the_model_before_the_dense_runs(tmp_path, capsys, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("evaluation started before the profiles were checked against the model")

    monkeypatch.setattr("vdit_sparse.evaluate.evaluate_profiles", no_run)
    code = main(["eval", "--model", "embedded:hunyuan-video", "--profile", "hunyuan-video", "--profile",
                 "cogvideox-2b", "--out-dir", str(tmp_path / "out")])
    assert code == 2
    assert "'cogvideox-2b' was written for model family 'cogvideox'" in one_line_error(capsys)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--out-dir", "{tmp}/a-file/out"], ["--out-dir: cannot write to"]),
        (["--prompts-file", "{tmp}/empty.txt"], ["holds no prompt"]),
        (["--prompts-file", "{tmp}/absent.txt"], ["--prompts-file", "cannot read it"]),
        (["--profile", "{tmp}/empty.txt"], ["is empty"]),
    ],
    ids=["out-dir-unwritable", "empty-prompts-file", "missing-prompts-file", "empty-profile"],
)
def test_eval_arguments_are_checked_before_any_work(tmp_path, capsys, no_model_loading, extra, words):
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv = ["eval", "--profile", "dense", "--out-dir", str(tmp_path / "ok"), *[a.format(tmp=tmp_path) for a in extra]]
    assert main(argv) == 2
    err = one_line_error(capsys)
    for word in words:
        assert word in err


def test_unknown_model_is_one_line(tmp_path, capsys):
    assert main(["generate", "--model", "embedded:nope", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "unknown embedded model 'embedded:nope'" in one_line_error(capsys)


@pytest.mark.parametrize("model, profile", [("embedded:hunyuan-video", "hunyuan-video"),
                                            ("embedded:cogvideox-2b", "cogvideox-2b")])
def test_default_profile_follows_the_model(tmp_path, model, profile):
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--model", model, "--steps", "2", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["profile"] == profile


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


def test_inspect_prints_and_draws_the_method_of_every_head(tmp_path, capsys):
    profile = tmp_path / "mixed.yaml"
    profile.write_text(
        "name: mixed\nmethod: svg\ndense_layers: [0]\n"
        "layers:\n  1:\n    heads:\n      0-1: {method: dense}\n      3: {method: skip}\n"
    )
    png = tmp_path / "map.png"
    assert main(["inspect", str(profile), "--layers", "3", "--heads", "4", "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "layer 0  DDDD" in printed and "layer 1  DDS-" in printed and "layer 2  SSSS" in printed
    assert "D dense" in printed and "- skip" in printed and "S svg" in printed
    from PIL import Image

    assert Image.open(png).size[0] > 0


def test_inspect_reads_the_counts_from_a_model(capsys):
    assert main(["inspect", "hunyuan-video", "--model", "embedded:hunyuan-video"]) == 0
    assert "4 layers x 4 heads" in capsys.readouterr().out


def test_inspect_without_counts_is_one_line(capsys):
    assert main(["inspect", "cogvideox-5b"]) == 2
    assert "pass --model, or --layers and --heads" in one_line_error(capsys)


def test_generate_compiles_the_accelerated_transformer(tmp_path):
    out = tmp_path / "compiled.mp4"
    assert main(["generate", "--model", "embedded:cogvideox", "--profile", "sliding-frames", "--steps", "2",
                 "--compile", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["compiled"] and summary["attention"]["calls"]["sliding_frames"] > 0


@pytest.mark.parametrize("model, profile", [("embedded:wan2.1", "wan2.1-1.3b"), ("embedded:wan2.2", "wan2.2-a14b")])
def test_generate_on_wan_picks_the_profile_of_its_experts(tmp_path, model, profile):
    out = tmp_path / "wan.mp4"
    assert main(["generate", "--model", model, "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["profile"] == profile and summary["attention"]["calls"]["svg"] > 0


@pytest.mark.parametrize("model", ["embedded:cogvideox-5b-i2v", "embedded:hunyuan-video-i2v", "embedded:hunyuan-video-1.5-i2v",
                                   "embedded:wan2.1-i2v", "embedded:wan2.2-i2v"])
def test_generate_image_to_video(tmp_path, model):
    from PIL import Image

    image = tmp_path / "first.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(image)
    out = tmp_path / "i2v.mp4"
    assert main(["generate", "--model", model, "--image", str(image), "--steps", "2", "--compare-dense",
                 "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["image"] == str(image) and "image" not in summary["call_args"]
    assert summary["pipeline"].endswith("ImageToVideoPipeline") and summary["psnr_db"] > 0


def test_an_image_for_a_text_to_video_model_or_an_unreadable_one_is_refused(tmp_path, capsys):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    assert main(["generate", "--model", "embedded:wan2.1-i2v", "--image", str(bad), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "cannot read it as an image" in one_line_error(capsys)
    from PIL import Image

    good = tmp_path / "first.png"
    Image.new("RGB", (32, 32)).save(good)
    assert main(["generate", "--model", "embedded:wan2.1", "--image", str(good), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "is a text-to-video pipeline (WanPipeline)" in one_line_error(capsys)
