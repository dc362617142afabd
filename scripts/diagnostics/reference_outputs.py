"""Final latents of the embedded pipelines under a fixed set of profiles, saved and compared across commits.

A refactor that must not change what the reference path computes saves the
outputs before and after and compares them (max abs difference and the
attention statistics per case).  Uses only the public API, so the same file
runs against an older checkout::

    cp scripts/diagnostics/reference_outputs.py /tmp/reference_outputs.py
    git checkout OLD && python /tmp/reference_outputs.py save /tmp/before.pt
    git checkout -  && python /tmp/reference_outputs.py save /tmp/after.pt
    python /tmp/reference_outputs.py compare /tmp/before.pt /tmp/after.pt --atol 1e-5
"""

from __future__ import annotations

import argparse
import sys

import torch

PROMPT = "a red ball moves right over a blue background"
PROFILES = {
    "svg": {"name": "svg", "method": "svg", "params": {"density": 0.3, "backend": "reference"},
            "dense_warmup_steps": 1, "dense_layers": [0]},
    "svg-b16-reprofile-2": {"name": "svg16", "method": "svg",
                            "params": {"density": 0.25, "block_size": 16, "backend": "reference", "reprofile_every": 2}},
    "svg-temporal": {"name": "svgt", "method": "svg",
                     "params": {"density": 0.25, "block_size": 16, "backend": "reference", "head_kind": "temporal"}},
    "sliding": {"name": "sl", "method": "sliding_frames", "params": {"window_frames": 1, "backend": "reference"},
                "dense_warmup_steps": 1},
    "sliding-b16": {"name": "sl16", "method": "sliding_frames",
                    "params": {"window_frames": 0, "block_size": 16, "backend": "reference"}},
}
MODELS = [("cogvideox", "5b"), ("cogvideox", "2b"), ("cogvideox", "1.5"), ("hunyuan-video", None)]


def save(path: str) -> None:
    from vdit_sparse import accelerate_pipeline
    from vdit_sparse.embedded import DEMO_CALL_ARGS, build_embedded_pipeline

    outputs = {}
    for family, variant in MODELS:
        pipe = build_embedded_pipeline(family, variant=variant, seed=0)
        pipe.set_progress_bar_config(disable=True)
        for name, profile in PROFILES.items():
            call = dict(DEMO_CALL_ARGS[family])
            if family == "hunyuan-video" and name == "svg-b16-reprofile-2":  # true CFG: two calls per step
                call.update(true_cfg_scale=2.0, negative_prompt="blurry")
            with accelerate_pipeline(pipe, profile) as handle:
                latents = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **call).frames
                summary = handle.summary()
            outputs[f"{family}-{variant}-{name}"] = (latents, summary["calls"], summary["computed_fraction"])
            print(f"{family} {variant} {name}: {summary['calls']}")
    torch.save(outputs, path)


def compare(before_path: str, after_path: str, atol: float) -> int:
    before, after = torch.load(before_path), torch.load(after_path)
    worst, failed = 0.0, False
    for case, (latents, calls, fraction) in before.items():
        new_latents, new_calls, new_fraction = after[case]
        difference = (latents - new_latents).abs().max().item()
        same_stats = calls == new_calls and abs(fraction - new_fraction) < 1e-9
        worst = max(worst, difference)
        failed |= difference > atol or not same_stats
        print(f"{case:40s} max abs diff {difference:.2e}  {'stats equal' if same_stats else 'STATS DIFFER'}")
    print(f"worst {worst:.2e} over {len(before)} cases; {'FAIL' if failed else 'ok'} at atol {atol:g}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("save").add_argument("path")
    cmp = commands.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    cmp.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args()
    if args.command == "save":
        save(args.path)
        return 0
    return compare(args.before, args.after, args.atol)


if __name__ == "__main__":
    sys.exit(main())
