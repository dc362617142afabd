#!/usr/bin/env python
"""Score profiles against dense on fixed prompts and seeds; the same as `vdit-sparse eval`.

    python scripts/eval_quality.py --model embedded:cogvideox --profile dense --profile sliding-frames \
        --seeds 0 1 --out-dir benchmarks/results/quality-embedded

Writes results.json, results.md and psnr_vs_computed.png into --out-dir
(see vdit_sparse/evaluate.py for what each figure means).
"""

import sys

from vdit_sparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
