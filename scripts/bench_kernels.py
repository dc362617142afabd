"""Block-sparse attention kernel benchmark on one GPU (written for the H200).

Times, in one run, at the CogVideoX-5B shape (B2 H48 S17776 D64) and the
HunyuanVideo shape (B1 H24 S119056 D128), bf16:

* our kernel (``vdit_sparse.kernels.block_sparse_attention``) at densities
  0.1, 0.25, 0.5, 1.0;
* dense SDPA under ``SDPBackend.CUDNN_ATTENTION`` and ``FLASH_ATTENTION``;
* FlexAttention (``torch.compile(flex_attention)``, ``create_block_mask(...,
  _compile=True)``, 128 x 128 blocks) with the same mask.

The mask: one random block mask at 128 x 128 granularity, the same for every
batch entry and head.  Each 128-query-block row keeps its diagonal block plus
``round(density * n) - 1`` other key blocks drawn at random, so every row has
the same count and the density is exact (text included: the tokens are all
treated alike).  Our kernel gets the same token pairs at its own block sizes
(both divide 128), so the work is identical.

Correctness: relative L2 of our output against a float32 PyTorch reference
of the same masked attention.  CogVideoX: every (batch, head).  HunyuanVideo: a
sample of heads (``--hunyuan-check-heads``), all query rows, in query chunks.
Efficiency = cudnn_ms * density / ours_ms (docs: shared/BENCHMARKS.md).

Writes ``benchmarks/results/kernels-h200.json`` and ``kernels-h200.md``
(the table is generated from the JSON).  Run from the repository root:

    python scripts/bench_kernels.py                 # about 2 minutes on one H200
    python scripts/bench_kernels.py --variants      # + about 1 minute of kernel variants
    python scripts/bench_kernels.py --table-from benchmarks/results/kernels-h200.json   # Markdown only, no GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


SHAPES = {
    "cogvideox": dict(B=2, H=48, S=17776, D=64),
    "hunyuan": dict(B=1, H=24, S=119056, D=128),
}
FLEX_BLOCK = 128
args_global = None


def coarse_block_mask(num_blocks: int, density: float, generator: torch.Generator, device) -> torch.Tensor:
    keep = max(1, round(density * num_blocks))
    scores = torch.rand(num_blocks, num_blocks, generator=generator, device=device)
    scores.fill_diagonal_(2.0)  # the diagonal always wins
    top = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=device)
    mask.scatter_(-1, top, True)
    return mask


def refine(coarse: torch.Tensor, seq_len: int, block_m: int, block_n: int) -> torch.Tensor:
    """The 128-block mask at (block_m, block_n) granularity: the same token pairs."""
    fine = coarse.repeat_interleave(FLEX_BLOCK // block_m, 0)[: -(-seq_len // block_m)]
    return fine.repeat_interleave(FLEX_BLOCK // block_n, 1)[:, : -(-seq_len // block_n)]


@torch.no_grad()
def rel_l2_vs_reference(q, k, v, out, coarse, pairs, scale, max_score_bytes=4 << 30):
    """||out - ref|| / ||ref|| over the (batch, head) pairs, reference in float32, chunked over queries."""
    seq_len = q.shape[2]
    chunk = max(FLEX_BLOCK, (max_score_bytes // (seq_len * 4)) // FLEX_BLOCK * FLEX_BLOCK)
    key_block = torch.arange(seq_len, device=q.device) // FLEX_BLOCK
    err = ref_sq = 0.0
    for b, h in pairs:
        qh, kh, vh = q[b, h].float(), k[b, h].float(), v[b, h].float()
        for start in range(0, seq_len, chunk):
            rows = torch.arange(start, min(start + chunk, seq_len), device=q.device)
            scores = (qh[rows] @ kh.T) * scale
            allowed = coarse[(rows // FLEX_BLOCK)[:, None], key_block[None, :]]
            scores.masked_fill_(~allowed, float("-inf"))
            ref = torch.softmax(scores, dim=-1) @ vh
            del scores, allowed
            err += (out[b, h, rows].float() - ref).pow(2).sum().item()
            ref_sq += ref.pow(2).sum().item()
    return math.sqrt(err / ref_sq)


def bench_ms(fn):
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def run_shape(name, cfg, densities, bsa, indices, args, record):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, S, D = cfg["B"], cfg["H"], cfg["S"], cfg["D"]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    scale = 1.0 / math.sqrt(D)
    block_m, block_n = bsa.default_block_sizes(D)
    flops_dense = 4.0 * B * H * S * S * D
    entry = dict(shape=cfg, block_m=block_m, block_n=block_n, densities={})
    record["shapes"][name] = entry

    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        entry[f"{backend.lower()}_ms"] = ms
        entry[f"{backend.lower()}_tflops"] = flops_dense / ms * 1e-9
        print(f"[{name}] dense {backend}: {ms:.2f} ms", flush=True)
    cudnn_ms = entry["cudnn_attention_ms"]

    flex = torch.compile(flex_attention)
    num_coarse = -(-S // FLEX_BLOCK)
    if name == "cogvideox":
        pairs = [(b, h) for b in range(B) for h in range(H)]
    else:
        step = max(1, H // args.hunyuan_check_heads)
        pairs = [(0, h) for h in range(0, H, step)][: args.hunyuan_check_heads]
    entry["reference_check"] = f"float32 PyTorch reference over {len(pairs)} of {B * H} (batch, head) pairs, all query rows"

    for density in densities:
        coarse = coarse_block_mask(num_coarse, density, gen, dev)
        fine = refine(coarse, S, block_m, block_n)[None, None].expand(1, H, -1, -1)
        row = dict(density_requested=density, density=float(coarse.float().mean().item()))
        real_density = row["density"]

        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            kv_idx, kv_cnt = indices.block_mask_to_indices(fine)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        row["index_build_ms"] = sorted(times)[2]

        ours = lambda: bsa.block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_m=block_m, block_n=block_n)
        out = ours()
        row["ours_ms"] = bench_ms(ours)
        row["ours_tflops_effective"] = flops_dense * real_density / row["ours_ms"] * 1e-9
        row["sparse_efficiency"] = cudnn_ms * real_density / row["ours_ms"]
        row["ours_vs_cudnn_dense"] = row["ours_ms"] / cudnn_ms
        row["rel_l2_vs_reference"] = rel_l2_vs_reference(q, k, v, out, coarse, pairs, scale)

        def mask_mod(b, h, q_idx, kv_idx, coarse=coarse):
            return coarse[q_idx // FLEX_BLOCK, kv_idx // FLEX_BLOCK]

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, S, S, device=dev, BLOCK_SIZE=FLEX_BLOCK, _compile=True)
        torch.cuda.synchronize()
        row["flex_create_block_mask_ms_first_call"] = (time.perf_counter() - t0) * 1e3
        flex_call = lambda: flex(q, k, v, block_mask=block_mask, scale=scale)
        flex_out = flex_call()
        row["flex_ms"] = bench_ms(flex_call)
        row["flex_efficiency"] = cudnn_ms * real_density / row["flex_ms"]
        row["ours_speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
        diff = (out.float() - flex_out.float()).norm() / flex_out.float().norm()
        row["rel_l2_ours_vs_flex"] = float(diff)
        del out, flex_out, block_mask
        entry["densities"][str(density)] = row
        print(
            f"[{name}] d={real_density:.3f} ours {row['ours_ms']:.2f} ms eff {row['sparse_efficiency']:.3f} "
            f"flex {row['flex_ms']:.2f} ms relL2 {row['rel_l2_vs_reference']:.2e} idx {row['index_build_ms']:.2f} ms",
            flush=True,
        )
        write_outputs(record, args)

    entry["autotuned_configs"] = {str(key): str(cfg) for key, cfg in bsa._block_sparse_attn_fwd_tuned.cache.items()}
    write_outputs(record, args)


def run_variants(name, cfg, bsa, indices, record, deadline, density=0.25):
    """Times kernel variants (block sizes, TMA, tail masking, warps/stages) at one density.

    Every variant computes the same token pairs; its rel. L2 against the first
    variant (checked against the float32 reference on one head) is recorded.
    """
    B, H, S, D = cfg["B"], cfg["H"], cfg["S"], cfg["D"]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    cudnn_ms = record["shapes"][name]["cudnn_attention_ms"]
    coarse = coarse_block_mask(-(-S // FLEX_BLOCK), density, gen, dev)
    real_density = float(coarse.float().mean().item())
    results = []
    record["shapes"][name]["variants"] = results
    first_out = None
    block_options = [(64, 128), (128, 128), (128, 64)] if D <= 64 else [(128, 64), (128, 128), (64, 64), (64, 128)]
    for block_m, block_n in block_options:
        kv_idx, kv_cnt = indices.block_mask_to_indices(refine(coarse, S, block_m, block_n)[None, None].expand(1, H, -1, -1))
        warps_stages = [(4, 2), (4, 3), (8, 2)] if block_m >= 128 else [(4, 2), (4, 3)]
        for use_tma in (True, False):
            for mask_mode in (1, 2):
                for warps, stages in warps_stages:
                    # Alternative warps/stages only for the TMA + tail-branch kernel.
                    if (warps, stages) != warps_stages[0] and not (use_tma and mask_mode == 2):
                        continue
                    if time.time() > deadline:
                        return
                    label = f"BM{block_m}-BN{block_n}-{'tma' if use_tma else 'ptr'}-mask{mask_mode}-w{warps}-s{stages}"
                    call = lambda: bsa._forward(
                        q, k, v, kv_idx, kv_cnt, block_m=block_m, block_n=block_n,
                        use_tma=use_tma, mask_mode=mask_mode, num_warps=warps, num_stages=stages,
                    )
                    try:
                        out = call()
                        if first_out is None:
                            first_out = out
                            rel = rel_l2_vs_reference(q, k, v, out, coarse, [(0, 0)], 1.0 / math.sqrt(D))
                        else:
                            rel = float((out.float() - first_out.float()).norm() / first_out.float().norm())
                        del out
                        ms = bench_ms(call)
                    except Exception as exc:  # a config that does not compile/fit is reported, not fatal
                        results.append(dict(variant=label, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                        print(f"[{name}] variant {label}: {type(exc).__name__}", flush=True)
                        continue
                    eff = cudnn_ms * real_density / ms
                    results.append(dict(variant=label, density=real_density, ms=ms, sparse_efficiency=eff, rel_l2=rel))
                    print(f"[{name}] variant {label}: {ms:.2f} ms eff {eff:.3f} relL2 {rel:.1e}", flush=True)
                    write_outputs(record, args_global)


def write_outputs(record, args):
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels-h200.json").write_text(json.dumps(record, indent=2))
    (out_dir / "kernels-h200.md").write_text(markdown_table(record))


def markdown_table(record) -> str:
    lines = [
        f"# Block-sparse attention kernel on {record['gpu']}",
        "",
        f"torch {record['torch']}, triton {record['triton']}, {record['date']}, bf16. "
        "Generated by scripts/bench_kernels.py from kernels-h200.json.",
        "",
        "| shape | density | ours ms | sparse eff. | ours / cuDNN dense | FlexAttention ms | Flex eff. | Flex ms / ours ms | rel L2 vs ref | index build ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in record["shapes"].items():
        s = entry["shape"]
        label = f"{name} B{s['B']} H{s['H']} S{s['S']} D{s['D']}"
        for row in entry["densities"].values():
            lines.append(
                f"| {label} | {row['density']:.3f} | {row['ours_ms']:.2f} | {row['sparse_efficiency']:.2f} | "
                f"{row['ours_vs_cudnn_dense']:.2f} | "
                f"{row['flex_ms']:.2f} | {row['flex_efficiency']:.2f} | {row['ours_speedup_vs_flex']:.2f}x | "
                f"{row['rel_l2_vs_reference']:.1e} | {row['index_build_ms']:.2f} |"
            )
    lines += ["", "| shape | cuDNN dense ms | FlashAttention dense ms | blocks (m x n) | reference check |", "|---|---|---|---|---|"]
    for name, entry in record["shapes"].items():
        lines.append(
            f"| {name} | {entry['cudnn_attention_ms']:.2f} | {entry['flash_attention_ms']:.2f} | "
            f"{entry['block_m']} x {entry['block_n']} | {entry.get('reference_check', '')} |"
        )
    lines += ["", "Sparse efficiency = cuDNN dense ms x density / ms. Same random 128 x 128 block mask for all heads."]
    best = {}
    for name, entry in record["shapes"].items():
        timed = [v for v in entry.get("variants", []) if "ms" in v]
        if timed:
            best[name] = min(timed, key=lambda v: v["ms"])
    if best:
        lines += ["", "Fastest kernel variant at density 0.25 (`--variants`):", ""]
        lines += [f"- {name}: {v['variant']}, {v['ms']:.2f} ms, efficiency {v['sparse_efficiency']:.2f}" for name, v in best.items()]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--hunyuan-check-heads", type=int, default=6)
    parser.add_argument("--variants", action="store_true", help="also time kernel variants at density 0.25")
    parser.add_argument("--variant-budget-s", type=float, default=150.0, help="stop timing variants after this long")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--table-from", metavar="JSON", help="only regenerate the Markdown table from this JSON")
    args = parser.parse_args()
    if args.table_from:
        record = json.loads(Path(args.table_from).read_text())
        Path(args.table_from).with_suffix(".md").write_text(markdown_table(record))
        return
    # FlexAttention's peer setup is create_block_mask(..., _compile=True), which torch 2.11 marks deprecated.
    warnings.filterwarnings("ignore", message="_compile flag on create_block_mask")

    import triton

    from vdit_sparse.kernels import block_sparse_attention as bsa
    from vdit_sparse.kernels import indices

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true float32
    record = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        dtype="bfloat16",
        mask="random 128x128 block mask, diagonal kept, equal count per row, same for all batch entries and heads",
        shapes={},
    )
    global args_global
    args_global = args
    t0 = time.time()
    for name in args.shapes:
        run_shape(name, SHAPES[name], args.densities, bsa, indices, args, record)
        torch.cuda.empty_cache()
    record["wall_s_main"] = time.time() - t0
    if args.variants:
        deadline = time.time() + args.variant_budget_s
        for name in args.shapes:
            run_variants(name, SHAPES[name], bsa, indices, record, deadline)
            torch.cuda.empty_cache()
    record["wall_s"] = time.time() - t0
    write_outputs(record, args)
    print(markdown_table(record))


if __name__ == "__main__":
    main()
