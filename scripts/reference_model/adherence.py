"""Does the reference model draw what its prompt asks for? Colour and direction, measured.

For every chromatic colour of the training data (red, orange, yellow, green,
blue, purple, pink) and every direction (left, right, up, down) the model is
sampled ``--repeats`` times (default 3, so 84 videos) with the prompt
"<colour> <shape> moving <direction>" (the shape cycles through the six shapes;
seed = video index), and each time once more with the empty prompt and the same
seed as a control (``--no-control`` skips it). Sampling uses REFERENCE_CALL_ARGS
unless ``--steps`` or ``--guidance-scale`` say otherwise. Each decoded video is
then judged by a pixel detector:

- colour: pixels that are saturated (max - min channel >= 0.3) and within 0.3
  (RGB distance) of one palette colour count for that colour; the video's
  colour is the one with the most pixels. Correct if it is the prompted one
  (chance: 1 in 7).
- direction: the centroid of the prompted colour's pixels in every frame where
  there are at least 3 of them; a least-squares fit over frames gives its
  velocity, and its dominant axis and sign give the direction. Correct if it
  is the prompted one (chance: 1 in 4).
- shape: in every third of those frames whose mask has at least 30 pixels and
  does not touch the border, each of the six shapes of the renderer is drawn
  centred on the mask's centroid, scaled to the mask's area and turned in 10
  degree steps; its best intersection-over-union with the mask is its score.
  The shape with the highest mean score is the video's. Correct if it is the
  prompted one (chance: 1 in 6).

The detector is checked first on the training data itself: single-shape,
untextured, chromatic videos from the training renderer, raw and after a round
trip through the model's VAE. Its accuracy there is the ceiling for the model.

Writes a JSON report and a PNG grid of the first repeat (rows: colours,
columns: directions; in each cell frames 0, 8 and 16)::

    python -m scripts.reference_model.adherence --device cuda     # docs/reference-adherence.{json,png}

``--frames 1`` samples stills instead (the first frame alone, as the training
script's ``--still-share`` steps see it): colour and shape are judged, direction
is not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vdit_sparse.reference_model import DEFAULT_WEIGHTS_PATH, REFERENCE_CALL_ARGS, build_reference_pipeline
from vdit_sparse.video import frames_to_array

from .videos import (
    CHROMATIC,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SINGLE_SHAPE,
    ShapeVideos,
    shape_distance,
    shape_distances,
)

REPO = Path(__file__).resolve().parents[2]

PALETTE = np.array([COLOURS[name] for name in CHROMATIC], dtype=np.float32)
MIN_SATURATION = 0.3
MAX_DISTANCE = 0.3
MIN_PIXELS = 3
SHAPE_ANGLES = 36  # template rotations tried, 10 degrees apart
MIN_SHAPE_PIXELS = 30  # frames with a smaller mask, or one touching the border, are not used for the shape
SHAPE_FRAME_STRIDE = 3  # every third frame with the colour is matched against the templates


def colour_masks(video: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) in [0, 1] -> (len(CHROMATIC), T, H, W) boolean: which pixels show which palette colour."""
    saturation = video.max(-1) - video.min(-1)
    distance = np.linalg.norm(video[..., None, :] - PALETTE, axis=-1)  # (T, H, W, C)
    nearest = distance.argmin(-1)
    accepted = (saturation >= MIN_SATURATION) & (distance.min(-1) <= MAX_DISTANCE)
    return np.stack([accepted & (nearest == index) for index in range(len(CHROMATIC))])


def _unit_areas() -> torch.Tensor:
    """Area of each of the SHAPES at radius 1 (fine-grid estimate)."""
    grid = torch.linspace(-2, 2, 801)
    step = float(grid[1] - grid[0])
    inside = shape_distances(grid.view(1, -1), grid.view(-1, 1)) < 0
    return inside.flatten(1).sum(1).double() * step * step


UNIT_AREAS = _unit_areas()
ROTATIONS = torch.arange(SHAPE_ANGLES) * (2 * math.pi / SHAPE_ANGLES)


def shape_scores(mask: np.ndarray) -> np.ndarray | None:
    """How well each of the SHAPES fits a frame's mask (H, W): the best IoU over rotations.

    Each template is centred on the mask's centroid and scaled to the mask's
    area, as the renderer draws it (hard edge). ``None`` when the frame says
    little about shape: too few pixels, or the mask touches the frame's border.
    """
    area = int(mask.sum())
    if area < MIN_SHAPE_PIXELS or mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        return None
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    dx = torch.arange(width, dtype=torch.float32).view(1, 1, -1) - float(cols.mean())
    dy = torch.arange(height, dtype=torch.float32).view(1, -1, 1) - float(rows.mean())
    cos, sin = torch.cos(ROTATIONS).view(-1, 1, 1), torch.sin(ROTATIONS).view(-1, 1, 1)
    u, w = cos * dx + sin * dy, -sin * dx + cos * dy  # (rotations, H, W)
    target = torch.from_numpy(mask)
    scores = np.zeros(len(SHAPES))
    for index, kind in enumerate(SHAPES):
        radius = math.sqrt(area / float(UNIT_AREAS[index]))  # the radius that gives the mask's area
        template = shape_distance(kind, u / radius, w / radius) < 0
        intersection = (template & target).flatten(1).sum(1)
        union = (template | target).flatten(1).sum(1)
        scores[index] = float((intersection / union.clamp(min=1)).max())
    return scores


def judge(video: np.ndarray, colour: str, direction: str, shape: str | None = None) -> dict:
    """The detector's reading of one video against the prompted colour, direction and (optionally) shape."""
    masks = colour_masks(video)
    fractions = masks.reshape(len(CHROMATIC), -1).mean(1)
    seen_colour = CHROMATIC[int(fractions.argmax())] if fractions.max() > 0 else None
    mask = masks[CHROMATIC.index(colour)]
    frames = [t for t in range(mask.shape[0]) if mask[t].sum() >= MIN_PIXELS]
    seen_direction, velocity = None, None
    if len(frames) >= 2:
        rows_cols = [np.nonzero(mask[t]) for t in frames]
        centroids = np.array([[cols.mean(), rows.mean()] for rows, cols in rows_cols])  # (x, y)
        times = np.array(frames, dtype=np.float64)
        velocity = np.polyfit(times, centroids, 1)[0]  # px per frame, (vx, vy); +y is down
        vx, vy = velocity
        if abs(vx) >= abs(vy):
            seen_direction = "right" if vx > 0 else "left"
        else:
            seen_direction = "down" if vy > 0 else "up"
    verdict = {
        "colour": colour,
        "direction": direction,
        "seen_colour": seen_colour,
        "seen_direction": seen_direction,
        "colour_fraction": round(float(fractions[CHROMATIC.index(colour)]), 4),
        "frames_with_colour": len(frames),
        "velocity_px_per_frame": None if velocity is None else [round(float(v), 3) for v in velocity],
        "colour_ok": seen_colour == colour,
        "direction_ok": seen_direction == direction,
    }
    if shape is not None:
        per_frame = [scores for t in frames[::SHAPE_FRAME_STRIDE] if (scores := shape_scores(mask[t])) is not None]
        mean = np.mean(per_frame, axis=0) if per_frame else None
        seen_shape = SHAPES[int(mean.argmax())] if mean is not None else None
        verdict.update(
            shape=shape,
            seen_shape=seen_shape,
            shape_iou={name: round(float(score), 3) for name, score in zip(SHAPES, mean)} if mean is not None else None,
            shape_ok=seen_shape == shape,
        )
    return verdict


def accuracy(verdicts: list[dict], motion: bool = True) -> dict:
    """Share of the verdicts right on each count; without ``motion`` (stills) no direction."""
    count = max(1, len(verdicts))
    share = lambda right: round(sum(right) / count, 4)  # noqa: E731
    result = {"videos": len(verdicts), "colour": share(v["colour_ok"] for v in verdicts)}
    if motion:
        result["direction"] = share(v["direction_ok"] for v in verdicts)
        result["both"] = share(v["colour_ok"] and v["direction_ok"] for v in verdicts)
    if all("shape_ok" in v for v in verdicts):
        result["shape"] = share(v["shape_ok"] for v in verdicts)
    return result


def training_videos(count: int, device: str, seed: int) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """``count`` training videos with one untextured chromatic shape, (B, 3, T, H, W) in [-1, 1],
    with (colour, direction, shape)."""
    data = ShapeVideos(REFERENCE_CALL_ARGS["num_frames"], REFERENCE_CALL_ARGS["height"], device, seed)
    videos, labels = [], []
    while len(labels) < count:
        batch, prompts = data.sample(64)
        for video, prompt in zip(batch, prompts):
            match = SINGLE_SHAPE.match(prompt)
            if match and len(labels) < count:
                videos.append(video)
                labels.append((match.group(1), match.group(3), match.group(2)))
    return torch.stack(videos), labels


def to_frames(videos: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, T, H, W) in [-1, 1] -> list of (T, H, W, 3) in [0, 1]."""
    return list(((videos.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy())


def check_detector(pipe, count: int, device: str, seed: int) -> dict:
    videos, labels = training_videos(count, device, seed)
    raw = [judge(frames, *label) for frames, label in zip(to_frames(videos), labels)]
    with torch.no_grad():
        vae = pipe.vae
        latents = vae.encode(videos.to(device=device, dtype=vae.dtype)).latent_dist.mode()
        decoded = vae.decode(latents).sample
    round_trip = [judge(frames, *label) for frames, label in zip(to_frames(decoded), labels)]
    return {"raw": accuracy(raw), "vae_round_trip": accuracy(round_trip)}


def generate(pipe, prompts: list[str], seeds: list[int], call_args: dict, batch: int) -> list[np.ndarray]:
    videos = []
    for start in range(0, len(prompts), batch):
        chunk = slice(start, start + batch)
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds[chunk]]
        output = pipe(prompts[chunk], **call_args, generator=generators, output_type="np")
        videos.extend(frames_to_array(frames) for frames in output.frames)
        print(f"  {min(start + batch, len(prompts))}/{len(prompts)}", flush=True)
    return videos


def write_grid(
    videos: list[np.ndarray], prompts: list[str], verdicts: list[dict], path: Path, motion: bool = True, scale: int = 2
) -> None:
    frames, height, width, _ = videos[0].shape
    frames_shown = (0, 8, 16) if motion else (0,)
    cell_w, cell_h, label, gap = len(frames_shown) * width * scale + 4, height * scale, 13, 6
    columns = len(DIRECTIONS)
    rows = (len(videos) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + label + gap) + gap + 14), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    title = "frames 0, 8, 16 of each prompt; [c] colour and [d] direction" if motion else "stills; [c] colour and [s] shape"
    draw.text((gap, 2), f"{title} as the detector saw them", fill="black", font=font)
    for index, (video, prompt, verdict) in enumerate(zip(videos, prompts, verdicts)):
        row, column = divmod(index, columns)
        left, top = gap + column * (cell_w + gap), 16 + row * (cell_h + label + gap)
        marks = ("c" if verdict["colour_ok"] else "-") + (
            ("d" if verdict["direction_ok"] else "-") if motion else ("s" if verdict["shape_ok"] else "-")
        )
        draw.text((left, top), f"{prompt} [{marks}]", fill="black", font=font)
        for k, frame in enumerate(frames_shown):
            tile = Image.fromarray((video[min(frame, frames - 1)] * 255).round().astype(np.uint8))
            canvas.paste(tile.resize((width * scale, height * scale), Image.NEAREST), (left + k * (width * scale + 2), top + label))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_PATH)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="videos per pipeline call (default 28 on a GPU, 4 on the CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="videos per (colour, direction), each with its own seed and shape")
    parser.add_argument("--detector-videos", type=int, default=200)
    parser.add_argument("--steps", type=int, default=REFERENCE_CALL_ARGS["num_inference_steps"], help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=REFERENCE_CALL_ARGS["guidance_scale"])
    parser.add_argument(
        "--frames",
        type=int,
        default=REFERENCE_CALL_ARGS["num_frames"],
        help="video frames to sample; 1 samples stills (colour and shape judged, direction not)",
    )
    parser.add_argument("--no-control", action="store_true", help="skip the empty-prompt control (halves the time)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "reference-adherence.json")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "reference-adherence.png")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.frames < 1 or (args.frames - 1) % 2:
        parser.error("--frames must be 1 or odd (the VAE compresses time in pairs after the first frame)")
    motion = args.frames > 1
    batch = args.batch or (28 if str(args.device).startswith("cuda") else 4)

    started = time.perf_counter()
    pipe = build_reference_pipeline(args.weights, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    detector = check_detector(pipe, args.detector_videos, args.device, seed=1234)
    print(f"detector on training videos: {detector}", flush=True)

    cases = list(product(CHROMATIC, DIRECTIONS)) * args.repeats
    shapes = [SHAPES[i % len(SHAPES)] for i in range(len(cases))]
    prompts = [f"{colour} {shape} moving {direction}" for (colour, direction), shape in zip(cases, shapes)]
    seeds = list(range(len(prompts)))
    call_args = dict(
        REFERENCE_CALL_ARGS, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, num_frames=args.frames
    )
    print("prompted:", flush=True)
    prompted = generate(pipe, prompts, seeds, call_args, batch)
    verdicts = [judge(video, *case, shape) for video, case, shape in zip(prompted, cases, shapes)]
    controls = None
    if not args.no_control:
        print("empty prompt, same seeds:", flush=True)
        unprompted = generate(pipe, [""] * len(prompts), seeds, call_args, batch)
        controls = [judge(video, *case, shape) for video, case, shape in zip(unprompted, cases, shapes)]

    report = {
        "what": "prompt adherence of the dense reference model: colour, direction and shape read off decoded pixels",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights": str(args.weights),
        "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "call_args": call_args,
        "detector": {
            "min_saturation": MIN_SATURATION,
            "max_rgb_distance": MAX_DISTANCE,
            "min_pixels_per_frame": MIN_PIXELS,
            "on_training_videos": detector,
        },
        "chance": {"colour": round(1 / len(CHROMATIC), 4), "direction": 0.25},
        "repeats": args.repeats,
        "prompted": accuracy(verdicts, motion),
        "prompted_by_direction": {
            direction: accuracy([v for v in verdicts if v["direction"] == direction], motion) for direction in DIRECTIONS
        },
        "empty_prompt_same_seeds": accuracy(controls, motion) if controls is not None else "not run (--no-control)",
        "videos": [dict(verdict, prompt=prompt, seed=seed) for verdict, prompt, seed in zip(verdicts, prompts, seeds)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    shown = len(CHROMATIC) * len(DIRECTIONS)
    write_grid(prompted[:shown], prompts[:shown], verdicts[:shown], args.png, motion)
    print(json.dumps({key: report[key] for key in ("prompted", "empty_prompt_same_seeds", "chance", "seconds")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
