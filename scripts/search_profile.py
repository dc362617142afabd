"""Search the shipped Sparse-vDiT profile of the reference model and compare it at equal computed fraction.

1. ``vdit_sparse.search.search_profile`` on the trained reference model
   (``embedded:reference``) with the quality harness's prompts and seed 0, at
   the model's own size and steps; writes ``profiles/reference-svdit.yaml``.
2. Profiles with one pattern for every head of every layer, each at the
   density whose computed fraction on a sparse step is closest to the
   searched profile's: svg, diagonal only, multi-diagonal only, and vertical
   stripes only (columns searched per head at that one density); the same
   dense warm-up as the searched profile.
3. The quality harness on seeds the search did not see; writes
   ``benchmarks/results/quality-svdit-reference/`` (JSON, Markdown, PNG).

Run: ``python -m scripts.search_profile`` (about 15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml

from vdit_sparse.evaluate import DEFAULT_PROMPTS, evaluate_profiles, write_report
from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.kernels.block_sizes import default_block_sizes
from vdit_sparse.methods.svdit import mode_plan
from vdit_sparse.reference_model import REFERENCE_CALL_ARGS, REFERENCE_CONFIG, build_reference_pipeline
from vdit_sparse.search import SearchSettings, search_profile


def band_fraction(layout: TokenLayout, mode: str, density: float, block_m: int, block_n: int) -> float:
    return float(mode_plan(layout, mode, block_m, block_n, "cpu", density=density).density)


def matching_density(layout: TokenLayout, target: float, block_m: int, block_n: int) -> float:
    """The band density (diagonal, multi-diagonal and svg share it) whose computed fraction is closest to ``target``."""
    grid = [i / 200 for i in range(1, 201)]
    return min(grid, key=lambda d: (abs(band_fraction(layout, "diagonal", d, block_m, block_n) - target), d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.4, help="target computed fraction of a sparse step")
    parser.add_argument("--out", type=Path, default=Path("profiles/reference-svdit.yaml"))
    parser.add_argument("--eval-dir", type=Path, default=Path("benchmarks/results/quality-svdit-reference"))
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[1])
    args = parser.parse_args()

    call_args = dict(REFERENCE_CALL_ARGS)
    pipe = build_reference_pipeline()
    settings = SearchSettings(budget=args.budget)
    searched = search_profile(pipe, list(DEFAULT_PROMPTS), [0], call_args, settings, out=args.out,
                              name="reference-svdit", model_name="embedded:reference")
    Path(str(args.out) + ".record.pt").unlink()  # the search's measurements are not shipped with the profile
    target = searched["provenance"]["sparse_step_computed_fraction"]
    spec = searched["provenance"]["token_layout"]
    layout = TokenLayout(LatentGrid(spec["frames"], spec["height"], spec["width"]), spec["text_length"], "prefix")
    block_m, block_n = default_block_sizes(REFERENCE_CONFIG["transformer"]["attention_head_dim"])
    density = matching_density(layout, target, block_m, block_n)
    warmup = settings.warmup_fraction
    fixed = {
        f"svg-d{density:g}": {"method": "svg", "params": {"density": density}},
        f"diagonal-d{density:g}": {"method": "svdit", "params": {"mode": "diagonal", "density": density}},
        f"multi-diagonal-d{density:g}": {"method": "svdit", "params": {"mode": "multi_diagonal", "density": density}},
    }
    profiles = [str(args.out)]
    for name, body in fixed.items():
        profiles.append({"name": name, "dense_warmup_fraction": warmup, **body})
    # Vertical stripes only: every head a stripe at one density (the share of key blocks with the most attention).
    num_kv_blocks = math.ceil(layout.seq_len / block_n)
    stripe_density = min((i / num_kv_blocks for i in range(1, num_kv_blocks + 1)),
                         key=lambda d: abs(d + (1 - d) * block_m / layout.seq_len - target))
    stripes = search_profile(
        pipe, list(DEFAULT_PROMPTS), [0], call_args,
        SearchSettings(modes=("vertical_stripe",), densities=(stripe_density,), lam=1e6, epsilon=math.inf),
        name=f"vertical-stripe-d{stripe_density:.3g}", model_name="embedded:reference",
    )
    profiles.append(stripes)

    print(f"searched: {target:.3f} of a sparse step; fixed patterns at band density {density:g}, stripes {stripe_density:.3g}")
    results = evaluate_profiles(pipe, profiles, list(DEFAULT_PROMPTS), args.eval_seeds, call_args,
                                model_name="embedded:reference", progress=print)
    results["search"] = {"profile": str(args.out), "sparse_step_computed_fraction": target,
                         "settings": searched["provenance"]["settings"],
                         "seconds": searched["provenance"]["seconds"],
                         "host_max_rss_mib": searched["provenance"]["host_max_rss_mib"]}
    paths = write_report(results, args.eval_dir)
    print(paths["markdown"].read_text())
    print(yaml.safe_dump({"wrote": [str(p) for p in paths.values()] + [str(args.out)]}))


if __name__ == "__main__":
    main()
