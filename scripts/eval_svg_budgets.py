"""SVG against a spatial-only baseline at several budgets, on the trained reference model.

For each density the two profiles differ only in how heads are assigned:
``svg`` classifies every head online as spatial or temporal; the baseline
gives every head the spatial band (``head_kind: spatial``).  Both use the same
band, so both compute exactly the same fraction of attention blocks; both
keep the first 20% of steps and layer 0 dense, as the built-in CogVideoX
profiles do.  The built-in ``cogvideox-5b`` profile is scored too.  Writes
the harness's JSON, Markdown table and plot.

    python scripts/eval_svg_budgets.py --out-dir benchmarks/results/quality-svg-reference
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vdit_sparse.embedded import REFERENCE_MODEL_ID, call_args_for, load_pipeline
from vdit_sparse.evaluate import DEFAULT_PROMPTS, evaluate_profiles, write_report


def budget_profile(density: float, head_kind: str) -> dict:
    label = "svg" if head_kind == "auto" else "spatial-only"
    return {
        "name": f"{label}-d{density}",
        "method": "svg",
        "params": {"density": density, "head_kind": head_kind},
        "dense_warmup_fraction": 0.2,
        "dense_layers": [0],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/quality-svg-reference"))
    args = parser.parse_args()

    profiles = [budget_profile(d, kind) for d in args.densities for kind in ("auto", "spatial")]
    profiles.append("cogvideox-5b")
    pipe = load_pipeline(REFERENCE_MODEL_ID)
    pipe.set_progress_bar_config(disable=True)
    results = evaluate_profiles(
        pipe, profiles, DEFAULT_PROMPTS, args.seeds, call_args_for(REFERENCE_MODEL_ID),
        model_name=REFERENCE_MODEL_ID, warmup=False, progress=print,
    )
    for path in write_report(results, args.out_dir).values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
