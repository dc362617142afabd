"""Sparse-vDiT at full HunyuanVideo size on one GPU: the mixed-mode launch, a paper-like mode mix, the search's cost.

Three parts, each written into ``--out`` as soon as it is done:

``kernel``
    One layer's attention at the HunyuanVideo 720p x 129 frames shape (24
    heads of 128, 119,056 tokens, 216 of 256 text tokens padded), all five
    modes among its heads in one launch of the block-sparse kernel, against
    one launch of the same number of blocks with every head on the same
    diagonal band; also the mixed layer without its multi-diagonal heads'
    key/value gathers.  Median of ``--repeats`` timed launches each.
``step``
    The full-size transformer (random bf16 weights) dense and under a profile
    with a mode mix rebuilt from the paper's figures (it publishes no per-head
    counts): per layer of 24 heads 1 skipped (its HunyuanVideo finding: 3-6%
    of heads can be skipped), 2 dense, and 7 each diagonal, multi-diagonal and
    vertical stripe at the one density that makes the model's FLOPs drop
    2.38x, its HunyuanVideo figure (attention FLOPs ``4 S^2 D H`` per layer,
    the rest ``2 S`` per parameter).  Per-step times and the 50-step
    composition with and without 3 dense warm-up steps.
``search``
    What ``vdit-sparse search`` costs at this size: the time and peak memory
    of one searched step (every layer scores every candidate on 64 sampled
    rows and attends with its choice), of one dense step, of the dense pass
    that caches every block's output for the sensitivity passes, and of the
    passes of the first, middle and last layer (a pass runs the blocks from
    its layer on; the others are interpolated), extrapolated to a 3-prompt
    search of 10 and of 50 steps.

    python -m scripts.bench_svdit --parts kernel step search --out benchmarks/results/svdit-hunyuan-video-h200.json

``--layers``, ``--frames``, ``--height`` and ``--width`` shrink the model and
the inputs (smoke tests on a CPU: ``--device cpu --dtype float32``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch

from scripts.bench_step import build, forward, spread_stripe_columns, synchronize, timed
from vdit_sparse.geometry import TokenLayout
from vdit_sparse.kernels.block_sizes import default_block_sizes
from vdit_sparse.methods.svdit import mode_plan, stripe_columns
from vdit_sparse.plan import combine_plans, run_plan

MIX = {"skip": 1, "dense": 2, "diagonal": 7, "multi_diagonal": 7, "vertical_stripe": 7}  # per 24 heads
PAPER_FLOP_REDUCTION = 2.38  # HunyuanVideo, Sparse-vDiT Table 2: 612.37 -> 257.09 PFLOPs


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["kernel", "step", "search"], choices=["kernel", "step", "search"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel-repeats", type=int, default=10)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (smoke tests)")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def head_modes() -> list[str]:
    order = ["diagonal", "multi_diagonal", "vertical_stripe"]  # interleave, so heads of one mode are not adjacent
    sparse = [order[i % 3] for i in range(sum(MIX[m] for m in order))]
    return ["skip"] + sparse[:10] + ["dense"] + sparse[10:] + ["dense"]


def mode_fractions(layout: TokenLayout, density: float, block_m: int, block_n: int, device) -> dict[str, float]:
    fractions = {"dense": 1.0, "skip": 0.0}
    for mode in ("diagonal", "multi_diagonal"):
        fractions[mode] = float(mode_plan(layout, mode, block_m, block_n, device, density=density).density)
    columns = stripe_columns(layout, spread_stripe_columns(layout, density, block_n), device)
    plan = mode_plan(layout, "vertical_stripe", block_m, block_n, device, columns=columns)
    fractions["vertical_stripe"] = float(plan.density)
    return fractions


def mix_fraction(layout, density, block_m, block_n, device) -> float:
    fractions = mode_fractions(layout, density, block_m, block_n, device)
    return sum(MIX[mode] * fractions[mode] for mode in MIX) / sum(MIX.values())


def mix_profile(layout: TokenLayout, density: float, num_layers: int, block_n: int) -> dict:
    modes = head_modes()
    heads = {}
    for head, mode in enumerate(modes):
        params: dict = {"mode": mode}
        if mode in ("diagonal", "multi_diagonal"):
            params["density"] = density
        if mode == "vertical_stripe":
            params["columns"] = spread_stripe_columns(layout, density, block_n)
        heads[str(head)] = {"params": params}
    return {"name": "svdit-paper-mix", "method": "svdit", "params": {"mode": "dense"},
            "layers": {layer: {"heads": heads} for layer in range(num_layers)}}


def cuda_time(fn, repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def part_kernel(layout: TokenLayout, heads: int, head_dim: int, args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    block_m, block_n = default_block_sizes(head_dim)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, layout.seq_len, head_dim, generator=generator, device=device, dtype=dtype)
               for _ in range(3))
    padding = torch.ones(1, layout.seq_len, dtype=torch.bool, device=device)
    padding[:, layout.text_start + min(40, layout.text_length) : layout.text_end] = False
    density = 0.1
    def plan_of(mode):
        columns = stripe_columns(layout, spread_stripe_columns(layout, density, block_n), device) if mode == "vertical_stripe" else None
        return mode_plan(layout, mode, block_m, block_n, device, density=density, columns=columns)

    modes = head_modes()[:heads]
    plans = {mode: plan_of(mode) for mode in set(modes)}
    mixed = combine_plans([(torch.tensor([h], device=device), plans[m]) for h, m in enumerate(modes)], heads, layout.seq_len)
    no_gather_modes = [m if m != "multi_diagonal" else "diagonal" for m in modes]
    no_gather = combine_plans([(torch.tensor([h], device=device), plans[m] if m != "multi_diagonal" else plans["diagonal"])
                               for h, m in enumerate(no_gather_modes)], heads, layout.seq_len)
    blocks = int(mixed.kv_block_counts.sum())
    # the uniform band with the same number of blocks
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        count = int(mode_plan(layout, "diagonal", block_m, block_n, device, density=middle).kv_block_counts.sum()) * heads
        low, high = (middle, high) if count < blocks else (low, middle)
    uniform_one = mode_plan(layout, "diagonal", block_m, block_n, device, density=high)
    uniform = combine_plans([(torch.arange(heads, device=device), uniform_one.for_heads(heads))], heads, layout.seq_len)
    uniform_blocks = int(uniform.kv_block_counts.sum())
    row = {"density": density, "heads": dict(zip(range(heads), modes)), "block_m": block_m, "block_n": block_n}
    for name, plan, count in (("mixed", mixed, blocks), ("uniform", uniform, uniform_blocks),
                              ("mixed_without_gathers", no_gather, int(no_gather.kv_block_counts.sum()))):
        seconds = cuda_time(lambda: run_plan(q, k, v, plan, padding, "triton"), args.kernel_repeats, args.device)
        row[name] = {"blocks": count, "seconds": seconds, "ns_per_block": seconds / count * 1e9}
    row["mixed_over_uniform_per_block"] = row["mixed"]["ns_per_block"] / row["uniform"]["ns_per_block"]
    row["mixed_without_gathers_over_uniform_per_block"] = (
        row["mixed_without_gathers"]["ns_per_block"] / row["uniform"]["ns_per_block"])
    return row


def main():
    args = parse_args()
    args.model, args.steps = "hunyuan-video", 50
    from vdit_sparse import accelerate_pipeline
    from vdit_sparse.pipelines import find_adapter

    model, inputs, pipe, batch, shape = build(args)
    adapter = find_adapter(pipe)
    layout = adapter.token_layout(model, {**inputs, "timestep": None})
    heads, head_dim = adapter.num_heads(model), model.config.attention_head_dim
    num_layers = len(adapter.attention_modules(model))
    block_m, block_n = default_block_sizes(head_dim)
    on_gpu = args.device.startswith("cuda")
    results: dict = {
        "gpu": torch.cuda.get_device_name() if on_gpu else platform.processor(),
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "diffusers": __import__("diffusers").__version__, "date": datetime.date.today().isoformat(),
        "model": f"{type(model).__name__}, random {args.dtype} weights, {num_layers} attention layers",
        "latent_shape": shape, "sequence": layout.seq_len, "layout": str(layout),
    }
    if args.out.exists():
        results = {**json.loads(args.out.read_text()), **results}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    step = 10
    with torch.no_grad():
        if "kernel" in args.parts:
            results["kernel"] = part_kernel(layout, heads, head_dim, args)
            print(json.dumps(results["kernel"], indent=1))
            save()
        if "step" in args.parts or "search" in args.parts:
            dense, _ = timed(model, inputs, pipe, batch, step, args.repeats, args.device)
            results["dense_step_s"] = dense
            save()
        if "step" in args.parts:
            parameters = sum(p.numel() for p in model.parameters())
            attention_flops = 4 * layout.seq_len**2 * head_dim * heads * num_layers
            other_flops = 2 * layout.seq_len * parameters
            attention_share = attention_flops / (attention_flops + other_flops)
            target = (1 / PAPER_FLOP_REDUCTION - (1 - attention_share)) / attention_share
            densities = [i / 400 for i in range(1, 400)]
            density = min(densities, key=lambda d: abs(mix_fraction(layout, d, block_m, block_n, args.device) - target))
            profile = mix_profile(layout, density, num_layers, block_n)
            with accelerate_pipeline(pipe, profile) as handle:
                sparse, _ = timed(model, inputs, pipe, batch, step, args.repeats, args.device)
                fraction = handle.summary()["computed_fraction"]
            flops = attention_flops * fraction + other_flops
            results["paper_mix"] = {
                "heads_per_layer": MIX, "density": density,
                "mode_computed_fractions": mode_fractions(layout, density, block_m, block_n, args.device),
                "attention_share_of_dense_flops": attention_share,
                "target_attention_fraction": target, "computed_fraction": fraction,
                "model_flop_reduction": (attention_flops + other_flops) / flops,
                "dense_step_s": dense, "sparse_step_s": sparse, "step_speedup": dense / sparse,
                "composed_50_steps": {
                    f"{warm}_dense_warmup_steps": 50 * dense / (warm * dense + (50 - warm) * sparse) for warm in (0, 3)
                },
            }
            print(json.dumps(results["paper_mix"], indent=1))
            save()
        if "search" in args.parts:
            results["search"] = part_search(pipe, model, inputs, batch, step, layout, num_layers, block_n, args)
            print(json.dumps(results["search"], indent=1))
            save()
    print(f"wrote {args.out}")


def part_search(pipe, model, inputs, batch, step, layout, num_layers, block_n, args) -> dict:
    from vdit_sparse.pipelines import find_adapter
    from vdit_sparse.search import SearchSettings, _measure_sensitivity, _Record, _search_handle

    on_gpu = args.device.startswith("cuda")
    record = _Record(SearchSettings())
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with _search_handle(pipe, record):
        searched = [cuda_time(lambda: forward(model, inputs, pipe, batch, step), 1, args.device)]
    peak_search = torch.cuda.max_memory_allocated() if on_gpu else None
    dense, _ = timed(model, inputs, pipe, batch, step, 1, args.device)
    chosen = {}
    for layer in range(num_layers):
        for mode, _ in record.decisions(layer):
            chosen[mode] = chosen.get(mode, 0) + 1
    # Sensitivity passes, timed with the paper-like mix as each layer's modes (random weights choose mostly dense).
    # One call measures the last, the first and the middle layer: the first interval holds the dense pass that
    # caches every block's output (paid once per search) and the last layer's pass (one block and the output head).
    mix = mix_profile(layout, 0.1, num_layers, block_n)["layers"]
    last, middle = num_layers - 1, num_layers // 2
    timestep = pipe.scheduler.timesteps[step]
    pipe.current_timestep = timestep
    kwargs = {**inputs, "timestep": timestep.expand(batch), "return_dict": False}
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    marks = []

    def mark():
        synchronize(args.device)
        marks.append(time.perf_counter())

    mark()
    _measure_sensitivity(pipe, find_adapter(pipe), (), kwargs, mix, [last, 0, middle], _Record(SearchSettings()),
                         mark, False)
    peak_sensitivity = torch.cuda.max_memory_allocated() if on_gpu else None
    first_interval, pass_first, pass_middle = (b - a for a, b in zip(marks, marks[1:]))
    # A pass from layer l runs the blocks from l on: fit pass(l) = a + b (L - l) on the first and middle layers.
    slope = (pass_first - pass_middle) / max(middle, 1)
    intercept = pass_first - slope * num_layers
    passes = [intercept + slope * (num_layers - layer) for layer in range(num_layers)]
    caching_pass = first_interval - passes[last]
    sensitivity_total = caching_pass + sum(passes)
    out = {
        "searched_step_s": searched[0], "dense_step_s": dense,
        "searched_step_peak_bytes": peak_search, "sensitivity_peak_bytes": peak_sensitivity,
        "host_max_rss_bytes": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024,
        "modes_chosen_on_random_weights": chosen,
        "sensitivity_caching_pass_s": caching_pass,
        "sensitivity_layer_pass_s": {"0": pass_first, str(middle): pass_middle, str(last): passes[last]},
        "sensitivity_all_layers_s": sensitivity_total,
        "extrapolated_3_prompt_search_s": {},
    }
    for steps in (10, 50):
        warm = math.ceil(SearchSettings().warmup_fraction * steps)
        total = 3 * (warm * dense + (steps - warm) * searched[0]) + sensitivity_total
        out["extrapolated_3_prompt_search_s"][f"{steps}_steps"] = total
    return out


if __name__ == "__main__":
    main()
