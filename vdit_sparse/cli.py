"""The ``vdit-sparse`` command line.

``vdit-sparse generate``  text- or image-to-video under a profile, optionally beside dense
``vdit-sparse profiles``  the built-in profiles and what they do
``vdit-sparse eval``      quality of profiles against dense: JSON, Markdown table, PNG plot
``vdit-sparse inspect``   the method of every (layer, head) of a profile, as text and PNG
``vdit-sparse search``    search a Sparse-vDiT profile (one static pattern per head) on a model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_MODEL = "embedded:reference"
DEFAULT_PROMPT = "red circle moving right"
#: Containers ``write_video``'s H.264 stream goes into, chosen by the file name.
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2, before any work starts."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdit-sparse", description="Sparse attention for video DiTs in diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text- or image-to-video under a profile")
    gen.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, local directory, or an embedded pipeline (default {DEFAULT_MODEL}, the trained "
        "reference model; random-weight ones: embedded:cogvideox, embedded:cogvideox-2b, "
        "embedded:cogvideox-1.5, embedded:hunyuan-video, embedded:hunyuan-video-1.5, embedded:wan2.1, "
        "embedded:wan2.2, embedded:wan2.1-vace; image-to-video: embedded:cogvideox-5b-i2v, "
        "embedded:hunyuan-video-i2v, embedded:hunyuan-video-1.5-i2v, embedded:wan2.1-i2v, embedded:wan2.2-i2v)",
    )
    gen.add_argument("--image", type=Path, default=None,
                     help="first frame for an image-to-video pipeline (default for the embedded ones: a made-up image)")
    gen.add_argument("--profile", default=None,
                     help="built-in profile name or YAML path (default: the built-in profile for the model, "
                     "e.g. cogvideox-5b or hunyuan-video)")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--frames", type=int, default=None, help="video frames (default: the model's demo size)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None, help="denoising steps")
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--fps", type=int, default=8, help="frames per second of the written video")
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="default: bfloat16 on cuda, float32 on cpu")
    gen.add_argument("--out", type=Path, default=Path("out/video.mp4"), help="mp4 to write")
    gen.add_argument("--compare-dense", action="store_true",
                     help="also run dense with the same seed; report both wall times and the PSNR between them")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the transformer (after applying the profile); wall times then include "
                     "compilation, which the first call pays")
    gen.add_argument("--summary", type=Path, default=None,
                     help="JSON summary to write (default: next to --out, same name with .json)")

    commands.add_parser("profiles", help="list the built-in profiles")
    _add_eval_parser(commands)
    ins = commands.add_parser("inspect", help="the method of every (layer, head) of a profile, as text and PNG")
    ins.add_argument("profile", help="built-in profile name or YAML path")
    ins.add_argument("--model", default=None,
                     help="read the layer and head counts from this model (hub id, directory or embedded:...)")
    ins.add_argument("--layers", type=int, default=None, help="attention layers (instead of --model)")
    ins.add_argument("--heads", type=int, default=None, help="heads per layer (instead of --model)")
    ins.add_argument("--png", type=Path, default=None,
                     help="also draw the map to this PNG (and the layer sensitivities, when the profile has them, "
                     "to <name>-sensitivity.png)")
    _add_search_parser(commands)
    return parser


def _add_search_parser(commands) -> None:
    from .search import SearchSettings

    defaults = SearchSettings()
    se = commands.add_parser("search", help="search a Sparse-vDiT profile: one static pattern per (layer, head)")
    se.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"hub id, local directory or embedded:... (default {DEFAULT_MODEL})")
    se.add_argument("--out", type=Path, required=True, help="the profile YAML to write")
    se.add_argument("--name", default=None, help="the profile's name (default: the --out file name)")
    se.add_argument("--prompt", action="append", dest="prompts", default=None,
                    help="a prompt; repeat for several (default: the fixed set in vdit_sparse.evaluate)")
    se.add_argument("--prompts-file", type=Path, default=None, help="text file with one prompt a line")
    se.add_argument("--seeds", type=int, nargs="+", default=[0])
    se.add_argument("--frames", type=int, default=None, help="video frames (default: the model's demo size)")
    se.add_argument("--height", type=int, default=None)
    se.add_argument("--width", type=int, default=None)
    se.add_argument("--steps", type=int, default=None, help="denoising steps of the search runs")
    se.add_argument("--guidance-scale", type=float, default=None)
    se.add_argument("--negative-prompt", default=None)
    se.add_argument("--budget", type=float, default=defaults.budget,
                    help="target fraction of attention work on a sparse step (0-1]: the cost weight is fitted to "
                    "it, errors weighted by layer sensitivity (default: none, use --lam)")
    se.add_argument("--lam", type=float, default=defaults.lam, help=f"cost weight (default {defaults.lam})")
    se.add_argument("--epsilon", type=float, default=defaults.epsilon,
                    help=f"largest error a chosen mode may have (default {defaults.epsilon})")
    se.add_argument("--densities", type=float, nargs="+", default=list(defaults.densities),
                    help="densities tried for bands and stripes")
    se.add_argument("--modes", nargs="+", default=list(defaults.modes), help="modes tried (dense is always one)")
    se.add_argument("--num-samples", type=int, default=defaults.num_samples, help="query rows sampled per call")
    se.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction,
                    help="dense warm-up of the search runs and of the profile")
    se.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    se.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    se.add_argument("--no-resume", action="store_true", help="start over even when <out>.record.pt exists")


def _add_eval_parser(commands) -> None:
    ev = commands.add_parser("eval", help="score profiles against dense: PSNR, SSIM, latent L2, computed fraction")
    ev.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"hub id, local directory or embedded:... (default {DEFAULT_MODEL})")
    ev.add_argument("--profile", action="append", required=True, dest="profiles",
                    help="built-in profile name or YAML path; repeat for several")
    ev.add_argument("--prompt", action="append", dest="prompts", default=None,
                    help="a prompt; repeat for several (default: the fixed set in vdit_sparse.evaluate)")
    ev.add_argument("--prompts-file", type=Path, default=None, help="text file with one prompt a line")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0])
    ev.add_argument("--frames", type=int, default=None, help="video frames (default: the model's demo size)")
    ev.add_argument("--height", type=int, default=None)
    ev.add_argument("--width", type=int, default=None)
    ev.add_argument("--steps", type=int, default=None, help="denoising steps")
    ev.add_argument("--guidance-scale", type=float, default=None)
    ev.add_argument("--negative-prompt", default=None)
    ev.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ev.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed warm-up runs (wall times then include compilation and first-call costs)")
    ev.add_argument("--out-dir", type=Path, default=None,
                    help="where results.json, results.md and psnr_vs_computed.png go "
                    "(default: benchmarks/results/quality-<model>)")


def _call_args(args, family_defaults: dict) -> dict:
    call = dict(family_defaults)
    for arg_name, call_name in (
        ("frames", "num_frames"),
        ("height", "height"),
        ("width", "width"),
        ("steps", "num_inference_steps"),
        ("guidance_scale", "guidance_scale"),
    ):
        value = getattr(args, arg_name)
        if value is not None:
            if arg_name != "guidance_scale" and value < 1:
                raise UsageError(f"--{arg_name.replace('_', '-')} must be >= 1, got {value}")
            call[call_name] = value
    if args.negative_prompt is not None:
        call["negative_prompt"] = args.negative_prompt
    return call


def _writable_dir(directory: Path, flag: str) -> None:
    """Create ``directory`` and write a scratch file in it, so a run cannot fail there after the work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise UsageError(f"{flag}: cannot write to {str(directory)!r} ({error.strerror or error})") from None


def _check_generate_outputs(args) -> Path:
    """Check --out, --summary and --fps before any work; returns the summary path."""
    out = args.out
    if out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a directory; name the video file, e.g. {str(out / 'video.mp4')!r}")
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(
            f"--out {str(out)!r}: expected a video file name ending in {', '.join(VIDEO_SUFFIXES)}, "
            f"got {repr(out.suffix) if out.suffix else 'no extension'}"
        )
    summary = args.summary or out.with_suffix(".json")
    if summary.is_dir() or summary.resolve() == out.resolve():
        raise UsageError(f"--summary {str(summary)!r} must be a file name other than --out")
    if args.fps <= 0:
        raise UsageError(f"--fps must be >= 1, got {args.fps}")
    _writable_dir(out.parent, "--out")
    _writable_dir(summary.parent, "--summary")
    return summary


def _load_pipeline(model: str, dtype_name: str, device: str):
    """The pipeline for --model; a model that cannot be found or loaded is a usage error."""
    import torch

    from .embedded import load_pipeline

    try:
        return load_pipeline(model, dtype=getattr(torch, dtype_name), device=device)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {model!r}: {error}") from None


def _check_profiles(pipe, profiles: list) -> list:
    """Each profile checked against the loaded pipeline (family, layers, heads) before the first step."""
    from .api import check_profile

    try:
        return [check_profile(pipe, profile) for profile in profiles]
    except TypeError as error:  # an unsupported pipeline class
        raise UsageError(str(error)) from None


@contextlib.contextmanager
def _compiled_transformer(pipe, enabled: bool):
    """The pipeline's transformers (both of Wan 2.2's experts) wrapped by torch.compile inside the block (after any
    profile was applied), then restored."""
    if not enabled:
        yield
        return
    import torch

    originals = {name: getattr(pipe, name) for name in ("transformer", "transformer_2")
                 if getattr(pipe, name, None) is not None}
    for name, transformer in originals.items():
        setattr(pipe, name, torch.compile(transformer))
    try:
        yield
    finally:
        for name, transformer in originals.items():
            setattr(pipe, name, transformer)


def _read_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(f"--image {str(path)!r}: cannot read it as an image ({error})") from None


def _check_takes_image(pipe, model: str) -> None:
    import inspect

    if "image" not in inspect.signature(pipe.__call__).parameters:
        raise UsageError(
            f"--image: {model} is a text-to-video pipeline ({type(pipe).__name__}); image-to-video needs one such as "
            "CogVideoXImageToVideoPipeline or WanImageToVideoPipeline (embedded:cogvideox-5b-i2v, embedded:wan2.1-i2v)"
        )


def _generate(pipe, prompt: str, call_args: dict, seed: int, device: str):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    frames = pipe(prompt=prompt, generator=generator, output_type="np", **call_args).frames[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return frames, time.perf_counter() - start


def _cmd_generate(args) -> int:
    import torch

    from .api import accelerate_pipeline
    from .embedded import call_args_for
    from .metrics import psnr, relative_l2
    from .pipelines import find_adapter
    from .profile import load_profile
    from .video import write_video

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    # Everything that can be checked is checked before the first step: arguments and paths,
    # the profile on its own, then the profile against the loaded model.
    summary_path = _check_generate_outputs(args)
    call_args = _call_args(args, call_args_for(args.model))
    image = _read_image(args.image) if args.image is not None else None
    profile = load_profile(args.profile) if args.profile is not None else None
    pipe = _load_pipeline(args.model, dtype_name, device)
    if image is not None:
        _check_takes_image(pipe, args.model)
        call_args["image"] = image
    if profile is None:
        profile = find_adapter(pipe).default_profile(pipe)
    (profile,) = _check_profiles(pipe, [profile])

    report: dict = {
        "model": args.model,
        "pipeline": type(pipe).__name__,
        "profile": profile.name,
        "prompt": args.prompt,
        "seed": args.seed,
        "device": device,
        "dtype": dtype_name,
        "compiled": args.compile,
        "call_args": {key: value for key, value in call_args.items() if key != "image"},
    }
    if "image" in call_args:
        report["image"] = str(args.image) if args.image is not None else "the embedded model's demo image"
    dense_frames = None
    if args.compare_dense:
        print(f"[1/2] dense run of {report['pipeline']}")
        with _compiled_transformer(pipe, args.compile):
            dense_frames, report["dense_seconds"] = _generate(pipe, args.prompt, call_args, args.seed, device)

    print(f"[{2 if args.compare_dense else 1}/{2 if args.compare_dense else 1}] run under profile '{profile.name}'")
    # Apply first, compile after: the compiled transformer then runs the profile (README, "torch.compile").
    with accelerate_pipeline(pipe, profile) as handle, _compiled_transformer(pipe, args.compile):
        frames, report["sparse_seconds"] = _generate(pipe, args.prompt, call_args, args.seed, device)
        report["attention"] = handle.summary()

    write_video(frames, args.out, fps=args.fps)
    report["video"] = str(args.out)
    lines = [
        f"profile '{profile.name}' on {args.model}: {len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}, "
        f"{call_args.get('num_inference_steps', '?')} steps, {device} {dtype_name}",
        f"  attention computed: {100 * report['attention']['computed_fraction']:.1f}% of dense; "
        f"calls per path: {report['attention']['calls']}",
    ]
    if dense_frames is not None:
        report["speedup"] = report["dense_seconds"] / report["sparse_seconds"]
        report["psnr_db"] = psnr(frames, dense_frames)
        report["relative_l2"] = relative_l2(frames, dense_frames)
        lines += [
            f"  dense  : {report['dense_seconds']:.2f} s",
            f"  sparse : {report['sparse_seconds']:.2f} s ({report['speedup']:.2f}x)",
            f"  sparse vs dense: PSNR {report['psnr_db']:.2f} dB, relative L2 {report['relative_l2']:.4f}",
        ]
        if device == "cpu":
            lines.append("  (CPU wall times on a tiny model say nothing about GPU speed; see benchmarks/)")
        if args.compile:
            lines.append("  (each run compiled the transformer first: run twice in one process to time compiled steps)")
    else:
        lines.append(f"  time   : {report['sparse_seconds']:.2f} s")
    summary_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines.append(f"  wrote {args.out} and {summary_path}")
    print("\n".join(lines))
    return 0


def _cmd_profiles(args) -> int:
    from .profile import builtin_profiles, load_profile

    for name in builtin_profiles():
        description = " ".join(load_profile(name).profile.description.split())
        print(f"{name:24s} {description}")
    return 0


def _prompts(args) -> list[str]:
    """--prompt and --prompts-file together; the harness's fixed set when neither is given."""
    from .evaluate import DEFAULT_PROMPTS

    prompts = list(args.prompts or [])
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--prompts-file {str(args.prompts_file)!r}: cannot read it ({error})") from None
        from_file = [line.strip() for line in text.splitlines() if line.strip()]
        if not from_file:
            raise UsageError(f"--prompts-file {str(args.prompts_file)!r} holds no prompt (one prompt a line)")
        prompts += from_file
    return prompts or list(DEFAULT_PROMPTS)


def _cmd_search(args) -> int:
    import torch

    from .embedded import call_args_for
    from .search import SearchSettings, search_profile

    try:
        settings = SearchSettings(
            modes=tuple(args.modes), densities=tuple(args.densities), lam=args.lam, epsilon=args.epsilon,
            num_samples=args.num_samples, warmup_fraction=args.warmup_fraction, budget=args.budget,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    prompts = _prompts(args)
    if args.out.suffix.lower() not in (".yaml", ".yml"):
        raise UsageError(f"--out {str(args.out)!r}: expected a profile file name ending in .yaml")
    _writable_dir(args.out.parent, "--out")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    call_args = _call_args(args, call_args_for(args.model))
    pipe = _load_pipeline(args.model, dtype_name, device)
    profile = search_profile(
        pipe, prompts, args.seeds, call_args, settings, out=args.out, name=args.name or args.out.stem,
        model_name=args.model, resume=not args.no_resume,
    )
    provenance = profile["provenance"]
    print(
        f"wrote {args.out}: {provenance['sparse_step_computed_fraction']:.3f} of the attention work of a sparse step, "
        f"dense layers {profile['dense_layers']}, {provenance['seconds']:.0f} s"
    )
    print(f"see it with: vdit-sparse inspect {args.out} --png {args.out.with_suffix('.png')}")
    return 0


def _cmd_eval(args) -> int:
    import re

    import torch

    from .embedded import call_args_for
    from .evaluate import evaluate_profiles, write_report
    from .profile import load_profile

    prompts = _prompts(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    call_args = _call_args(args, call_args_for(args.model))
    out_dir = args.out_dir or Path("benchmarks/results") / ("quality-" + re.sub(r"[^A-Za-z0-9._-]+", "-", args.model))
    _writable_dir(out_dir, "--out-dir")
    profiles = [load_profile(profile) for profile in args.profiles]  # fail on a bad profile before loading a model

    pipe = _load_pipeline(args.model, dtype_name, device)
    profiles = _check_profiles(pipe, profiles)  # and on one for another model before the dense runs
    pipe.set_progress_bar_config(disable=True)
    results = evaluate_profiles(
        pipe, profiles, prompts, args.seeds, call_args, model_name=args.model, warmup=not args.no_warmup, progress=print
    )
    results["device"], results["dtype"] = device, dtype_name
    paths = write_report(results, out_dir)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")
    return 0


def _cmd_inspect(args) -> int:
    from .profile import load_profile
    from .profile_map import (
        format_method_map, format_sensitivities, method_map, sensitivities, write_method_map_png, write_sensitivity_png,
    )

    profile = load_profile(args.profile)
    spec = profile.profile.model
    layers, heads = args.layers or spec.num_layers, args.heads or spec.num_heads
    for flag, value in (("--layers", args.layers), ("--heads", args.heads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.png is not None and args.png.suffix.lower() != ".png":
        raise UsageError(f"--png {str(args.png)!r}: expected a file name ending in .png")
    if args.png is not None:
        _writable_dir(args.png.parent, "--png")
    if args.model is not None:
        pipe = _load_pipeline(args.model, "float32", "cpu")
        (profile,) = _check_profiles(pipe, [profile])
        from .pipelines import find_adapter

        adapter = find_adapter(pipe)
        layers, heads = adapter.layers_and_heads(pipe)
    if layers is None or heads is None:
        raise UsageError(
            f"profile '{profile.name}' does not state its layer and head counts (model.num_layers, model.num_heads); "
            "pass --model, or --layers and --heads"
        )
    if args.model is None:  # the counts given must fit the heads and layers the profile names
        profile.check_model(spec.family, layers, heads)
    grid = method_map(profile, layers, heads)
    steps, fraction = profile.profile.dense_warmup_steps, profile.profile.dense_warmup_fraction
    warmup = f"{steps} steps" if steps is not None else f"{fraction:g} of the steps" if fraction is not None else "none"
    print(f"profile '{profile.name}': {layers} layers x {heads} heads; dense warm-up: {warmup}")
    print(format_method_map(grid))
    curve = sensitivities(profile, layers)
    if any(value is not None for value in curve):
        print(format_sensitivities(curve, profile.profile.dense_layers))
    if args.png is not None:
        write_method_map_png(grid, args.png, title=f"{profile.name}: method per (layer, head)")
        print(f"wrote {args.png}")
        if any(value is not None for value in curve):
            curve_png = args.png.with_name(args.png.stem + "-sensitivity.png")
            write_sensitivity_png(curve, profile.profile.dense_layers, curve_png, title=f"{profile.name}: layer sensitivity")
            print(f"wrote {curve_png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from .profile import ProfileError

    try:
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "search":
            return _cmd_search(args)
        return _cmd_profiles(args)
    except (ProfileError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
