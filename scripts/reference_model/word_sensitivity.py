"""Does the reference transformer listen to each word of its prompt? Measured on its predictions.

Single-shape training scenes (the renderer's, untextured and rigid, one chromatic
shape) are rendered, encoded by the model's VAE and noised at several
timesteps. At each, the transformer predicts the clean latents (x0, from its
v-prediction) once under the scene's own prompt and once each under the prompt
with one word swapped: the colour (the next chromatic colour), the shape (the
next shape) or the direction (the opposite one); and once under the empty
prompt. The relative L2 distance between the two x0 predictions, averaged over
scenes, says how much the prediction moves with that word at that noise level.

For scale, each scene is also rendered with the word's change made in pixels
(same background, position at the middle frame, size and turn), and the
relative L2 distance between the two videos' latents is reported as
``data``: what the word changes in a clean video. A word the model ignores
moves its prediction by ~0 at every timestep however much it changes the
data.

Beside the predictions, the script reports where the transformer's attention
reads the prompt: at each timestep and layer, the attention mass that video
queries put on each word's token, averaged over the queries on the shape
(tokens it covers at least half of) and over those off it, and the head that
puts the most mass on each word. A word the model uses has a head that reads
it from the shape's tokens. Runs on the CPU in about 6 minutes (2 cores)::

    python -m scripts.reference_model.word_sensitivity     # docs/reference-word-sensitivity.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path

import torch

from vdit_sparse.metrics import relative_l2
from vdit_sparse.reference_model import DEFAULT_WEIGHTS_PATH, REFERENCE_CALL_ARGS, build_reference_pipeline

from .sample import joint_attention
from .videos import CHROMATIC, COLOURS, SHAPES, SINGLE_SHAPE, ShapeVideos, latent_coverage

REPO = Path(__file__).resolve().parents[2]

WORDS = ("colour", "shape", "direction")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def plain_scenes(data: ShapeVideos, count: int) -> list[tuple[list[dict], tuple, str, tuple[str, str, str]]]:
    """``count`` scenes of one untextured, rigid, chromatic shape, with their (colour, shape, direction)."""
    found = []
    while len(found) < count:
        shapes, pan, prompt = data._scene()
        match = SINGLE_SHAPE.match(prompt)
        if match:
            found.append((shapes, pan, prompt, (match.group(1), match.group(2), match.group(3))))
    return found


def swapped(scene, word: str):
    """The scene and its prompt with one word changed, in the pixels and in the text alike."""
    shapes, pan, prompt, (colour, shape, direction) = scene
    shape_params = copy.deepcopy(shapes[0])
    if word == "colour":
        colour = CHROMATIC[(CHROMATIC.index(colour) + 1) % len(CHROMATIC)]
        shape_params["colour"] = COLOURS[colour]
    elif word == "shape":
        shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        shape_params["kind"] = SHAPES.index(shape)
    else:  # reverse the path about its middle frame: start where the original ends
        direction = OPPOSITE[direction]
        frames = REFERENCE_CALL_ARGS["num_frames"]
        for position, velocity in (("x0", "vx"), ("y0", "vy")):
            shape_params[position] += shape_params[velocity] * (frames - 1)
            shape_params[velocity] = -shape_params[velocity]
    old_phrase = prompt.split(",")[0]
    new_prompt = prompt.replace(old_phrase, f"{colour} {shape} moving {direction}", 1)
    return [shape_params], pan, new_prompt


def render_latents(pipe, data: ShapeVideos, scenes, seed: int) -> torch.Tensor:
    """``(shapes, pan, prompt)`` scenes -> scaled latents (B, F, C, H, W) as the pipeline's
    transformer sees them; the same ``seed`` gives the same backgrounds."""
    data.generator.manual_seed(seed)
    video, _ = data.sample(len(scenes), scenes=scenes)
    with torch.no_grad():
        latents = pipe.vae.encode(video).latent_dist.mode()
    return latents.permute(0, 2, 1, 3, 4) * pipe.vae.config.scaling_factor


def mean_relative_l2(changed: torch.Tensor, reference: torch.Tensor) -> float:
    """:func:`vdit_sparse.metrics.relative_l2` of each sample against its reference, averaged."""
    return round(sum(relative_l2(a, b) for a, b in zip(changed, reference)) / len(reference), 4)


def predict_x0(pipe, noisy: torch.Tensor, prompts: list[str], timestep: int, rotary) -> torch.Tensor:
    with torch.no_grad():
        text, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=REFERENCE_CALL_ARGS["max_sequence_length"], device="cpu"
        )
        steps = torch.full((noisy.shape[0],), timestep, dtype=torch.long)
        output = pipe.transformer(
            hidden_states=noisy, encoder_hidden_states=text, timestep=steps, image_rotary_emb=rotary, return_dict=False
        )[0]
    alpha_bar = pipe.scheduler.alphas_cumprod[timestep]
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * output
    return (noisy - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()


PROMPT_TOKENS = ("colour", "shape", "moving", "direction")  # the first four tokens of "<colour> <shape> moving <direction>"


def on_shape_tokens(pipe, data: ShapeVideos, scenes, seed: int, latent_shape: torch.Size) -> torch.Tensor:
    """``(B, video tokens)`` bool: the tokens whose patch the scene's shape covers at least half of."""
    data.generator.manual_seed(seed)
    _, _, coverage = data.sample(len(scenes), scenes=scenes, with_coverage=True)
    pooled = latent_coverage(coverage, latent_shape)  # (B, F, 1, h, w)
    batch, frames, _, height, width = pooled.shape
    patch = pipe.transformer.config.patch_size
    tokens = torch.nn.functional.avg_pool2d(pooled.reshape(batch * frames, 1, height, width), patch)
    return tokens.reshape(batch, -1) >= 0.5


def word_attention(
    pipe, noisy: torch.Tensor, prompts: list[str], timestep: int, rotary, on_shape: torch.Tensor
) -> tuple[dict, torch.Tensor]:
    """Attention mass of the video queries on each of PROMPT_TOKENS (and on the other text tokens),
    per layer, averaged over the queries on the shape and over those off it; and, per word, the
    head that puts the most mass on it from the shape's queries. Returned with the x0 prediction
    of the forward pass it was read from (:func:`predict_x0`; the hooks only read)."""
    length = REFERENCE_CALL_ARGS["max_sequence_length"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    for prompt, row in zip(prompts, ids):
        words = pipe.tokenizer.convert_ids_to_tokens(row[: len(PROMPT_TOKENS)])
        if words[2] != "moving" or f"{words[0]} {words[1]} moving {words[3]}" not in prompt:
            raise ValueError(f"prompt {prompt!r} does not start '<colour> <shape> moving <direction>'")
    per_layer = []  # (heads, words + 1) on and off the shape, per layer

    def hook(attn, args, kwargs):
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        probs, _ = joint_attention(attn, hidden, text, kwargs.get("image_rotary_emb"))
        on_text = probs[:, :, text.shape[1] :, : text.shape[1]]  # (B, H, video queries, text keys)
        by_word = torch.cat([on_text[..., : len(PROMPT_TOKENS)], on_text[..., len(PROMPT_TOKENS) :].sum(-1, keepdim=True)], -1)
        masses = []
        for where in (on_shape, ~on_shape):
            weight = where.float()[:, None, :, None]
            masses.append(((by_word * weight).sum(2) / weight.sum(2).clamp_min(1)).mean(0))  # (H, words + 1)
        per_layer.append(masses)

    handles = [block.attn1.register_forward_pre_hook(hook, with_kwargs=True) for block in pipe.transformer.transformer_blocks]
    try:
        x0 = predict_x0(pipe, noisy, prompts, timestep, rotary)
    finally:
        for handle in handles:
            handle.remove()
    names = [*PROMPT_TOKENS, "other text tokens"]
    report = {}
    for index, where in enumerate(("on_shape", "off_shape")):
        report[where] = {
            name: [round(masses[index][:, column].mean().item(), 4) for masses in per_layer] for column, name in enumerate(names)
        }
    report["top_head_on_shape"] = {}
    for column, name in enumerate(PROMPT_TOKENS):
        stacked = torch.stack([masses[0][:, column] for masses in per_layer])  # (layers, heads)
        layer, head = divmod(int(stacked.argmax()), stacked.shape[1])
        report["top_head_on_shape"][name] = {"layer": layer, "head": head, "mass": round(stacked.max().item(), 4)}
    return report, x0


def measure(pipe, scenes_count: int, timesteps: list[int], seed: int) -> dict:
    data = ShapeVideos(REFERENCE_CALL_ARGS["num_frames"], REFERENCE_CALL_ARGS["height"], "cpu", seed)
    scenes = plain_scenes(data, scenes_count)
    clean = render_latents(pipe, data, [scene[:3] for scene in scenes], seed)
    variants = {word: [swapped(scene, word) for scene in scenes] for word in WORDS}
    result = {
        "data": {
            word: mean_relative_l2(render_latents(pipe, data, variants[word], seed), clean)
            for word in WORDS
        }
    }
    frames = clean.shape[1]
    rotary = pipe._prepare_rotary_positional_embeddings(REFERENCE_CALL_ARGS["height"], REFERENCE_CALL_ARGS["width"], frames, "cpu")
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    own = [scene[2] for scene in scenes]
    on_shape = on_shape_tokens(pipe, data, [scene[:3] for scene in scenes], seed, clean.shape)
    result["attention"] = {
        "what": "attention mass of video queries on each prompt token, per layer (mean over heads), on and off the shape",
        "on_shape_token_share": round(on_shape.float().mean().item(), 4),
        "uniform_per_token": round(1 / (REFERENCE_CALL_ARGS["max_sequence_length"] + on_shape.shape[1]), 5),
    }
    for timestep in timesteps:
        noisy = pipe.scheduler.add_noise(clean, noise, torch.full((len(scenes),), timestep, dtype=torch.long))
        # the prediction under the scene's own prompt, read from the forward pass the attention is measured on
        attention, base = word_attention(pipe, noisy, own, timestep, rotary, on_shape)
        row = {word: predict_x0(pipe, noisy, [v[2] for v in variants[word]], timestep, rotary) for word in WORDS}
        row["empty prompt"] = predict_x0(pipe, noisy, [""] * len(scenes), timestep, rotary)
        result[f"t={timestep}"] = {name: mean_relative_l2(x0, base) for name, x0 in row.items()}
        print(f"t={timestep}: {result[f't={timestep}']}", flush=True)
        result["attention"][f"t={timestep}"] = attention
        print(f"  top heads on the shape: {result['attention'][f't={timestep}']['top_head_on_shape']}", flush=True)
    result["example"] = {"prompt": own[0], **{word: variants[word][0][2] for word in WORDS}}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_PATH)
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 900, 750, 500, 250, 100])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "reference-word-sensitivity.json")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    started = time.perf_counter()
    pipe = build_reference_pipeline(args.weights)
    last = pipe.scheduler.config.num_train_timesteps - 1
    if any(not 0 <= t <= last for t in args.timesteps):
        parser.error(f"--timesteps must lie in [0, {last}]")
    report = {
        "what": "relative L2 change of the reference transformer's x0 prediction when one prompt word is swapped",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights": str(args.weights),
        "scenes": args.scenes,
        "seed": args.seed,
        "swaps": {"colour": "next chromatic colour", "shape": "next shape", "direction": "opposite direction"},
        **measure(pipe, args.scenes, args.timesteps, args.seed),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
