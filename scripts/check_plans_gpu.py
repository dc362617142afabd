"""Layers of per-head plans on the Triton kernels vs a plain-PyTorch per-head reference, at real shapes on a GPU.

Planted spatial and temporal heads (vdit_sparse.synthetic) at the CogVideoX-5B
shape (2 x 48 heads, 226 text + 13 x 30 x 45 video tokens, D 64) and the
HunyuanVideo shape (24 heads, 33 x 45 x 80 video + 256 text tokens, D 128,
padded text), bf16, through the layer executor
(:class:`vdit_sparse.routing.LayerRouting`) twice: every head svg, and the
heads mixed (svg, dense and skipped heads in one launch).  The reference
computes, head by head in float32, attention under the token mask each head's
method implies (for svg heads, the spatial or temporal band of the decision
the kernel path took; dense: every key; skipped: zeros), on every query row at
the CogVideoX shape and on an even spread of rows at the HunyuanVideo shape.
Writes the relative L2 errors to JSON.

    python scripts/check_plans_gpu.py --out benchmarks/results/plans-kernel-check-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vdit_sparse.context import AttentionCall, RunStats, StateStore, StepContext
from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.kernels.block_sizes import default_block_sizes
from vdit_sparse.methods import DenseMethod, SkipMethod, SVGMethod
from vdit_sparse.methods.svg import band_half_width, row_masks
from vdit_sparse.patterns import diagonal_band_block_mask
from vdit_sparse.routing import HeadGroup, LayerRouting
from vdit_sparse.synthetic import planted_qkv

SHAPES = {
    "cogvideox-5b": (2, 48, 64, TokenLayout(LatentGrid(13, 30, 45), 226, "prefix"), 0),
    "hunyuan-video": (1, 24, 128, TokenLayout(LatentGrid(33, 45, 80), 256, "suffix"), 216),
}


def head_methods(heads: int, mixed: bool) -> dict[int, str]:
    """Every head svg, or a mix: two of every four heads svg, one dense, one skipped."""
    if not mixed:
        return {h: "svg" for h in range(heads)}
    return {h: ("svg", "svg", "dense", "skip")[h % 4] for h in range(heads)}


def check(name: str, density: float, mixed: bool, max_rows: int) -> dict:
    batch, heads, head_dim, layout, padded_text = SHAPES[name]
    kinds = ["spatial", "temporal"] * (heads // 2)
    q, k, v = planted_qkv(layout, kinds, batch=batch, head_dim=head_dim, noise=1.0, seed=0,
                          dtype=torch.bfloat16, device="cuda")
    padding = None
    if padded_text:
        padding = torch.ones(batch, layout.seq_len, dtype=torch.bool, device="cuda")
        padding[:, layout.seq_len - padded_text:] = False
    methods = head_methods(heads, mixed)
    instances = {"svg": SVGMethod(SVGMethod.parse_params({"density": density, "backend": "triton"})),
                 "dense": DenseMethod(DenseMethod.parse_params({})), "skip": SkipMethod(SkipMethod.parse_params({}))}
    groups = [HeadGroup(method, tuple(h for h in range(heads) if methods[h] == kind))
              for kind, method in instances.items() if kind in methods.values()]
    layer, store = LayerRouting(1, groups), StateStore()
    call = AttentionCall(1, StepContext(5, 50, 500.0, 0, layout), padding, RunStats())
    out = layer.attend(q, k, v, call, store)
    torch.cuda.synchronize()
    temporal = store.slot((1, 0, 0))["temporal"]  # svg is the first group
    svg_heads = groups[0].heads
    block_m, block_n = default_block_sizes(head_dim)
    mask = diagonal_band_block_mask(layout, block_m, band_half_width(layout, density), kv_block_size=block_n, device="cuda")
    # Query rows checked: all of them, or an even spread when S x S per head is too large.
    rows = torch.linspace(0, layout.seq_len - 1, min(layout.seq_len, max_rows), device="cuda").round().long()
    spatial_rows, temporal_rows = row_masks(layout, mask, rows, block_m, block_n)
    every_key = torch.ones_like(spatial_rows)
    errors, norms = 0.0, 0.0
    for b in range(batch):
        for h in range(heads):
            got = out[b, h, rows].float()
            if methods[h] == "skip":
                errors += got.pow(2).sum().item()
                continue
            row_mask = every_key
            if methods[h] == "svg":
                row_mask = temporal_rows if temporal[b, svg_heads.index(h)] else spatial_rows
            if padding is not None:
                row_mask = row_mask & padding[b][None, :]
            ref = F.scaled_dot_product_attention(
                q[b, h, rows].float()[None], k[b, h].float()[None], v[b, h].float()[None], attn_mask=row_mask[None]
            )[0]
            errors += (got - ref).pow(2).sum().item()
            norms += ref.pow(2).sum().item()
    planted = torch.tensor([kinds[h] == "temporal" for h in svg_heads], device="cuda").expand(batch, -1)
    return {
        "shape": {"B": batch, "H": heads, "S": layout.seq_len, "D": head_dim},
        "heads": {kind: sum(1 for m in methods.values() if m == kind) for kind in ("svg", "dense", "skip")},
        "density": density,
        "computed_fraction": call.stats.computed_fraction,
        "rows_checked": rows.numel(),
        "relative_l2": (errors / norms) ** 0.5,
        "classification_accuracy": (temporal == planted).float().mean().item(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--max-rows", type=int, default=20000, help="query rows checked per head at most")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plans-kernel-check-h200.json"))
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
            for mixed in (False, True):
                label = f"{name}-{'mixed' if mixed else 'svg'}"
                results["checks"][label] = check(name, args.density, mixed, args.max_rows)
                print(label, json.dumps(results["checks"][label]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
