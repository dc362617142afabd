"""Column-sparse attention (Chipmunk's sparse step) against cuDNN dense attention on one GPU.

At the HunyuanVideo 720p x 129 frames shape (B1 H24 S119056 D128) and the
CogVideoX-5B shape (B2 H48 S17776 D64): every group of ``--group`` query rows
attends to its own random ``--fractions`` of the keys; the kernel's time
(median of ``--repeats`` launches) for a few launch settings, beside cuDNN
SDPA on all keys.  Each setting's output is checked on a few groups against
SDPA over the same gathered keys (relative L2).

    python -m scripts.bench_column_sparse --out benchmarks/results/column-sparse-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"hunyuan-video": (1, 24, 119056, 128), "cogvideox-5b": (2, 48, 17776, 64)}
SETTINGS = [(64, 64, 4), (64, 64, 8), (64, 128, 8), (64, 32, 4)]  # block_m, block_n, warps


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--group", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vdit_sparse.kernels import column_sparse_attention as module

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "date": datetime.date.today().isoformat(),
               "group_size": args.group, "shapes": {}}
    for name in args.shapes:
        batch, heads, seq_len, head_dim = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        row = {"shape": [batch, heads, seq_len, head_dim], "cudnn_dense_s": dense, "fractions": {}}
        groups = -(-seq_len // args.group)
        for fraction in args.fractions:
            count = int(fraction * seq_len)
            columns = torch.rand(1, heads, groups, seq_len, device="cuda", generator=gen).topk(count, dim=-1).indices
            columns = columns.sort(dim=-1).values.to(torch.int32).contiguous()  # ascending: nearby keys together
            counts = torch.full((1, heads, groups), count, dtype=torch.int32, device="cuda")
            entry = {"columns_per_group": count, "settings": {}}
            for block_m, block_n, warps in SETTINGS:
                if args.group % block_m:
                    continue
                module_kernel = module._column_sparse_attn_fwd

                def launch():
                    out = torch.empty_like(q)
                    grid = (-(-seq_len // block_m), batch * heads)
                    module_kernel[grid](
                        q, k, v, out, out, columns, counts, counts, head_dim ** -0.5 * 1.4426950408889634,
                        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                        0, *columns.stride()[1:3], 0, counts.stride(1), 0, heads, seq_len,
                        GROUP_BLOCKS=args.group // block_m, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                        HAS_KEY_PADDING=False, RETURN_LSE=False, DOT_PRECISION="tf32", DOT_IN_FP32=False,
                        num_warps=warps, num_stages=2,
                    )
                    return out

                seconds = timed(launch, args.repeats)
                out = launch()
                errors = []
                for b, h, g in ((0, 0, 0), (batch - 1, heads - 1, groups // 2)):
                    rows = slice(g * args.group, min((g + 1) * args.group, seq_len))
                    keys = columns[0, h, g].long()
                    expected = F.scaled_dot_product_attention(q[b, h, rows].float(), k[b, h, keys].float(),
                                                              v[b, h, keys].float())
                    errors.append(float((out[b, h, rows].float() - expected).norm() / expected.norm()))
                entry["settings"][f"bm{block_m}-bn{block_n}-w{warps}"] = {
                    "seconds": seconds, "speedup_over_cudnn_dense": dense / seconds, "relative_l2_on_two_groups": max(errors),
                }
                print(name, fraction, block_m, block_n, warps, f"{seconds * 1e3:.2f} ms", f"{dense / seconds:.2f}x",
                      f"rel L2 {max(errors):.2e}", flush=True)
            row["fractions"][str(fraction)] = entry
        results["shapes"][name] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
