"""The quality harness: a pipeline dense and under each profile, on fixed prompts and seeds.

For every (prompt, seed) the pipeline runs once dense, then once under each
profile (inside ``with accelerate_pipeline(...)``), with the same generator
seed.  Each run stops at the final latents (``output_type="latent"``); the
harness then decodes them through the pipeline's own decode path, so the
latent figure and the frame figures come from one denoising run.  Per
profile and per (prompt, seed) it reports:

- ``psnr_db`` and ``ssim`` of the decoded frames (in [0, 1]) against dense;
- ``latent_relative_l2``: ``||z - z_dense|| / ||z_dense||`` on the final latents;
- ``computed_fraction``: the share of dense attention work done
  (``handle.summary()["computed_fraction"]``, text and dense warm-up included);
- ``seconds``: wall time of the denoising call (decoding not included).

Means over (prompt, seed) go in ``mean``; PSNR is averaged in dB, as the
papers do.  :func:`write_report` turns the results into JSON, a Markdown
table and a PNG of PSNR against computed fraction.

Example::

    from vdit_sparse.embedded import DEMO_CALL_ARGS, load_pipeline
    from vdit_sparse.evaluate import evaluate_profiles, write_report

    results = evaluate_profiles(lambda: load_pipeline("embedded:cogvideox"), ["dense", "sliding-frames"],
                                prompts=["a red ball moves left"], seeds=[0],
                                call_args=dict(DEMO_CALL_ARGS["cogvideox"]))
    write_report(results, "benchmarks/results/quality-embedded")
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from .api import accelerate_pipeline, check_profile
from .metrics import psnr, relative_l2, ssim
from .pipelines import find_adapter
from .profile import Profile, ResolvedProfile, load_profile

__all__ = ["DEFAULT_PROMPTS", "evaluate_profiles", "write_report", "markdown_table"]

DEFAULT_PROMPTS = (
    "red circle moving right",
    "blue square moving left spinning",
    "yellow triangle moving down and green ring moving up",
)
"""A fixed prompt set for reports, in the words the reference model was trained on."""

ProfileLike = Union[str, Path, dict, Profile, ResolvedProfile]


def _decode_latents(pipe: Any, latents: torch.Tensor, call_args: dict) -> np.ndarray:
    """Final latents -> frames ``(B, F, H, W, C)`` in [0, 1], exactly as the pipeline's own
    ``output_type="np"`` path would decode them."""
    with torch.no_grad():
        video = find_adapter(pipe).decode_latents(pipe, latents, call_args)
        return pipe.video_processor.postprocess_video(video=video, output_type="np")


def _run(pipe: Any, prompt: str, seed: int, call_args: dict) -> tuple[torch.Tensor, float]:
    device = getattr(pipe, "device", torch.device("cpu"))
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    synchronize()
    start = time.perf_counter()
    latents = pipe(prompt=prompt, generator=generator, output_type="latent", **call_args).frames
    synchronize()
    return latents, time.perf_counter() - start


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _machine() -> dict:
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import diffusers

        machine["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    return machine


def _unique_labels(profiles: list[ResolvedProfile]) -> list[str]:
    labels, seen = [], {}
    for profile in profiles:
        count = seen.get(profile.name, 0) + 1
        seen[profile.name] = count
        labels.append(profile.name if count == 1 else f"{profile.name}#{count}")
    return labels


def evaluate_profiles(
    pipe: Any,
    profiles: Sequence[ProfileLike],
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    seeds: Sequence[int] = (0,),
    call_args: dict | None = None,
    *,
    model_name: str | None = None,
    warmup: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Score each profile against dense on every (prompt, seed); returns a JSON-ready dict.

    ``pipe`` is a diffusers video pipeline or a zero-argument callable that
    builds one.  ``profiles`` are anything :func:`accelerate_pipeline` takes
    (built-in names, YAML paths, dicts, :class:`Profile`); each is loaded and
    checked against the pipeline before any run.  ``call_args`` are the pipeline keyword arguments
    (size, frames, steps, guidance), without ``prompt``, ``generator`` or
    ``output_type``.  ``warmup`` first runs the first prompt and seed once
    dense and once per profile, untimed, so one-time costs (lazy
    initialisation, kernel compilation and autotuning) stay out of the wall
    times; the quality figures do not depend on it.  ``progress`` receives a
    line per run (e.g. ``print``).

    The result holds ``machine``, ``date``, ``model``, ``pipeline``,
    ``prompts``, ``seeds``, ``call_args``, ``dense`` (per-run wall times) and
    ``profiles``: one entry per profile, in order, with ``runs`` (per prompt
    and seed) and ``mean``.
    """
    if not profiles:
        raise ValueError("evaluate_profiles: give at least one profile to compare with dense")
    if not prompts or not seeds:
        raise ValueError(
            f"evaluate_profiles: need at least one prompt and one seed, got {len(prompts)} and {len(seeds)}"
        )
    call_args = dict(call_args or {})
    reserved = sorted({"prompt", "generator", "output_type"} & set(call_args))
    if reserved:
        raise ValueError(f"evaluate_profiles: call_args must not set {reserved}; the harness sets them per run")
    resolved = [load_profile(profile) for profile in profiles]  # a bad profile fails before building a pipeline
    labels = _unique_labels(resolved)
    if not hasattr(pipe, "transformer") and callable(pipe):
        pipe = pipe()
    resolved = [check_profile(pipe, profile) for profile in resolved]  # and one for another model before any run
    say = progress or (lambda line: None)
    if warmup:
        say("warm-up: one untimed run dense and one per profile")
        _run(pipe, prompts[0], seeds[0], call_args)
        for profile in resolved:
            with accelerate_pipeline(pipe, profile):
                _run(pipe, prompts[0], seeds[0], call_args)

    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "model": model_name,
        "pipeline": type(pipe).__name__,
        "prompts": list(prompts),
        "seeds": [int(seed) for seed in seeds],
        "call_args": call_args,
        "warmup": warmup,
        "dense": {"runs": []},
        "profiles": [
            {"label": label, "name": profile.name, "description": profile.profile.description, "runs": []}
            for label, profile in zip(labels, resolved)
        ],
    }
    for prompt in prompts:
        for seed in seeds:
            dense_latents, dense_seconds = _run(pipe, prompt, seed, call_args)
            dense_frames = _decode_latents(pipe, dense_latents, call_args)
            results["dense"]["runs"].append({"prompt": prompt, "seed": int(seed), "seconds": dense_seconds})
            say(f"dense          seed {seed}: {dense_seconds:.2f} s  | {prompt}")
            for entry, profile in zip(results["profiles"], resolved):
                with accelerate_pipeline(pipe, profile) as handle:
                    latents, seconds = _run(pipe, prompt, seed, call_args)
                    summary = handle.summary()
                frames = _decode_latents(pipe, latents, call_args)
                run = {
                    "prompt": prompt,
                    "seed": int(seed),
                    "psnr_db": psnr(frames, dense_frames),
                    "ssim": ssim(frames, dense_frames),
                    "latent_relative_l2": relative_l2(latents, dense_latents),
                    "computed_fraction": summary["computed_fraction"],
                    "seconds": seconds,
                    "speedup": dense_seconds / seconds,
                    "attention_calls": summary["calls"],
                }
                entry["runs"].append(run)
                say(
                    f"{entry['label']:14s} seed {seed}: {seconds:.2f} s, PSNR {run['psnr_db']:.2f} dB, "
                    f"SSIM {run['ssim']:.4f}, computed {run['computed_fraction']:.3f}"
                )
    for entry in results["profiles"]:
        runs = entry["runs"]
        entry["mean"] = {
            key: _mean([run[key] for run in runs])
            for key in ("psnr_db", "ssim", "latent_relative_l2", "computed_fraction", "seconds", "speedup")
        }
    results["dense"]["mean_seconds"] = _mean([run["seconds"] for run in results["dense"]["runs"]])
    return results


def markdown_table(results: dict) -> str:
    """One row per profile with the mean figures."""
    lines = [
        f"Quality against dense: {results.get('model') or results['pipeline']}, "
        f"{len(results['prompts'])} prompts x {len(results['seeds'])} seeds, {results['date']}",
        "",
        "| profile | computed fraction | PSNR (dB) | SSIM | latent rel. L2 | seconds | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| dense (reference) | 1.000 | inf | 1.0000 | 0.0000 | {results['dense']['mean_seconds']:.2f} | 1.00x |",
    ]
    for entry in results["profiles"]:
        mean = entry["mean"]
        lines.append(
            f"| {entry['label']} | {mean['computed_fraction']:.3f} | {mean['psnr_db']:.2f} | {mean['ssim']:.4f} | "
            f"{mean['latent_relative_l2']:.4f} | {mean['seconds']:.2f} | {mean['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _json_ready(value: Any) -> Any:
    # JSON has no inf or nan: identical outputs have PSNR inf, written as the string "inf".
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def write_report(results: dict, out_dir: Union[str, Path]) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``psnr_vs_computed.png`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "plot": out_dir / "psnr_vs_computed.png",
    }
    paths["json"].write_text(json.dumps(_json_ready(results), indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown_table(results))
    points = [(e["label"], e["mean"]["computed_fraction"], e["mean"]["psnr_db"]) for e in results["profiles"]]
    _plot_quality(points, paths["plot"], title=f"PSNR vs dense: {results.get('model') or results['pipeline']}")
    return paths


def _plot_quality(points: list[tuple[str, float, float]], path: Path, title: str) -> None:
    """A scatter of mean PSNR (dB) against computed fraction, drawn with PIL.

    matplotlib is not a dependency, and a labelled scatter needs little; a
    profile identical to dense (PSNR inf) is drawn on the top edge and listed as
    "inf" in the legend.
    """
    from PIL import Image, ImageDraw, ImageFont

    # the plot area, then a legend column on the right (labels beside close points would overlap)
    width, height, legend_width = 600, 420, 260
    left, right, top, bottom = 60, 30, 50, 50
    image = Image.new("RGB", (width + legend_width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    finite = [p for _, _, p in points if math.isfinite(p)]
    low = math.floor(min(finite) - 1) if finite else 0.0
    high = math.ceil(max(finite) + 1) if finite else 50.0
    if high - low < 5:
        high = low + 5

    def to_pixel(fraction: float, value: float) -> tuple[float, float]:
        x = left + fraction * (width - left - right)
        value = high if not math.isfinite(value) else value
        y = height - bottom - (value - low) / (high - low) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in range(0, 11, 2):
        x, _ = to_pixel(tick / 10, low)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 8, height - bottom + 8), f"{tick / 10:.1f}", fill="black", font=font)
    step = max(1, round((high - low) / 6))
    for tick in range(int(low), int(high) + 1, step):
        _, y = to_pixel(0.0, tick)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 30, y - 6), f"{tick}", fill="black", font=font)
    draw.text((width / 2 - 60, height - 22), "computed attention fraction", fill="black", font=font)
    draw.text((8, top - 18), "PSNR (dB)", fill="black", font=font)
    draw.text((left, 10), title, fill="black", font=font)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    draw.text((width + 4, top - 18), "profile: computed fraction, PSNR", fill="black", font=font)
    for index, (label, fraction, value) in enumerate(points):
        x, y = to_pixel(min(max(fraction, 0.0), 1.0), value)
        colour = colours[index % len(colours)]
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        legend_y = top + 18 * index
        draw.ellipse([width + 4, legend_y + 3, width + 12, legend_y + 11], fill=colour)
        figure = "inf" if not math.isfinite(value) else f"{value:.2f} dB"
        draw.text((width + 18, legend_y), f"{label}: {fraction:.3f}, {figure}", fill="black", font=font)
    image.save(path)
