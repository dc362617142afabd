"""The embedded pipelines, video writing and the fidelity metrics.

The pipelines are tiny (a few hundred tokens, 4 steps): a full call takes well
under a second on a CPU, so these tests run the real diffusers pipelines end to end.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vdit_sparse.embedded import (
    DEMO_CALL_ARGS,
    EMBEDDED_MODEL_IDS,
    EMBEDDED_TEXT_LEN,
    build_embedded_pipeline,
    build_tokenizer,
    load_pipeline,
)
from vdit_sparse.metrics import psnr, relative_l2
from vdit_sparse.video import frames_to_array, write_video

PROMPT = "a red ball moves left"  # 5 words: 5 T5 tokens + </s>; 5 Llama tokens + <|eot_id|> after the crop

VARIANTS = [("cogvideox", "5b"), ("cogvideox", "2b"), ("cogvideox", "1.5"), ("hunyuan-video", None)]
VARIANT_IDS = ["cogvideox-5b", "cogvideox-2b", "cogvideox-1.5", "hunyuan-video"]


def _generate(pipe, family, output_type="np", **overrides):
    pipe.set_progress_bar_config(disable=True)
    call_args = {**DEMO_CALL_ARGS[family], **overrides}
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, **call_args, generator=generator, output_type=output_type).frames


def _capture_transformer_calls(pipe):
    """Record the keyword arguments of every transformer call."""
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


@pytest.fixture(scope="module")
def pipelines():
    return {(family, variant): build_embedded_pipeline(family, variant=variant, seed=0) for family, variant in VARIANTS}


@pytest.mark.parametrize("family, variant", VARIANTS, ids=VARIANT_IDS)
def test_same_seed_builds_give_bit_identical_videos(pipelines, family, variant):
    rebuilt = build_embedded_pipeline(family, variant=variant, seed=0)
    first = _generate(pipelines[family, variant], family)[0]
    second = _generate(rebuilt, family)[0]
    assert np.array_equal(first, second)
    other_seed = _generate(build_embedded_pipeline(family, variant=variant, seed=1), family)[0]
    assert not np.array_equal(first, other_seed)


@pytest.mark.parametrize("family, variant", VARIANTS, ids=VARIANT_IDS)
def test_runs_at_two_sizes_with_finite_frames(pipelines, family, variant):
    pipe = pipelines[family, variant]
    # (height, width, frames): the demo size, and a smaller non-square one
    small = (16, 24, 5) if family == "cogvideox" else (16, 32, 9)  # HunyuanVideo needs multiples of 16
    demo = (DEMO_CALL_ARGS[family]["height"], DEMO_CALL_ARGS[family]["width"], DEMO_CALL_ARGS[family]["num_frames"])
    for height, width, num_frames in (demo, small):
        frames = _generate(pipe, family, height=height, width=width, num_frames=num_frames)[0]
        assert frames.shape == (num_frames, height, width, 3)
        assert np.isfinite(frames).all()
        assert frames.min() >= 0.0 and frames.max() <= 1.0
        assert frames.std() > 1e-3  # not a constant image


def test_cogvideox_batches_cfg_and_puts_text_first(pipelines):
    pipe = pipelines["cogvideox", "5b"]
    calls = _capture_transformer_calls(pipe)
    try:
        _generate(pipe, "cogvideox", output_type="latent", guidance_scale=6.0)
    finally:
        pipe.transformer._forward_pre_hooks.clear()
    assert len(calls) == DEMO_CALL_ARGS["cogvideox"]["num_inference_steps"]
    hidden, text = calls[0]["hidden_states"], calls[0]["encoder_hidden_states"]
    assert hidden.shape == (2, 5, 4, 16, 16)  # CFG: uncond + cond; 9 frames -> 5 latent frames of 16 x 16
    assert text.shape == (2, EMBEDDED_TEXT_LEN, 32)
    assert calls[0]["image_rotary_emb"][0].shape == (5 * 8 * 8, 16)  # RoPE on video tokens only


def test_hunyuan_text_is_the_cropped_prompt_with_a_padding_mask(pipelines):
    pipe = pipelines["hunyuan-video", None]
    calls = _capture_transformer_calls(pipe)
    try:
        _generate(pipe, "hunyuan-video", output_type="latent")
    finally:
        pipe.transformer._forward_pre_hooks.clear()
    call = calls[0]
    assert call["hidden_states"].shape == (1, 4, 5, 16, 16)  # 17 frames -> 5 latent frames
    assert call["encoder_hidden_states"].shape == (1, EMBEDDED_TEXT_LEN, 32)
    # the 95-token template prefix is cropped: 5 prompt words and <|eot_id|> remain, the rest is padding
    expected_mask = torch.tensor([[1] * 6 + [0] * (EMBEDDED_TEXT_LEN - 6)])
    assert torch.equal(call["encoder_attention_mask"].cpu().long(), expected_mask)
    assert call["guidance"] is not None  # guidance-distilled: one batch, no CFG batching


def test_tokenizers_mimic_the_real_ones():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    llama = build_tokenizer("llama")
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(llama(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    assert llama.unk_token_id not in llama(prefix).input_ids

    t5 = build_tokenizer("t5")
    batch = t5([PROMPT, ""], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 8)
    assert batch.input_ids[0, 5].item() == t5.eos_token_id and batch.input_ids[1, 0].item() == t5.eos_token_id
    assert batch.attention_mask[0].tolist() == [1] * 6 + [0] * 2
    truncated = t5(PROMPT + " " + PROMPT, max_length=8, truncation=True).input_ids
    assert len(truncated) == 8 and truncated[-1] == t5.eos_token_id

    clip = build_tokenizer("clip")
    ids = clip(PROMPT, padding="max_length", max_length=77).input_ids
    assert ids[0] == clip.bos_token_id and ids[6] == clip.eos_token_id and len(ids) == 77


def test_transformer_weights_are_loaded_and_validated(tmp_path):
    from safetensors.torch import save_file

    donor = build_embedded_pipeline("cogvideox", seed=3)
    path = tmp_path / "transformer.safetensors"
    save_file({key: value.contiguous() for key, value in donor.transformer.state_dict().items()}, str(path))
    loaded = build_embedded_pipeline("cogvideox", seed=0, transformer_weights=path)
    for key, value in donor.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[key], value), key

    bad = tmp_path / "bad.safetensors"
    save_file({"not.a.key": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="missing keys"):
        build_embedded_pipeline("cogvideox", transformer_weights=bad)
    with pytest.raises(FileNotFoundError):
        build_embedded_pipeline("cogvideox", transformer_weights=tmp_path / "absent.safetensors")


def test_load_pipeline_resolves_names_and_explains_failures(tmp_path):
    pipe = load_pipeline("embedded:cogvideox-2b", torch.float32, "cpu")
    assert type(pipe).__name__ == "CogVideoXPipeline"
    assert pipe.transformer.config.use_rotary_positional_embeddings is False
    assert set(EMBEDDED_MODEL_IDS) >= {"embedded:cogvideox", "embedded:cogvideox-1.5", "embedded:hunyuan-video"}
    with pytest.raises(ValueError, match="unknown embedded model"):
        load_pipeline("embedded:nope", torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(str(tmp_path / "missing"), torch.float32, "cpu")
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(str(tmp_path), torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown variant"):
        build_embedded_pipeline("cogvideox", variant="7b")


def test_saved_embedded_pipeline_loads_as_a_local_directory(tmp_path):
    pipe = build_embedded_pipeline("cogvideox", variant="1.5")
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = load_pipeline(str(tmp_path / "pipe"), torch.float32, "cpu")
    assert type(reloaded.tokenizer(PROMPT).input_ids) is list
    # not bit-identical: BLAS may take another path for the reloaded (differently aligned) weights
    assert psnr(_generate(reloaded, "cogvideox")[0], _generate(pipe, "cogvideox")[0]) > 60


def test_bfloat16_build_runs():
    pipe = build_embedded_pipeline("hunyuan-video", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    frames = _generate(pipe, "hunyuan-video")[0]
    assert np.isfinite(frames).all()


@pytest.mark.parametrize("backend", ["imageio", "pyav"])
def test_write_video_round_trip(tmp_path, backend):
    import av

    # each frame one flat grey level, so codec loss cannot hide a dropped or reordered frame
    levels = np.linspace(0.1, 0.9, 7, dtype=np.float32)
    frames = np.broadcast_to(levels[:, None, None, None], (7, 24, 32, 3)).copy()
    path = write_video(frames, tmp_path / "clip.mp4", fps=8, backend=backend)
    with av.open(str(path)) as container:
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert decoded.shape == (7, 144, 192, 3)  # 24 x 32 enlarged ceil(128 / 24) = 6 times
    assert np.allclose(decoded.reshape(7, -1).mean(axis=1) / 255.0, levels, atol=0.02)


def test_write_video_accepts_pipeline_outputs(tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    pil_frames = [Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    channels_first = torch.rand(5, 3, 16, 16)
    for name, frames in (("pil", pil_frames), ("pt", channels_first)):
        path = write_video(frames, tmp_path / f"{name}.mp4", min_size=1)
        assert iio.imread(path, plugin="pyav").shape == (5, 16, 16, 3)
    with pytest.raises(ValueError, match="NaN"):
        write_video(np.full((2, 8, 8, 3), np.nan, dtype=np.float32), tmp_path / "nan.mp4")


def test_frames_to_array_normalises_layouts():
    uint8 = np.full((3, 4, 5, 3), 255, dtype=np.uint8)
    assert frames_to_array(uint8).dtype == np.float32 and frames_to_array(uint8).max() == 1.0
    assert frames_to_array(torch.zeros(3, 3, 4, 5)).shape == (3, 4, 5, 3)
    assert frames_to_array(np.zeros((3, 4, 5))).shape == (3, 4, 5, 1)
    with pytest.raises(ValueError, match="frames\\[0\\]"):
        frames_to_array(np.zeros((1, 3, 4, 5, 3)))


def test_metrics_on_known_inputs():
    reference = np.zeros((4, 4))
    shifted = np.full((4, 4), 0.1)
    assert psnr(shifted, reference) == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(1 / 0.01)
    assert psnr(reference, reference) == math.inf
    assert psnr(torch.full((4, 4), 25.5), torch.zeros(4, 4), data_range=255.0) == pytest.approx(20.0)
    assert relative_l2(np.array([3.0, 4.0]) * 1.1, np.array([3.0, 4.0])) == pytest.approx(0.1)
    assert relative_l2(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0], dtype=torch.bfloat16)) == pytest.approx(
        math.sqrt(2)
    )
    assert relative_l2(reference, reference) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros(3), np.zeros(4))
