"""What index building and token permutation cost next to the sparse attention they serve.

At the HunyuanVideo shape (1 x 24 heads, 33 x 45 x 80 video + 256 text tokens,
D 128, bf16) and the SVG band masks of several densities, times with
``triton.testing.do_bench`` (median):

- index building: the band block mask, the frame/position permutation and
  ``block_mask_to_indices`` for all heads, from nothing (no cache);
- permutations: k and v to position-major order and the query-row table, with
  half of the heads temporal (the permutation kernel copies the other half),
  as SVG does; q and the output are permuted inside the attention kernel
  (its ``query_rows``), whose time is in the attention column;
- the block-sparse attention kernel itself, with those query rows.

    python scripts/bench_layout_overhead.py --out benchmarks/results/layout-overhead-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton

from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.kernels.block_sparse_attention import block_sparse_attention, default_block_sizes
from vdit_sparse.kernels.indices import block_mask_to_indices
from vdit_sparse.kernels.permute import permutation_table, permute_tokens
from vdit_sparse.methods.svg import band_half_width
from vdit_sparse.patterns import diagonal_band_block_mask, frame_to_position_permutation


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.25, 0.5])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/layout-overhead-h200.json"))
    args = parser.parse_args()

    layout = TokenLayout(LatentGrid(33, 45, 80), 256, "suffix")
    heads, head_dim = 24, 128
    block_m, block_n = default_block_sizes(head_dim)
    q, k, v = (torch.randn(1, heads, layout.seq_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    temporal = (torch.arange(heads, device="cuda") % 2 == 1)[None]
    results = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "shape": {"B": 1, "H": heads, "S": layout.seq_len, "D": head_dim},
        "blocks": [block_m, block_n],
        "rows": [],
    }
    for density in args.densities:
        width = band_half_width(layout, density)

        def build_indices():
            mask = diagonal_band_block_mask(layout, block_m, width, kv_block_size=block_n, device="cuda")
            frame_to_position_permutation(layout, device="cuda")
            return block_mask_to_indices(mask[None, None].expand(1, heads, *mask.shape))

        indices, counts = build_indices()
        perm = frame_to_position_permutation(layout, device="cuda")

        def permutations():
            for t in (k, v):
                permute_tokens(t, perm, heads=temporal)
            return permutation_table(perm, temporal, heads, layout.seq_len)

        rows = permutations()

        def attention():
            block_sparse_attention(q, k, v, indices, counts, block_m=block_m, block_n=block_n, query_rows=rows)

        index_ms, permute_ms, attention_ms = (triton.testing.do_bench(f) for f in (build_indices, permutations, attention))
        row = {
            "density": density,
            "computed_fraction": counts.sum().item() / counts.numel() / triton.cdiv(layout.seq_len, block_n),
            "index_build_ms": index_ms,
            "permutations_ms": permute_ms,
            "attention_ms": attention_ms,
            "overhead_fraction": (index_ms + permute_ms) / attention_ms,
        }
        results["rows"].append(row)
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
