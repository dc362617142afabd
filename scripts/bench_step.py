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
- ``dense-kernel``: every layer through vdit-sparse's processor, every block
  of every head on the block-sparse kernel (svg at density 1 with every head
  spatial: dense attention, exact, no classification): the dense baseline on
  vdit-sparse's own path.  For HunyuanVideo 1.5 this is the fair one: the
  model's own processor builds an ``(S, S)`` boolean mask in every layer and
  SDPA then takes a masked kernel, where vdit-sparse passes key padding;
- ``skip``: every layer through vdit-sparse's processor with its attention
  output zero (the ``skip`` method): the floor of any method on that path
  (``floor`` keeps the model's own processor, mask building included);
- ``svg-<d>``: Sparse VideoGen at density d, first layer dense, heads
  classified at every step (``reprofile_every: 1``, the most expensive);
- ``svg-<d>-spatial``: every head forced spatial (no classification, no token
  order): the difference to ``svg-<d>`` is the cost of classifying and of the
  layout transformation;
- ``svdit-<d>``: Sparse-vDiT with a fixed mode mix standing in for a
  searched profile (a search needs the real weights; the step time depends
  on the mix, not on which heads get which mode): the heads of every layer
  but the first (dense) cycle through diagonal, multi-diagonal and
  vertical-stripe patterns at density d (:func:`svdit_mix_profile`), all of
  a layer's heads in one launch;
- ``chipmunk-<k>``: Chipmunk attention deltas keeping ``k`` of the keys (and,
  with ``--mlp-top-k``, feed-forward deltas recomputing that share of hidden
  units), the first two layers dense, timed on a sparse step (the untimed
  forward fills the cache) and, as ``chipmunk-<k>-dense-step``, on a
  scheduled dense step (dense attention, column mass, selection and the
  caches); ``chipmunk-<k>-cpu`` is the sparse step with the attention caches
  in host memory (``cache_device: cpu``), whose output is checked to be
  bit-identical to the GPU-cache one; ``chipmunk-<k>-skipped-step`` a step
  that step caching skips.  The 50-step compositions use the default
  schedule's 4 dense steps, and with step caching Chipmunk's 25 skipped steps
  (:data:`SKIP_STEPS`).  Every row has the peak GPU memory of its forwards.

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

Every row is written to ``--out`` as soon as it is timed; ``--resume`` keeps
the rows of a run cut short (same model, shape, repeats, GPU and versions)
and times only the missing ones, so the 50-step compositions see them all.

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
CONFIGS = ("dense", "floor", "floor-qk", "dense-kernel", "skip", "svg", "svg-spatial", "svdit", "chipmunk")
# Chipmunk's step-caching schedule for HunyuanVideo (its examples' config): 25 of 50 steps reuse the last output.
SKIP_STEPS = [7, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26, 27, 29, 31, 33, 34, 35, 37, 38, 39, 41, 42, 43]
REFRESH_STEPS = [0, 1, 10, 40]  # Chipmunk's default dense steps
# Latent inputs per model: 49 frames at 480x720 -> 13 x 60 x 90 latents, B = 2 (batched CFG);
# 129 frames at 720x1280 -> 33 x 90 x 160 latents, B = 1; Wan and HunyuanVideo 1.5 call the transformer once per
# CFG branch, B = 1.
# Wan 2.1 (Wan-AI/Wan2.1-T2V-14B / -1.3B-Diffusers, transformer/config.json): the rest are the class defaults.
WAN_14B = dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)
WAN_1_3B = dict(num_attention_heads=12, ffn_dim=8960, num_layers=30)
SHAPES = {
    "cogvideox-5b": dict(frames=13, height=60, width=90),
    "hunyuan-video": dict(frames=33, height=90, width=160),
    # 81 frames: 21 latent frames; 720x1280 and 480x832 over the VAE's 8x (then 2x2 patches)
    "wan2.1-14b": dict(frames=21, height=90, width=160),
    "wan2.1-1.3b": dict(frames=21, height=60, width=104),
    # 121 frames at 720x1280 over the VAE's 4x time and 16x space (1x1 patches)
    "hunyuan-video-1.5": dict(frames=31, height=45, width=80),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), required=True)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25])
    parser.add_argument("--top-k", type=float, nargs="+", default=[0.05], help="chipmunk's kept share of keys")
    parser.add_argument("--mlp-top-k", type=float, default=None, help="chipmunk's recomputed share of hidden units")
    parser.add_argument("--chipmunk-cpu-cache", action="store_true", help="also time chipmunk with its caches on the CPU")
    parser.add_argument("--chipmunk-step-cache", action="store_true", help="also time a step that step caching skips")
    parser.add_argument("--no-counts", action="store_true", help="skip the profiler's sync and copy counts")
    parser.add_argument("--op-table", action="store_true",
                        help="add to the eager dense, svg and chipmunk rows the 25 costliest operators of one more forward")
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
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out (a run cut short by a time limit) and time only the rest")
    return parser.parse_args()


def build(args):
    """(transformer, forward keyword arguments without the timestep, pipe-like object with a scheduler)."""
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    shape = {**SHAPES[args.model], **{k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k)}}
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device, dtype=dtype)

    def text_mask(length, real):  # (1, length) bool: the first `real` tokens real, padding after
        mask = torch.zeros(1, length, dtype=torch.bool, device=device)
        mask[:, :real] = True
        return mask

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
    elif args.model == "hunyuan-video":
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

        layers = {} if args.layers is None else {"num_layers": args.layers, "num_single_layers": 2 * args.layers}
        with device:
            model = HunyuanVideoTransformer3DModel(**layers).to(dtype).eval()
        config = model.config
        inputs = dict(
            hidden_states=randn(1, config.in_channels, shape["frames"], shape["height"], shape["width"]),
            encoder_hidden_states=randn(1, 256, config.text_embed_dim),
            encoder_attention_mask=text_mask(256, 40),
            pooled_projections=randn(1, config.pooled_projection_dim),
            guidance=torch.tensor([6000.0], device=device, dtype=dtype),
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
        batch = 1
    elif args.model.startswith("wan"):
        from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

        config = dict(WAN_14B if args.model == "wan2.1-14b" else WAN_1_3B)
        if args.layers:
            config["num_layers"] = args.layers
        with device:
            model = WanTransformer3DModel(**config).to(dtype).eval()
        inputs = dict(
            hidden_states=randn(1, model.config.in_channels, shape["frames"], shape["height"], shape["width"]),
            encoder_hidden_states=randn(1, 512, model.config.text_dim),  # the pipeline pads the prompt to 512
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
        batch = 1
    else:  # HunyuanVideo 1.5, text-to-video (image tokens present and masked, as its pipeline passes them)
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel

        with device:
            model = HunyuanVideo15Transformer3DModel(**({"num_layers": args.layers} if args.layers else {}))
            model = model.to(dtype).eval()
        config = model.config
        inputs = dict(
            hidden_states=randn(1, config.in_channels, shape["frames"], shape["height"], shape["width"]),
            encoder_hidden_states=randn(1, 1000, config.text_embed_dim),
            encoder_attention_mask=text_mask(1000, 60),
            encoder_hidden_states_2=randn(1, 256, config.text_embed_2_dim),
            encoder_attention_mask_2=text_mask(256, 20),
            image_embeds=torch.zeros(1, 729, config.image_embed_dim, device=device, dtype=dtype),
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
        batch = 1
    scheduler.set_timesteps(args.steps, device=device)
    # HunyuanVideo 1.5's pipeline passes the timestep in the latents' dtype (its embedder needs that); the
    # others pass the schedule's float32 entry.
    timestep_dtype = dtype if args.model == "hunyuan-video-1.5" else None
    pipe = SimpleNamespace(transformer=model, scheduler=scheduler, current_timestep=None, timestep_dtype=timestep_dtype)
    return model, inputs, pipe, batch, shape


def spread_stripe_columns(layout, density: float, block_n: int) -> list[str]:
    """Evenly spread whole key blocks of the video holding ``density`` of them (timing does not depend on which)."""
    from vdit_sparse.methods.svdit import format_column_ranges

    first, last = layout.video_start // block_n, (layout.video_end - 1) // block_n
    count = max(1, round(density * (last - first + 1)))
    blocks = torch.linspace(first, last, count).round().long().unique()
    tokens = (blocks[:, None] * block_n + torch.arange(block_n)).flatten()
    tokens = tokens[(tokens >= layout.video_start) & (tokens < layout.video_end)]
    return format_column_ranges(tokens - layout.video_start)


def svdit_mix_profile(layout, density: float, num_layers: int, num_heads: int, block_n: int) -> dict:
    """Sparse-vDiT, layer 0 dense, head ``h`` of every other layer diagonal, multi-diagonal or vertical stripe
    (``h mod 3``) at ``density``."""
    modes = ("diagonal", "multi_diagonal", "vertical_stripe")
    heads = {}
    for head in range(num_heads):
        mode = modes[head % 3]
        params: dict = {"mode": mode}
        if mode == "vertical_stripe":
            params["columns"] = spread_stripe_columns(layout, density, block_n)
        else:
            params["density"] = density
        heads[str(head)] = {"params": params}
    return {"name": f"svdit-mix-{density}", "method": "svdit", "params": {"mode": "dense"}, "dense_layers": [0],
            "layers": {layer: {"heads": heads} for layer in range(1, num_layers)}}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward(model, inputs, pipe, batch: int, step: int):
    # As the pipelines do: the transformer gets a view of the schedule's entry (cast where the pipeline casts
    # it), and the pipeline's current_timestep is that entry.
    timestep = pipe.scheduler.timesteps[step]
    pipe.current_timestep = timestep
    passed = timestep.expand(batch) if pipe.timestep_dtype is None else timestep.expand(batch).to(pipe.timestep_dtype)
    return model(**inputs, timestep=passed, return_dict=False)[0]


def timed(model, inputs, pipe, batch, step, repeats, device, later_steps=None) -> tuple[float, torch.Tensor]:
    """(median time of ``repeats`` forwards at ``step`` after an untimed one there, the last output); with
    ``later_steps``, the timed forwards run at those steps instead (a method with state across steps sees a
    run advance: repeated forwards at one step are what separate CFG calls look like)."""
    forward(model, inputs, pipe, batch, step)  # warm-up: plans, autotuning, lazy initialisation
    times = []
    for repeat in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        output = forward(model, inputs, pipe, batch, later_steps[repeat] if later_steps else step)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], output


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


def op_table(model, inputs, pipe, batch, step, device) -> dict[str, float]:
    """The 25 operators of one forward at ``step`` with the most device time (ms, self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward(model, inputs, pipe, batch, step)
        synchronize(device)
    rows = [(getattr(r, "self_device_time_total", 0.0), r.key) for r in prof.key_averages()]
    return {key: us / 1000 for us, key in sorted(rows, reverse=True)[:25]}


@contextlib.contextmanager
def attention_replaced(keep_queries_and_keys: bool = False):
    """Self-attention's SDPA returns a copy of v: the step without it (the processors call SDPA at call time).

    Compiled, a copy of v leaves q and k unused, and inductor drops their
    projections, norms and rotary embedding: a floor lower than any attention
    method can reach.  ``keep_queries_and_keys`` returns ``v + 1e-30 * (q + k)``
    instead, which keeps them computed at the cost of one elementwise pass.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def copy_of_value(*args, **kwargs):  # diffusers passes query=, key=, value= by name
        q, k, v = (kwargs[name] if name in kwargs else args[i] for i, name in enumerate(("query", "key", "value")))
        if q.shape[-2] != k.shape[-2]:  # cross-attention (Wan's text) is not what sparse methods replace: it stays
            return original(*args, **kwargs)
        return v + 1e-30 * (q + k) if keep_queries_and_keys else v.clone()

    torch.nn.functional.scaled_dot_product_attention = copy_of_value
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def measure(model, inputs, pipe, batch, step, args, profile, compiled: bool, later_steps=None, outputs=None,
            profile_step=None) -> dict:
    """One configuration: the step time, and (eager) its profiler counts or (compiled) its compile figures.

    ``profile`` None is the untouched model.  Compiled, the first forward
    compiles (its time is reported), then forwards at the next two steps run
    with recompilation forbidden, then the timed ones.
    """
    from vdit_sparse import accelerate_pipeline

    handle = accelerate_pipeline(pipe, profile) if profile is not None else None
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
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
        row["step_s"], output = timed(runner, inputs, pipe, batch, step, args.repeats, args.device, later_steps)
        if outputs is not None:
            outputs.append(output)
        if on_gpu:
            row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        if not compiled and later_steps is None and not args.no_counts:
            row.update(profile_counts(runner, inputs, pipe, batch, step, args.device))
        if not compiled and args.op_table and profile_step is not None:
            row["costliest_ops_ms"] = op_table(runner, inputs, pipe, batch, profile_step, args.device)
            row["costliest_ops_at_step"] = profile_step
        if handle is not None:
            summary = handle.summary()
            row["computed_fraction"] = summary["computed_fraction"]
            row["state_bytes_after_forward"] = handle.state.nbytes()
            row["state_bytes_on_gpu_after_forward"] = handle.state.nbytes("cuda")
        return row
    finally:
        if handle is not None:
            handle.remove()


def main():
    args = parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vdit_sparse.pipelines import find_adapter

    from vdit_sparse.kernels.block_sizes import default_block_sizes

    torch.manual_seed(0)
    model, inputs, pipe, batch, shape = build(args)
    adapter = find_adapter(pipe)
    layout = adapter.token_layout(model, {**inputs, "timestep": None})
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
        "sequence": layout.seq_len,
        "repeats": args.repeats,
    }
    dense_backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    sdpa = sdpa_kernel(dense_backends, set_priority=True) if on_gpu else contextlib.nullcontext()

    def svg(density: float, head_kind: str) -> dict:
        return {"name": f"svg-{density}-{head_kind}", "method": "svg", "dense_layers": [0],
                "params": {"density": density, "head_kind": head_kind, "reprofile_every": 1}}

    configs: dict[str, dict] = {}
    if args.resume and args.out.exists():
        earlier = json.loads(args.out.read_text())
        same = ("model", "batch", "latent_shape", "sequence", "repeats", "gpu", "torch", "triton")
        changed = [key for key in same if earlier.get(key) != results[key]]
        if changed:
            raise SystemExit(f"--resume: {args.out} was written with a different {', '.join(changed)}")
        configs.update(earlier["configs"])
        results["resumed_from"] = earlier["date"]
        print(f"resuming: {len(configs)} rows kept from {args.out}")
    results["configs"] = configs
    outputs: dict[str, list] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), sdpa:
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            wanted = args.compile_configs if compiled else args.configs
            prefix = "compiled-" if compiled else ""
            runs = []
            if "dense" in wanted:
                runs.append(("dense", None, {"profile_step": step + 1}))
            runs += [(name, None, {}) for name in ("floor", "floor-qk") if name in wanted]
            if "dense-kernel" in wanted:
                runs.append(("dense-kernel", {"name": "dense-kernel", "method": "svg",
                                              "params": {"density": 1.0, "head_kind": "spatial"}}, {}))
            if "skip" in wanted:
                runs.append(("skip", {"name": "skip", "method": "skip"}, {}))
            for density in args.densities:
                # the op table (--op-table) of a sparse step after the timed ones, heads classified again
                if "svg" in wanted:
                    runs.append((f"svg-{density}", svg(density, "auto"),
                                 {"density": density, "profile_step": step + 1}))
                if "svg-spatial" in wanted:
                    runs.append((f"svg-{density}-spatial", svg(density, "spatial"),
                                 {"density": density, "profile_step": step + 1}))
                if "svdit" in wanted:
                    block_n = default_block_sizes(model.config.attention_head_dim)[1]
                    mix = svdit_mix_profile(layout, density, len(adapter.attention_modules(model)),
                                            adapter.num_heads(model), block_n)
                    runs.append((f"svdit-{density}", mix, {"density": density}))
            if "chipmunk" in wanted:
                for top_k in args.top_k:
                    params = {"top_k": top_k, "mlp_top_k": args.mlp_top_k}
                    profile = {"name": f"chipmunk-{top_k}", "method": "chipmunk", "dense_layers": [0, 1],
                               "params": params}
                    # sparse steps after the cache was filled at `step`
                    sparse_steps = [s for s in range(step + 1, args.steps) if s not in REFRESH_STEPS][: args.repeats]
                    extra = {"top_k": top_k, "mlp_top_k": args.mlp_top_k, "later_steps": sparse_steps}
                    after = [s for s in range(sparse_steps[-1] + 1, args.steps) if s not in REFRESH_STEPS][:1]
                    runs.append((f"chipmunk-{top_k}", profile, {**extra, "profile_step": (after or [None])[0]}))
                    refreshes = REFRESH_STEPS[1:]  # the untimed forward is at step 0, the op table at the next one
                    runs.append((f"chipmunk-{top_k}-dense-step", profile,
                                 {**extra, "at_step": 0, "later_steps": refreshes[: args.repeats],
                                  "profile_step": (refreshes[args.repeats:] or [None])[0]}))
                    if args.chipmunk_cpu_cache and not compiled:
                        cpu = {**profile, "params": {**params, "cache_device": "cpu"}}
                        runs.append((f"chipmunk-{top_k}-cpu", cpu, {**extra, "profile_step": None}))
                    if args.chipmunk_step_cache:
                        cached = {**profile, "step_cache": {"skip_steps": SKIP_STEPS, "schedule_steps": 50}}
                        skipped = [s for s in SKIP_STEPS if s > step][: args.repeats]
                        runs.append((f"chipmunk-{top_k}-skipped-step", cached,
                                     {**extra, "later_steps": skipped, "profile_step": None}))
            for name, profile, extra in runs:
                if prefix + name in configs:  # kept by --resume
                    continue
                floor = attention_replaced(name == "floor-qk") if name.startswith("floor") else contextlib.nullcontext()
                at, later, profile_at = extra.get("at_step", step), extra.get("later_steps"), extra.get("profile_step")
                kept = outputs.setdefault(prefix + name, []) if name.startswith("chipmunk") else None
                with floor:
                    row = {"mode": mode, **extra,
                           **measure(model, inputs, pipe, batch, at, args, profile, compiled, later, kept, profile_at)}
                configs[prefix + name] = row
                if name.endswith("-cpu"):  # its GPU-cache twin ran just before, unless --resume kept that row
                    twin = outputs.get(name[: -len("-cpu")])
                    row["output_equals_gpu_cache"] = (torch.equal(twin[0], kept[0]) if twin
                                                      else "not compared: the GPU-cache row was kept by --resume")
                args.out.write_text(json.dumps(results, indent=2) + "\n")  # the rows so far survive a time limit
                print(f"{prefix + name}: {row['step_s']:.3f} s" + "".join(
                    f", {key} {row[key]}" for key in ("first_call_s", "recompiled_after_first_call", "computed_fraction",
                                                       "host_syncs_in_forward") if key in row
                ))
    for name, row in configs.items():
        if "dense" in configs and name != "dense":
            row["speedup_over_eager_dense"] = configs["dense"]["step_s"] / row["step_s"]
        if "compiled-dense" in configs and name.startswith("compiled-") and name != "compiled-dense":
            row["speedup_over_compiled_dense"] = configs["compiled-dense"]["step_s"] / row["step_s"]
    if "dense" in configs and "floor" in configs:  # what attention costs of a step, and the most sparsity can give
        dense, floor = configs["dense"]["step_s"], configs["floor"]["step_s"]
        results["attention_share"] = {"of_dense_step": 1 - floor / dense, "speedup_cap": dense / floor}
    if "dense-kernel" in configs and "skip" in configs:  # the same on vdit-sparse's path
        dense, floor = configs["dense-kernel"]["step_s"], configs["skip"]["step_s"]
        results["attention_share_on_kernel"] = {"of_dense_kernel_step": 1 - floor / dense, "speedup_cap": dense / floor}
        for name, row in configs.items():
            if name not in ("dense-kernel", "dense") and not name.startswith("compiled-"):
                row["speedup_over_dense_kernel"] = dense / row["step_s"]
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
    for prefix, base in (("", "dense"), ("compiled-", "compiled-dense")):
        for top_k in args.top_k:
            name = f"{prefix}chipmunk-{top_k}"
            if not all(n in configs for n in (name, f"{name}-dense-step", base)):
                continue
            dense, sparse, refresh = (configs[n]["step_s"] for n in (base, name, f"{name}-dense-step"))
            eager_dense = configs["dense"]["step_s"] if "dense" in configs else None
            composed = {"default": (len(REFRESH_STEPS), args.steps - len(REFRESH_STEPS), 0)}
            if f"{name}-skipped-step" in configs:
                composed["step-cache"] = (len(REFRESH_STEPS), args.steps - len(REFRESH_STEPS) - len(SKIP_STEPS),
                                          len(SKIP_STEPS))
            for schedule, (refreshes, sparse_steps, skipped) in composed.items():
                skip = configs[f"{name}-skipped-step"]["step_s"] if skipped else 0.0
                total = refreshes * refresh + sparse_steps * sparse + skipped * skip
                results.setdefault("composed", {})[f"{name}-{schedule}"] = {
                    "schedule": f"{refreshes} of {args.steps} steps dense with the caches refreshed {REFRESH_STEPS}, "
                    f"{sparse_steps} {name}" + (f", {skipped} skipped by step caching {SKIP_STEPS}" if skipped else ""),
                    "dense_total_s": args.steps * dense, "sparse_total_s": total,
                    "speedup": args.steps * dense / total,
                    **({"speedup_over_eager_dense": args.steps * eager_dense / total} if prefix and eager_dense else {}),
                }
    print(json.dumps({k: results[k] for k in ("classification_and_layout", "composed") if k in results}, indent=2))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
