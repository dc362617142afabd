"""The shipped reference model, its training script and its prompt-adherence detector."""

from __future__ import annotations

import json
import time

import pytest
import torch

from scripts.reference_model import adherence, sample, text_embeddings, videos, word_sensitivity
from scripts.reference_model import train as training
from scripts.reference_model.weights import read_training_summary, save_reference_weights
from vdit_sparse.reference_model import (
    DEFAULT_WEIGHTS_PATH,
    REFERENCE_CONFIG,
    build_reference_pipeline,
    init_reference_pipeline,
)


def test_shipped_weights_fit_the_issue_limits():
    """At most 25 MB, trained in at most 15 minutes on one GPU (stored by the training script)."""
    assert DEFAULT_WEIGHTS_PATH.stat().st_size <= 25e6
    summary = read_training_summary()
    assert summary is not None and summary["device"].startswith("NVIDIA")
    assert summary.get("total_wall_seconds", summary["wall_seconds"]) <= 15 * 60


def test_shipped_weights_load_into_the_real_classes():
    pipe = build_reference_pipeline()
    assert type(pipe).__name__ == "CogVideoXPipeline"
    assert type(pipe.transformer).__name__ == "CogVideoXTransformer3DModel"
    assert pipe.transformer.config.num_layers == REFERENCE_CONFIG["transformer"]["num_layers"]
    assert not any(parameter.requires_grad for parameter in pipe.transformer.parameters())


def test_missing_and_mismatched_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_reference_pipeline(tmp_path / "absent.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(DEFAULT_WEIGHTS_PATH), framework="pt") as handle:
        metadata = dict(handle.metadata())
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    config = json.loads(metadata["config"])
    config["transformer"]["attention_head_dim"] *= 2
    save_file(state, str(tmp_path / "other.safetensors"), metadata=dict(metadata, config=json.dumps(config)))
    with pytest.raises(ValueError, match=r"transformer\.attention_head_dim"):
        build_reference_pipeline(tmp_path / "other.safetensors")
    # the depth may differ (VARIABLE_KEYS), but then the tensors must be there for every layer
    config = json.loads(metadata["config"])
    config["transformer"]["num_layers"] += 1
    save_file(state, str(tmp_path / "deeper.safetensors"), metadata=dict(metadata, config=json.dumps(config)))
    with pytest.raises(ValueError, match="does not fit"):
        build_reference_pipeline(tmp_path / "deeper.safetensors")


def test_a_shallower_or_deeper_variant_saves_and_loads_as_its_file_says(tmp_path):
    pipe = init_reference_pipeline(seed=4, num_layers=3)
    assert len(pipe.transformer.transformer_blocks) == 3
    path = save_reference_weights(pipe, tmp_path / "three.safetensors")
    loaded = build_reference_pipeline(path)
    assert loaded.transformer.config.num_layers == 3
    for (name, stored), (_, original) in zip(loaded.transformer.state_dict().items(), pipe.transformer.state_dict().items()):
        assert torch.equal(stored, original.half().float()), name  # stored in float16
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        init_reference_pipeline(num_layers=0)


def test_training_script_runs_and_resumes_on_cpu(tmp_path):
    """Two CPU steps of each phase, then two resumed steps (the first at the warm-up's zero learning
    rate; the second on stills): the summary chains, the weights load, and the text encoder learned."""
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    small = ["--device", "cpu", "--batch-size", "1", "--vae-batch-size", "1"]
    assert training.main(
        [*small, "--steps", "2", "--vae-steps", "2", "--num-layers", "2", "--out", str(first), "--log", str(tmp_path / "a.json")]
    ) == 0
    assert training.main(
        [*small, "--steps", "2", "--resume", str(first), "--seed", "1", "--high-noise-share", "0.5",
         "--still-share", "0.5", "--still-batch-size", "3", "--out", str(second), "--log", str(tmp_path / "b.json")]
    ) == 0
    summary = read_training_summary(second)
    assert summary["transformer_steps"] == 2 and summary["resumed_from"]["transformer_steps"] == 2
    assert summary["total_transformer_steps"] == 4
    assert summary["vae_steps"] == summary["resumed_from"]["vae_steps"] == 2
    log = json.loads((tmp_path / "b.json").read_text())
    assert "vae" not in log and log["transformer"]["text_encoder_lr"] > 0
    assert (log["transformer"]["videos"], log["transformer"]["stills"]) == (1, 3)
    assert log["transformer"]["still_final_loss"] > 0
    # the text encoder trained: its weights moved from the first file's
    before, after = build_reference_pipeline(first).text_encoder, build_reference_pipeline(second).text_encoder
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    # the resumed run kept the first run's depth, and refuses another
    assert build_reference_pipeline(second).transformer.config.num_layers == 2
    with pytest.raises(SystemExit):
        training.main([*small, "--steps", "1", "--resume", str(first), "--num-layers", "6", "--out", str(tmp_path / "x.safetensors")])


def test_stills_are_the_first_frames_of_the_videos_the_same_seed_draws():
    video, prompts, coverage = videos.ShapeVideos(17, 64, "cpu", seed=4).sample(3, with_coverage=True)
    still, still_prompts, still_coverage = videos.ShapeVideos(17, 64, "cpu", seed=4).sample(3, with_coverage=True, frames=1)
    assert still.shape == (3, 3, 1, 64, 64) and still_prompts == prompts
    assert torch.equal(still[:, :, 0], video[:, :, 0]) and torch.equal(still_coverage[:, 0], coverage[:, 0])
    assert videos.latent_coverage(still_coverage, torch.Size((3, 1, 4, 32, 32))).shape == (3, 1, 1, 32, 32)
    with pytest.raises(ValueError, match="frames must be in 1..17"):
        videos.ShapeVideos(17, 64, "cpu", seed=4).sample(1, frames=18)


def test_upright_shapes_start_at_their_fixed_turn_and_leave_the_prompts_alone():
    upright = videos.ShapeVideos(17, 64, "cpu", seed=6, upright_share=1.0)
    turned = videos.ShapeVideos(17, 64, "cpu", seed=6)
    for _ in range(20):
        (shapes, _, prompt), (turned_shapes, _, turned_prompt) = upright._scene(), turned._scene()
        assert prompt == turned_prompt
        for shape, turned_shape in zip(shapes, turned_shapes):
            kind = videos.SHAPES[shape["kind"]]
            assert shape["angle0"] == videos.UPRIGHT_ANGLE.get(kind, 0.0)
            assert turned_shape["angle0"] != shape["angle0"]
    with pytest.raises(ValueError, match="upright_share"):
        videos.ShapeVideos(17, 64, "cpu", seed=6, upright_share=1.5)


def test_training_script_refuses_a_still_share_of_one():
    with pytest.raises(SystemExit):
        training.main(["--device", "cpu", "--still-share", "1"])


def test_phase_timer_averages_each_kind_of_step_over_its_own_steps():
    timer = training.PhaseTimer(True, torch.device("cpu"), skip=0)
    for step, (kind, pause) in enumerate([("video", 0.02), ("still", 0.002), ("video", 0.02)]):
        timer.start_step(step, kind)
        time.sleep(pause)
        timer.mark("forward")
    report = timer.report()
    assert report["steps_measured"] == 3 and report["steps_measured_by_kind"] == {"video": 2, "still": 1}
    assert report["ms_per_step"]["forward"] >= 20 > report["ms_per_step"]["still/forward"] >= 2


def test_phase_timer_charges_each_phase_after_the_warm_up():
    timer = training.PhaseTimer(True, torch.device("cpu"), skip=1)
    for step in range(3):
        timer.start_step(step)
        time.sleep(0.002)
        timer.mark("short")
        time.sleep(0.02)
        timer.mark("long")
    report = timer.report()
    assert report["steps_measured"] == 2  # step 0 is warm-up
    assert set(report["ms_per_step"]) == {"short", "long"}
    assert report["ms_per_step"]["long"] >= 20 > report["ms_per_step"]["short"] >= 2
    assert abs(sum(report["share"].values()) - 1) < 0.01
    off = training.PhaseTimer(False, torch.device("cpu"))
    off.start_step(30)
    off.mark("anything")
    assert off.report() is None


def test_adherence_detector_reads_the_training_videos():
    """On rendered single-shape videos the detector finds the described colour, direction and shape."""
    videos, labels = adherence.training_videos(40, "cpu", seed=7)
    frames = adherence.to_frames(videos)
    verdicts = [adherence.judge(video, *label) for video, label in zip(frames, labels)]
    scores = adherence.accuracy(verdicts)
    assert scores["both"] >= 0.95, [v for v in verdicts if not (v["colour_ok"] and v["direction_ok"])]
    assert scores["shape"] >= 0.95, [(v["shape"], v["shape_iou"]) for v in verdicts if not v["shape_ok"]]
    assert {shape for _, _, shape in labels} == set(adherence.SHAPES)  # every shape was tried
    # and it can say no: the same videos judged against another colour, the opposite direction, another shape
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    other = {colour: adherence.CHROMATIC[(adherence.CHROMATIC.index(colour) + 3) % 7] for colour in adherence.CHROMATIC}
    next_shape = {shape: adherence.SHAPES[(adherence.SHAPES.index(shape) + 1) % 6] for shape in adherence.SHAPES}
    assert not any(adherence.judge(video, other[c], d)["colour_ok"] for video, (c, d, _) in zip(frames, labels))
    assert not any(adherence.judge(video, c, opposite[d])["direction_ok"] for video, (c, d, _) in zip(frames, labels))
    assert not any(adherence.judge(video, c, d, next_shape[s])["shape_ok"] for video, (c, d, s) in zip(frames, labels))


def test_word_swaps_change_one_word_in_the_prompt_and_the_pixels():
    data = videos.ShapeVideos(17, 64, "cpu", seed=3)
    scene = word_sensitivity.plain_scenes(data, 1)[0]
    shapes, _, prompt, (colour, shape, direction) = scene
    assert prompt.startswith(f"{colour} {shape} moving {direction}")
    for word in word_sensitivity.WORDS:
        new_shapes, _, new_prompt = word_sensitivity.swapped(scene, word)
        changed = [a for a, b in zip(prompt.split(), new_prompt.split()) if a != b]
        assert len(changed) == 1 and len(prompt.split()) == len(new_prompt.split())
        old, new = shapes[0], new_shapes[0]
        differing = {key for key in old if old[key] != new[key]}
        assert differing == {"colour": {"colour"}, "shape": {"kind"}, "direction": {"x0", "y0", "vx", "vy"}}[word]
        if word == "direction":  # the reversed path passes the same point at the middle frame
            for position, velocity in (("x0", "vx"), ("y0", "vy")):
                assert abs((old[position] + 8 * old[velocity]) - (new[position] + 8 * new[velocity])) < 1e-9
    # the same seed renders the same background: the unchanged scene gives identical latents
    pipe = build_reference_pipeline()
    first = word_sensitivity.render_latents(pipe, data, [scene[:3]], seed=5)
    again = word_sensitivity.render_latents(pipe, data, [scene[:3]], seed=5)
    other = word_sensitivity.render_latents(pipe, data, [word_sensitivity.swapped(scene, "shape")], seed=5)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_word_attention_recomputes_the_real_attention_and_reads_each_word():
    pipe = build_reference_pipeline()
    data = videos.ShapeVideos(17, 64, "cpu", seed=3)
    scenes = [scene[:3] for scene in word_sensitivity.plain_scenes(data, 2)]
    clean = word_sensitivity.render_latents(pipe, data, scenes, seed=5)
    noisy = pipe.scheduler.add_noise(clean, torch.randn_like(clean), torch.tensor([500, 500]))
    rotary = pipe._prepare_rotary_positional_embeddings(64, 64, clean.shape[1], "cpu")
    prompts = [prompt for _, _, prompt in scenes]

    # joint_attention's probabilities reproduce what the real processor outputs
    seen = {}
    block = pipe.transformer.transformer_blocks[2].attn1
    handles = [
        block.register_forward_pre_hook(lambda m, a, kw: seen.update(inputs=kw), with_kwargs=True),
        block.register_forward_hook(lambda m, a, kw, out: seen.update(output=out), with_kwargs=True),
    ]
    word_sensitivity.predict_x0(pipe, noisy, prompts, 500, rotary)
    for handle in handles:
        handle.remove()
    text, hidden = seen["inputs"]["encoder_hidden_states"], seen["inputs"]["hidden_states"]
    probs, v = sample.joint_attention(block, hidden, text, rotary)
    ours = block.to_out[0]((probs @ v).transpose(1, 2).flatten(2))
    real = torch.cat([seen["output"][1], seen["output"][0]], 1)
    assert ((ours - real).norm() / real.norm()).item() < 1e-4

    on_shape = word_sensitivity.on_shape_tokens(pipe, data, scenes, 5, clean.shape)
    assert 0 < on_shape.float().mean() < 0.5  # a shape covers some tokens, not most
    report, x0 = word_sensitivity.word_attention(pipe, noisy, prompts, 500, rotary, on_shape)
    layers = len(pipe.transformer.transformer_blocks)
    for where in ("on_shape", "off_shape"):
        per_layer = [sum(report[where][name][layer] for name in report[where]) for layer in range(layers)]
        assert all(0 < total <= 1 for total in per_layer)  # the text's share of each query's attention
    assert set(report["top_head_on_shape"]) == set(word_sensitivity.PROMPT_TOKENS)
    with pytest.raises(ValueError, match="does not start"):
        word_sensitivity.word_attention(pipe, noisy, ["a red circle", "blue ring moving up"], 500, rotary, on_shape)


def test_text_similarity_measures_each_prompt_token_where_the_words_sit():
    report = text_embeddings.similarities(build_reference_pipeline())
    for word in ("colour", "shape", "direction"):
        each = report[word]["each_token_cosine_mean"]
        assert list(each) == list(text_embeddings.TOKENS)
        # the swapped word's own token is the differing token, and it moves most
        assert each[word] == report[word]["differing_token_cosine_mean"]
        assert each[word] == min(each.values()) and all(-1 <= value <= 1 for value in each.values())


@pytest.mark.parametrize("flag", [["--steps", "0"], ["--repeats", "0"]])
def test_adherence_check_refuses_empty_runs(flag, capsys):
    with pytest.raises(SystemExit) as stopped:
        adherence.main(flag)
    assert stopped.value.code == 2 and "at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("frames", ["0", "2"])
def test_adherence_check_refuses_frame_counts_the_vae_cannot_take(frames, capsys):
    with pytest.raises(SystemExit) as stopped:
        adherence.main(["--frames", frames])
    assert stopped.value.code == 2 and "--frames must be 1 or odd" in capsys.readouterr().err


def test_adherence_check_on_stills_judges_colour_and_shape_only(tmp_path):
    report_path = tmp_path / "stills.json"
    assert adherence.main(
        ["--device", "cpu", "--frames", "1", "--steps", "2", "--repeats", "1", "--no-control", "--detector-videos", "2",
         "--json", str(report_path), "--png", str(tmp_path / "stills.png")]
    ) == 0
    report = json.loads(report_path.read_text())
    assert report["call_args"]["num_frames"] == 1
    assert set(report["prompted"]) == {"videos", "colour", "shape"} and report["prompted"]["videos"] == 28
    assert (tmp_path / "stills.png").stat().st_size > 0
