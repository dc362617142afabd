"""SVG on the Triton kernels vs the plain-PyTorch masked path, at real shapes on a GPU.

Planted spatial and temporal heads (vdit_sparse.synthetic) at the CogVideoX-5B
shape (2 x 48 heads, 226 text + 13 x 30 x 45 video tokens, D 64) and the
HunyuanVideo shape (24 heads, 33 x 45 x 80 video + 256 text tokens, D 128,
padded text), bf16.  The kernel path classifies the heads; the reference
computes, head by head in float32, attention under the token masks those same
decisions imply, on every query row at the CogVideoX shape and on 20,000
rows spread over the sequence at the HunyuanVideo shape.  Writes the relative L2 errors to JSON.

    python scripts/check_svg_gpu.py --out benchmarks/results/svg-kernel-check-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vdit_sparse.context import AttentionCall, RunStats, StepContext
from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.kernels.block_sparse_attention import default_block_sizes
from vdit_sparse.methods.svg import SVGMethod, row_masks
from vdit_sparse.synthetic import planted_qkv

SHAPES = {
    "cogvideox-5b": (2, 48, 64, TokenLayout(LatentGrid(13, 30, 45), 226, "prefix"), 0),
    "hunyuan-video": (1, 24, 128, TokenLayout(LatentGrid(33, 45, 80), 256, "suffix"), 216),
}


def check(name: str, density: float, max_rows: int = 20000) -> dict:
    batch, heads, head_dim, layout, padded_text = SHAPES[name]
    kinds = ["spatial", "temporal"] * (heads // 2)
    q, k, v = planted_qkv(layout, kinds, batch=batch, head_dim=head_dim, noise=1.0, seed=0,
                          dtype=torch.bfloat16, device="cuda")
    padding = None
    if padded_text:
        padding = torch.ones(batch, layout.seq_len, dtype=torch.bool, device="cuda")
        padding[:, layout.seq_len - padded_text:] = False
    method = SVGMethod(SVGMethod.parse_params({"density": density, "backend": "triton"}))
    call = AttentionCall(1, StepContext(5, 50, 500.0, 0, layout), padding, RunStats())
    out = method.attend(q, k, v, call)
    temporal = method._decisions[call.cache_key][1]
    block_m, block_n = default_block_sizes(head_dim)
    mask = method.layout_plan(layout, block_m, block_n, q.device).mask[0, 0]
    # Query rows checked: all of them, or an even spread when S x S per head is too large.
    rows = torch.linspace(0, layout.seq_len - 1, min(layout.seq_len, max_rows), device="cuda").round().long()
    spatial_rows, temporal_rows = row_masks(layout, mask, rows, block_m, block_n)
    errors, norms = 0.0, 0.0
    for b in range(batch):
        for h in range(heads):
            row_mask = temporal_rows if temporal[b, h] else spatial_rows
            if padding is not None:
                row_mask = row_mask & padding[b][None, :]
            ref = F.scaled_dot_product_attention(
                q[b, h, rows].float()[None], k[b, h].float()[None], v[b, h].float()[None], attn_mask=row_mask[None]
            )[0]
            errors += (out[b, h, rows].float() - ref).pow(2).sum().item()
            norms += ref.pow(2).sum().item()
    planted = torch.tensor([kind == "temporal" for kind in kinds], device="cuda").expand(batch, -1)
    return {
        "shape": {"B": batch, "H": heads, "S": layout.seq_len, "D": head_dim},
        "density": density,
        "computed_fraction": call.stats.computed_fraction,
        "rows_checked": rows.numel(),
        "relative_l2": (errors / norms) ** 0.5,
        "classification_accuracy": (temporal == planted).float().mean().item(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/svg-kernel-check-h200.json"))
    args = parser.parse_args()
    results = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.date.today().isoformat(),
        "checks": {},
    }
    with torch.no_grad():
        for name in SHAPES:
            results["checks"][name] = check(name, args.density)
            print(name, json.dumps(results["checks"][name]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
