"""Full-size HunyuanVideo step time, dense vs Sparse VideoGen, on one GPU.

Builds the real-size ``HunyuanVideoTransformer3DModel`` (its default config:
20 dual-stream + 40 single-stream blocks, 24 heads of 128) with random bf16
weights (speed does not depend on the weights), feeds 720p x 129-frame inputs
(33 x 45 x 80 = 118,800 video tokens + 256 text tokens, 40 of them real), and
times one transformer forward per configuration:

- dense: the model's own processors under cuDNN SDPA (FlashAttention /
  efficient attention if cuDNN refuses the mask; the JSON says which ran);
- svg at each density, first layer dense, classifying every step
  (``reprofile_every: 1``, the most expensive setting);
- svg at the headline density with every head forced spatial: no profiling
  and no permutation, so the difference to the classified run is the cost of
  profiling plus the layout transformation.

The 50-step total is composed as ``warmup * dense + (50 - warmup) * sparse``
with ``warmup = 3`` and the headline density, and compared with ``50 * dense``.

    python scripts/bench_svg_hunyuan.py --out benchmarks/results/svg-hunyuan-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=33, help="latent frames (129 video frames -> 33)")
    parser.add_argument("--height", type=int, default=90, help="latent height (720 px / 8)")
    parser.add_argument("--width", type=int, default=160, help="latent width (1280 px / 8)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.15, 0.25, 0.35])
    parser.add_argument("--headline-density", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per configuration (median)")
    parser.add_argument("--layers", type=int, default=None, help="use fewer dual/single layers (smoke tests only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/svg-hunyuan-h200.json"))
    return parser.parse_args()


def build_transformer(layers: int | None):
    from diffusers import HunyuanVideoTransformer3DModel

    kwargs = {} if layers is None else {"num_layers": layers, "num_single_layers": 2 * layers}
    with torch.device("cuda"):
        model = HunyuanVideoTransformer3DModel(**kwargs).to(torch.bfloat16).eval()
    return model


def make_inputs(model, args):
    config = model.config
    generator = torch.Generator(device="cuda").manual_seed(0)
    text_len, real_text = 256, 40
    mask = torch.zeros(1, text_len, dtype=torch.bool, device="cuda")
    mask[:, :real_text] = True
    return {
        "hidden_states": torch.randn(
            1, config.in_channels, args.frames, args.height, args.width,
            generator=generator, device="cuda", dtype=torch.bfloat16,
        ),
        "encoder_hidden_states": torch.randn(
            1, text_len, config.text_embed_dim, generator=generator, device="cuda", dtype=torch.bfloat16
        ),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(
            1, config.pooled_projection_dim, generator=generator, device="cuda", dtype=torch.bfloat16
        ),
        "guidance": torch.tensor([6000.0], device="cuda", dtype=torch.bfloat16),
    }


def timed_forward(model, inputs, timestep: float, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(**inputs, timestep=torch.tensor([timestep], device="cuda", dtype=torch.bfloat16), return_dict=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def dense_step(model, inputs, timestep, repeats) -> tuple[float, str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backends in (
        ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
        ("flash/efficient", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]),
    ):
        try:
            with sdpa_kernel(backends):
                timed_forward(model, inputs, timestep, 1)  # warm-up (and the check that the backend runs)
                return timed_forward(model, inputs, timestep, repeats), name
        except RuntimeError as error:
            print(f"dense with {name} failed ({str(error).splitlines()[0]}); trying the next backend")
    raise RuntimeError("no SDPA backend ran the dense step")


def main():
    args = parse_args()
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.hooks import HookRegistry

    from vdit_sparse import accelerate_pipeline

    torch.manual_seed(0)
    model = build_transformer(args.layers)
    inputs = make_inputs(model, args)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    scheduler.set_timesteps(args.steps, device="cuda")
    pipe = SimpleNamespace(transformer=model, scheduler=scheduler)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    # A step past the warm-up, so the sparse path runs.
    timestep = float(scheduler.timesteps[args.warmup_steps + 1])

    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "model": "HunyuanVideoTransformer3DModel default config, random bf16 weights",
        "num_layers": len(model.transformer_blocks) + len(model.single_transformer_blocks),
        "latent_grid": [args.frames, args.height // 2, args.width // 2],
        "sequence": args.frames * (args.height // 2) * (args.width // 2) + 256,
        "repeats": args.repeats,
    }
    with torch.no_grad():
        results["dense_step_s"], results["dense_backend"] = dense_step(model, inputs, timestep, args.repeats)
        print(f"dense step: {results['dense_step_s']:.2f} s ({results['dense_backend']})")

        def sparse(density: float, head_kind: str = "auto") -> tuple[float, dict]:
            profile = {
                "name": f"svg-{density}-{head_kind}",
                "method": "svg",
                "params": {"density": density, "head_kind": head_kind, "reprofile_every": 1},
                "dense_warmup_steps": args.warmup_steps,
                "dense_layers": [0],
            }
            with accelerate_pipeline(pipe, profile) as handle:
                timed_forward(model, inputs, timestep, 1)  # compile and warm up
                registry.reset_stateful_hooks()  # forget the decisions: the timed forward classifies again
                seconds = timed_forward(model, inputs, timestep, args.repeats)
                summary = handle.summary()
                registry.reset_stateful_hooks()
            return seconds, summary

        results["sparse"] = []
        for density in sorted(set(args.densities + [args.headline_density])):
            seconds, summary = sparse(density)
            row = {
                "density": density,
                "step_s": seconds,
                "speedup": results["dense_step_s"] / seconds,
                "computed_fraction": summary["computed_fraction"],
                "calls": summary["calls"],
            }
            results["sparse"].append(row)
            print(f"svg density {density}: {seconds:.2f} s, {row['speedup']:.2f}x, computed {summary['computed_fraction']:.3f}")

        forced, _ = sparse(args.headline_density, head_kind="spatial")
        headline = next(r for r in results["sparse"] if r["density"] == args.headline_density)
        overhead = headline["step_s"] - forced
        results["overhead"] = {
            "density": args.headline_density,
            "classified_step_s": headline["step_s"],
            "forced_spatial_step_s": forced,
            "profiling_and_layout_s": overhead,
            "fraction_of_sparse_step": overhead / headline["step_s"],
        }
        dense_total = args.steps * results["dense_step_s"]
        sparse_total = args.warmup_steps * results["dense_step_s"] + (args.steps - args.warmup_steps) * headline["step_s"]
        results["composed"] = {
            "schedule": f"{args.warmup_steps} of {args.steps} steps dense, first layer dense, "
            f"svg density {args.headline_density} on the rest, classified every step",
            "dense_total_s": dense_total,
            "sparse_total_s": sparse_total,
            "speedup": dense_total / sparse_total,
        }
        print(json.dumps(results["overhead"], indent=2))
        print(json.dumps(results["composed"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
