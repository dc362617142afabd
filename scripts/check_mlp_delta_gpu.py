"""Chipmunk's MLP delta kernels at real feed-forward shapes on a GPU: error against the reference, and speed.

At CogVideoX-5B's feed-forward (B = 2, 17,776 tokens, 3072 -> 12288 -> 3072)
and HunyuanVideo's single-stream MLP (B = 1, 119,056 tokens, the same
widths), bf16, 128-token blocks each recomputing ``--share`` of the hidden
units: the kernels' output (the change, the updated activation cache, the
updated output) against the float64 reference, beside the same reference in
bf16 (the FlashAttention ratio rule), and the time of the two kernels against
the dense feed-forward (cuBLAS matmuls and GELU), with the default tiles and
with each tile choice of :data:`UP_CONFIGS` and :data:`DOWN_CONFIGS`.  Errors are measured on the
first 16,384 tokens, times on all of them.

    python scripts/check_mlp_delta_gpu.py --out benchmarks/results/mlp-delta-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from vdit_sparse.kernels.mlp_delta import mlp_delta_down, mlp_delta_up
from vdit_sparse.kernels.reference import mlp_delta_down_reference, mlp_delta_up_reference

SHAPES = {"cogvideox-5b": (2, 17776), "hunyuan-video": (1, 119056)}
FEATURES, HIDDEN, BLOCK = 3072, 12288, 128
CHECKED_TOKENS = 16384
# (block_t, block_u, block_c, warps) of the up kernel, (block_t, block_o, block_u, warps) of the down kernel
UP_CONFIGS = [(t, u, 64, w) for t in (64, 128) for u in (64, 128) for w in (4, 8)]
DOWN_CONFIGS = [(t, o, u, w) for t in (64, 128) for o in (64, 128) for u in (32, 64) for w in (4, 8)]


def cuda_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def check(name: str, share: float, repeats: int) -> dict:
    batch, tokens = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks, count = math.ceil(tokens / BLOCK), math.ceil(share * HIDDEN)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    x = randn(batch, tokens, FEATURES)
    w_up, b_up = randn(HIDDEN, FEATURES, scale=FEATURES**-0.5), randn(HIDDEN, scale=0.1)
    w_down, b_down = randn(FEATURES, HIDDEN, scale=HIDDEN**-0.5), randn(FEATURES, scale=0.1)
    w_down_t = w_down.t().contiguous()
    units = torch.rand(batch, blocks, HIDDEN, generator=gen, device="cuda").topk(count, dim=-1).indices.int()
    activation = randn(batch, blocks, BLOCK, HIDDEN)
    out = randn(batch, tokens, FEATURES)

    checked = CHECKED_TOKENS // BLOCK  # the errors are measured on the first blocks (the float64 reference is large)

    def run(kernel: bool, dtype):
        # copies: the kernels update the cache and the output in place, and .to() of a bf16 tensor to bf16 is the
        # tensor itself
        cast = [t.to(dtype, copy=True) for t in (x[:, :CHECKED_TOKENS], w_up, b_up, w_down_t, activation[:, :checked],
                                                 out[:, :CHECKED_TOKENS])]
        up, down = (mlp_delta_up, mlp_delta_down) if kernel else (mlp_delta_up_reference, mlp_delta_down_reference)
        delta = up(cast[0], cast[1], cast[2], units[:, :checked].contiguous(), cast[4], "tanh")
        down(delta, cast[3], units[:, :checked].contiguous(), cast[5])
        return delta, cast[4], cast[5]

    errors = {}
    with torch.no_grad():
        exact = run(False, torch.float64)
        for label, got, baseline, truth in zip(("change", "activation", "output"), run(True, torch.bfloat16),
                                               run(False, torch.bfloat16), exact):
            norm = truth.norm().item()
            errors[label] = {"kernel_rel_l2": (got.double() - truth).norm().item() / norm,
                             "bf16_reference_rel_l2": (baseline.double() - truth).norm().item() / norm,
                             "kernel_max_abs": (got.double() - truth).abs().max().item(),
                             "bf16_reference_max_abs": (baseline.double() - truth).abs().max().item()}
        del exact
        cache, result = activation.clone(), out.clone()

        delta = mlp_delta_up(x, w_up, b_up, units, cache, "tanh")
        up_times = {f"block_t={t},block_u={u},block_c={c},warps={w}": cuda_time(
            lambda: mlp_delta_up(x, w_up, b_up, units, cache, "tanh", block_t=t, block_u=u, block_c=c, num_warps=w),
            repeats) for t, u, c, w in UP_CONFIGS}
        down_times = {f"block_t={t},block_o={o},block_u={u},warps={w}": cuda_time(
            lambda: mlp_delta_down(delta, w_down_t, units, result, block_t=t, block_o=o, block_u=u, num_warps=w),
            repeats) for t, o, u, w in DOWN_CONFIGS}

        def sparse():
            mlp_delta_down(mlp_delta_up(x, w_up, b_up, units, cache, "tanh"), w_down_t, units, result)

        def dense():
            F.linear(F.gelu(F.linear(x, w_up, b_up), approximate="tanh"), w_down, b_down)

        sparse_s, dense_s = cuda_time(sparse, repeats), cuda_time(dense, repeats)
    best_up, best_down = min(up_times.values()), min(down_times.values())
    return {"batch": batch, "tokens": tokens, "features": FEATURES, "hidden": HIDDEN, "block": BLOCK,
            "units_per_block": count, "errors_on_tokens": CHECKED_TOKENS, "errors": errors,
            "delta_kernels_s": sparse_s, "dense_feed_forward_s": dense_s, "speedup": dense_s / sparse_s,
            "best_tiles_s": best_up + best_down, "speedup_best_tiles": dense_s / (best_up + best_down),
            "up_kernel_s_by_tiles": up_times, "down_kernel_s_by_tiles": down_times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "date": datetime.date.today().isoformat(),
               "share": args.share, "shapes": {}}
    for name in SHAPES:
        results["shapes"][name] = row = check(name, args.share, args.repeats)
        print(name, json.dumps(row, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
