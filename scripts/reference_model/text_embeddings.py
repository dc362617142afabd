"""How far apart does the reference model's text encoder put prompts that differ in one word?

For the 28 prompts of scripts/reference_model/adherence.py ("<colour> <shape>
moving <direction>"), every pair that differs only in the colour, only in the
shape or only in the direction word is compared: the cosine similarity of the
whole prompt embeddings (16 tokens x 32 dims, flattened), of the differing
token's own embedding, and of each of the five prompt tokens' embeddings (the
T5 mixes its tokens, so a word can also move the others'). Near 1 means the
transformer is handed almost the same conditioning for the two prompts and
cannot tell them apart. Runs in seconds
on the CPU::

    python -m scripts.reference_model.text_embeddings     # docs/reference-text-embeddings.json

The freshly initialised T5 (what training started from) is measured beside
the trained one.
"""

from __future__ import annotations

import argparse
import datetime
import json
from itertools import combinations, product
from pathlib import Path

import torch
import torch.nn.functional as F

from vdit_sparse.reference_model import (
    DEFAULT_WEIGHTS_PATH,
    REFERENCE_CALL_ARGS,
    build_reference_pipeline,
    init_reference_pipeline,
)

from .videos import CHROMATIC, DIRECTIONS, SHAPES

REPO = Path(__file__).resolve().parents[2]

TOKENS = ("colour", "shape", "moving", "direction", "end")  # "<colour> <shape> moving <direction></s>"


def similarities(pipe) -> dict:
    cases = list(product(CHROMATIC, SHAPES, DIRECTIONS))
    prompts = [f"{colour} {shape} moving {direction}" for colour, shape, direction in cases]
    with torch.no_grad():
        embeddings, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=REFERENCE_CALL_ARGS["max_sequence_length"],
            device="cpu",
        )
    embeddings = embeddings.float()
    whole = F.normalize(embeddings.flatten(1), dim=1)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=REFERENCE_CALL_ARGS["max_sequence_length"]).input_ids
    found = {"colour": ([], [], []), "shape": ([], [], []), "direction": ([], [], [])}
    for i, j in combinations(range(len(cases)), 2):
        differing = [name for name, a, b in zip(("colour", "shape", "direction"), cases[i], cases[j]) if a != b]
        if len(differing) != 1:
            continue
        token = next(k for k, (a, b) in enumerate(zip(ids[i], ids[j])) if a != b)
        prompt_cos, token_cos, each_cos = found[differing[0]]
        prompt_cos.append(float(whole[i] @ whole[j]))
        token_cos.append(float(F.cosine_similarity(embeddings[i, token], embeddings[j, token], dim=0)))
        each_cos.append(F.cosine_similarity(embeddings[i, : len(TOKENS)], embeddings[j, : len(TOKENS)], dim=-1))
    return {
        name: {
            "pairs": len(prompt_cos),
            "prompt_cosine_mean": round(sum(prompt_cos) / len(prompt_cos), 4),
            "differing_token_cosine_mean": round(sum(token_cos) / len(token_cos), 4),
            "each_token_cosine_mean": dict(zip(TOKENS, (round(v, 4) for v in torch.stack(each_cos).mean(0).tolist()))),
        }
        for name, (prompt_cos, token_cos, each_cos) in found.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_PATH)
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "reference-text-embeddings.json")
    args = parser.parse_args(argv)

    report = {
        "what": "cosine similarity of the reference model's prompt embeddings for prompts differing in one word",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "prompts": "<colour> <shape> moving <direction>: 7 colours x 6 shapes x 4 directions",
        "weights": str(args.weights),
        "trained": similarities(build_reference_pipeline(args.weights)),
        "untrained": similarities(init_reference_pipeline()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({key: report[key] for key in ("trained", "untrained")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
