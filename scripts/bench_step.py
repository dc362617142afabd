"""Full-size transformer step time on one GPU: dense, the attention-free floor, and svg.

Builds the real-size transformer from its config with random bf16 weights
(speed does not depend on the weights), feeds real-size inputs and times one
transformer forward (median of ``--repeats``, after an untimed warm-up
forward that builds plans and tunes kernels) per configuration:

- ``dense``: the model's own processors under cuDNN SDPA;
- ``floor``: the same with attention replaced by a copy of v (what a step
  costs without attention: the ceiling of any attention method);
- ``floor-qk``: the same, but the stand-in reads q and k too: compiled, a
  plain copy lets inductor drop the q and k projections (see
  :func:`attention_replaced`);
- ``svg-<d>``: Sparse VideoGen at density d, first layer dense, heads
  classified at every step (``reprofile_every: 1``, the most expensive);
- ``svg-<d>-spatial``: every head forced spatial (no classification, no token
  order): the difference to ``svg-<d>`` is the cost of classifying and of the
  layout transformation;
- ``chipmunk-<k>``: Chipmunk attention deltas keeping ``k`` of the keys, the
  first two layers dense, timed on a sparse step (the untimed forward fills
  the cache) and, as ``chipmunk-<k>-dense-step``, on a scheduled dense step
  (step 0: dense attention, column mass, selection and the cache).  The
  50-step composition uses the default schedule's 4 dense steps.

``--compile-configs`` times the same under ``torch.compile(transformer)``
(applied after vdit-sparse, as the README says): the first call's time
(compilation included), whether the next two steps recompile (they run with
recompilation forbidden), the graph breaks, and the compiled step time.

For one sparse forward, torch.profiler counts the host synchronisations
(``cudaStreamSynchronize`` / ``cudaDeviceSynchronize``) inside the
transformer forward and the ``aten::copy_`` calls, beside the same counts of
the dense forward.  The timestep is passed as the pipelines pass it, a view
of the scheduler's timesteps, so the step is found as in a real run.  The
50-step total is composed as ``warm-up dense steps + the rest at the headline
density`` and compared with 50 dense steps.

    python scripts/bench_step.py --model cogvideox-5b --compile-configs dense svg \\
        --out benchmarks/results/step-cogvideox-5b-h200.json
    python scripts/bench_step.py --model hunyuan-video --densities 0.2 --warmup-steps 3 \\
        --out benchmarks/results/step-hunyuan-video-h200.json

``--layers``, ``--frames``, ``--height`` and ``--width`` shrink the model and
the inputs (smoke tests on a CPU: ``--device cpu --dtype float32``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch._dynamo
from torch._dynamo.utils import counters

# CogVideoX-5B's transformer config (THUDM/CogVideoX-5b, transformer/config.json).
COGVIDEOX_5B = dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42,
    text_embed_dim=4096, time_embed_dim=512, sample_width=90, sample_height=60, sample_frames=49,
    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226, activation_fn="gelu-approximate",
    timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
)
CONFIGS = ("dense", "floor", "floor-qk", "svg", "svg-spatial", "chipmunk")
# Latent inputs per model: 49 frames at 480x720 -> 13 x 60 x 90 latents, B = 2 (batched CFG);
# 129 frames at 720x1280 -> 33 x 90 x 160 latents, B = 1.
SHAPES = {"cogvideox-5b": dict(frames=13, height=60, width=90), "hunyuan-video": dict(frames=33, height=90, width=160)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), required=True)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25])
    parser.add_argument("--top-k", type=float, nargs="+", default=[0.05], help="chipmunk's kept share of keys")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=10, help="dense steps of the composed 50-step run")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per configuration (median)")
    parser.add_argument("--configs", nargs="*", default=["dense", "floor", "svg", "svg-spatial"],
                        choices=CONFIGS, help="eager configurations to time")
    parser.add_argument("--compile-configs", nargs="*", default=[], choices=CONFIGS,
                        help="configurations to time under torch.compile(transformer)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (smoke tests)")
    parser.add_argument("--frames", type=int, default=None, help="latent frames")
    parser.add_argument("--height", type=int, default=None, help="latent height")
    parser.add_argument("--width", type=int, default=None, help="latent width")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def build(args):
    """(transformer, forward keyword arguments without the timestep, pipe-like object with a scheduler)."""
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    shape = {**SHAPES[args.model], **{k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k)}}
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device, dtype=dtype)

    if args.model == "cogvideox-5b":
        from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

        config = dict(COGVIDEOX_5B, **({"num_layers": args.layers} if args.layers else {}))
        with device:
            model = CogVideoXTransformer3DModel(**config).to(dtype).eval()
        fake_pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
        rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(
            fake_pipe, shape["height"] * 8, shape["width"] * 8, shape["frames"], device
        )
        inputs = dict(
            hidden_states=randn(2, shape["frames"], 16, shape["height"], shape["width"]),
            encoder_hidden_states=randn(2, 226, 4096),
            image_rotary_emb=rotary,
        )
        scheduler = CogVideoXDPMScheduler(timestep_spacing="trailing")
        batch = 2
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

        layers = {} if args.layers is None else {"num_layers": args.layers, "num_single_layers": 2 * args.layers}
        with device:
            model = HunyuanVideoTransformer3DModel(**layers).to(dtype).eval()
        config = model.config
        text_len, real_text = 256, 40
        mask = torch.zeros(1, text_len, dtype=torch.bool, device=device)
        mask[:, :real_text] = True
        inputs = dict(
            hidden_states=randn(1, config.in_channels, shape["frames"], shape["height"], shape["width"]),
            encoder_hidden_states=randn(1, text_len, config.text_embed_dim),
            encoder_attention_mask=mask,
            pooled_projections=randn(1, config.pooled_projection_dim),
            guidance=torch.tensor([6000.0], device=device, dtype=dtype),
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
        batch = 1
    scheduler.set_timesteps(args.steps, device=device)
    pipe = SimpleNamespace(transformer=model, scheduler=scheduler, current_timestep=None)
    return model, inputs, pipe, batch, shape


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward(model, inputs, pipe, batch: int, step: int):
    # As the pipelines do: the transformer gets a view of the schedule's entry.
    timestep = pipe.scheduler.timesteps[step]
    pipe.current_timestep = timestep
    model(**inputs, timestep=timestep.expand(batch), return_dict=False)


def timed(model, inputs, pipe, batch, step, repeats, device, later_steps=None) -> float:
    """Median time of ``repeats`` forwards at ``step`` after an untimed one there; with ``later_steps``, the
    timed forwards run at those steps instead (a method with state across steps sees a run advance:
    repeated forwards at one step are what separate CFG calls look like)."""
    forward(model, inputs, pipe, batch, step)  # warm-up: plans, autotuning, lazy initialisation
    times = []
    for repeat in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        forward(model, inputs, pipe, batch, later_steps[repeat] if later_steps else step)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def profile_counts(model, inputs, pipe, batch, step, device) -> dict:
    """Host synchronisations and copies inside one transformer forward (torch.profiler).

    Counted within the forward's own range, so the profiler's and our own
    synchronisations around it are left out.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        with record_function("transformer_forward"):
            forward(model, inputs, pipe, batch, step)
        synchronize(device)
    events = prof.events()
    span = next(e for e in events if e.name == "transformer_forward" and e.device_type.name == "CPU").time_range
    inside = [e for e in events if e.device_type.name == "CPU" and span.start <= e.time_range.start <= span.end]
    syncs: dict[str, int] = {}
    for event in inside:
        if "Synchronize" in event.name or event.name in ("aten::_local_scalar_dense", "cudaMemcpy"):
            syncs[event.name] = syncs.get(event.name, 0) + 1
    copy_us = total_us = 0.0
    for row in prof.key_averages():
        device_us = getattr(row, "self_device_time_total", getattr(row, "self_cuda_time_total", 0.0))
        total_us += device_us
        if row.key == "aten::copy_":
            copy_us = device_us
    return {
        "host_syncs_in_forward": sum(n for name, n in syncs.items() if "Synchronize" in name),
        "sync_events": syncs,
        "copy_calls": sum(1 for e in inside if e.name == "aten::copy_"),
        "copy_device_share": copy_us / total_us if total_us else None,
    }


@contextlib.contextmanager
def attention_replaced(keep_queries_and_keys: bool = False):
    """SDPA returns a copy of v: the step without attention (the processors call it at call time).

    Compiled, a copy of v leaves q and k unused, and inductor drops their
    projections, norms and rotary embedding: a floor lower than any attention
    method can reach.  ``keep_queries_and_keys`` returns ``v + 1e-30 * (q + k)``
    instead, which keeps them computed at the cost of one elementwise pass.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def copy_of_value(*args, **kwargs):  # diffusers passes query=, key=, value= by name
        q, k, v = (kwargs[name] if name in kwargs else args[i] for i, name in enumerate(("query", "key", "value")))
        return v + 1e-30 * (q + k) if keep_queries_and_keys else v.clone()

    torch.nn.functional.scaled_dot_product_attention = copy_of_value
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def measure(model, inputs, pipe, batch, step, args, profile, compiled: bool, later_steps=None) -> dict:
    """One configuration: the step time, and (eager) its profiler counts or (compiled) its compile figures.

    ``profile`` None is the untouched model.  Compiled, the first forward
    compiles (its time is reported), then forwards at the next two steps run
    with recompilation forbidden, then the timed ones.
    """
    from vdit_sparse import accelerate_pipeline

    handle = accelerate_pipeline(pipe, profile) if profile is not None else None
    try:
        row: dict = {}
        if compiled:
            torch._dynamo.reset()
            runner = torch.compile(model)
            synchronize(args.device)
            start = time.perf_counter()
            forward(runner, inputs, pipe, batch, step)
            synchronize(args.device)
            row["first_call_s"] = time.perf_counter() - start
            torch._dynamo.config.error_on_recompile = True
            try:
                for later in (step + 1, step + 2):
                    forward(runner, inputs, pipe, batch, later)
                row["recompiled_after_first_call"] = False
            except Exception as error:  # a recompile raises here
                row["recompiled_after_first_call"] = str(error).splitlines()[0]
            finally:
                torch._dynamo.config.error_on_recompile = False
            row["graph_breaks"] = {reason.splitlines()[0][:120]: n for reason, n in counters["graph_break"].items()}
        else:
            runner = model
        row["step_s"] = timed(runner, inputs, pipe, batch, step, args.repeats, args.device, later_steps)
        if not compiled and later_steps is None:
            row.update(profile_counts(runner, inputs, pipe, batch, step, args.device))
        if handle is not None:
            summary = handle.summary()
            row["computed_fraction"] = summary["computed_fraction"]
            row["state_bytes_after_forward"] = handle.state.nbytes()
        return row
    finally:
        if handle is not None:
            handle.remove()


def main():
    args = parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vdit_sparse.pipelines import find_adapter

    torch.manual_seed(0)
    model, inputs, pipe, batch, shape = build(args)
    step = min(args.warmup_steps + 1, args.steps - 4)  # a step past the warm-up
    on_gpu = args.device.startswith("cuda")
    results: dict = {
        "gpu": torch.cuda.get_device_name() if on_gpu else platform.processor(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "diffusers": __import__("diffusers").__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "model": f"{type(model).__name__}, {args.model} config, random {args.dtype} weights",
        "batch": batch,
        "latent_shape": shape,
        "sequence": find_adapter(pipe).token_layout(model, {**inputs, "timestep": None}).seq_len,
        "repeats": args.repeats,
    }
    dense_backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    sdpa = sdpa_kernel(dense_backends, set_priority=True) if on_gpu else contextlib.nullcontext()

    def svg(density: float, head_kind: str) -> dict:
        return {"name": f"svg-{density}-{head_kind}", "method": "svg", "dense_layers": [0],
                "params": {"density": density, "head_kind": head_kind, "reprofile_every": 1}}

    configs: dict[str, dict] = {}
    with torch.no_grad(), sdpa:
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            wanted = args.compile_configs if compiled else args.configs
            prefix = "compiled-" if compiled else ""
            runs = []
            if "dense" in wanted:
                runs.append(("dense", None, {}))
            runs += [(name, None, {}) for name in ("floor", "floor-qk") if name in wanted]
            for density in args.densities:
                if "svg" in wanted:
                    runs.append((f"svg-{density}", svg(density, "auto"), {"density": density}))
                if "svg-spatial" in wanted:
                    runs.append((f"svg-{density}-spatial", svg(density, "spatial"), {"density": density}))
            if "chipmunk" in wanted:
                for top_k in args.top_k:
                    profile = {"name": f"chipmunk-{top_k}", "method": "chipmunk", "dense_layers": [0, 1],
                               "params": {"top_k": top_k}}
                    # sparse steps after a refresh at `step`; refresh steps 1, 10, 40 after step 0
                    sparse_steps = [s for s in range(step + 1, args.steps) if s not in (10, 40)][: args.repeats]
                    runs.append((f"chipmunk-{top_k}", profile, {"top_k": top_k, "later_steps": sparse_steps}))
                    runs.append((f"chipmunk-{top_k}-dense-step", profile,
                                 {"top_k": top_k, "at_step": 0, "later_steps": [1, 10, 40][: args.repeats]}))
            for name, profile, extra in runs:
                floor = attention_replaced(name == "floor-qk") if name.startswith("floor") else contextlib.nullcontext()
                at, later = extra.get("at_step", step), extra.get("later_steps")
                with floor:
                    row = {"mode": mode, **extra,
                           **measure(model, inputs, pipe, batch, at, args, profile, compiled, later)}
                configs[prefix + name] = row
                print(f"{prefix + name}: {row['step_s']:.3f} s" + "".join(
                    f", {key} {row[key]}" for key in ("first_call_s", "recompiled_after_first_call", "computed_fraction",
                                                       "host_syncs_in_forward") if key in row
                ))
    results["configs"] = configs
    for name, row in configs.items():
        if "dense" in configs and name != "dense":
            row["speedup_over_eager_dense"] = configs["dense"]["step_s"] / row["step_s"]
        if "compiled-dense" in configs and name.startswith("compiled-") and name != "compiled-dense":
            row["speedup_over_compiled_dense"] = configs["compiled-dense"]["step_s"] / row["step_s"]
    headline = f"svg-{args.densities[0]}"
    if headline in configs and f"{headline}-spatial" in configs:
        classified, forced = configs[headline]["step_s"], configs[f"{headline}-spatial"]["step_s"]
        results["classification_and_layout"] = {
            "density": args.densities[0], "classified_step_s": classified, "forced_spatial_step_s": forced,
            "overhead_s": classified - forced, "classified_over_forced": classified / forced,
        }
    for sparse_name, dense_name in ((headline, "dense"), (f"compiled-{headline}", "compiled-dense")):
        if sparse_name in configs and dense_name in configs:
            dense, sparse = configs[dense_name]["step_s"], configs[sparse_name]["step_s"]
            sparse_total = args.warmup_steps * dense + (args.steps - args.warmup_steps) * sparse
            results.setdefault("composed", {})[sparse_name] = {
                "schedule": f"{args.warmup_steps} of {args.steps} steps {dense_name}, then {sparse_name} "
                "(first layer dense, heads classified every step)",
                "dense_total_s": args.steps * dense,
                "sparse_total_s": sparse_total,
                "speedup": args.steps * dense / sparse_total,
            }
    for top_k in args.top_k:
        sparse_name, dense_name = f"chipmunk-{top_k}", f"chipmunk-{top_k}-dense-step"
        if sparse_name in configs and dense_name in configs and "dense" in configs:
            dense, sparse, refresh = (configs[n]["step_s"] for n in ("dense", sparse_name, dense_name))
            total = 4 * refresh + (args.steps - 4) * sparse
            results.setdefault("composed", {})[sparse_name] = {
                "schedule": f"4 of {args.steps} steps dense with the cache refreshed (steps 0, 1, 10, 40), "
                f"the rest {sparse_name}", "dense_total_s": args.steps * dense, "sparse_total_s": total,
                "speedup": args.steps * dense / total,
            }
    print(json.dumps({k: results[k] for k in ("classification_and_layout", "composed") if k in results}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
