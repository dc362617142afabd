"""Shared fixtures: the embedded pipelines and a seeded way to run them."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides between compiling and interpreting when it is first imported:
# without a GPU its kernels must run in the interpreter, so say so before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vdit_sparse.embedded import build_embedded_pipeline, demo_call_args

PROMPT = "a red ball moves right over a blue background"


def embedded_kind(pipe) -> tuple[str, str | None]:
    """(family, the variant where the call arguments depend on it) of an embedded pipeline."""
    name = type(pipe).__name__
    if name.startswith("HunyuanVideo15"):
        return "hunyuan-video-1.5", "i2v" if name.endswith("ImageToVideoPipeline") else None
    if name.startswith("Hunyuan"):
        return "hunyuan-video", "i2v" if name.endswith("ImageToVideoPipeline") else None
    if name == "WanImageToVideoPipeline":
        return "wan", "2.1-i2v" if pipe.image_encoder is not None else "2.2-i2v"
    if name == "CogVideoXImageToVideoPipeline":
        return "cogvideox", "5b-i2v"
    return ("wan" if name.startswith("Wan") else "cogvideox"), None


def run_pipeline(pipe, seed: int = 0, **overrides) -> torch.Tensor:
    """Final latents of one seeded pipeline call at the family's demo size (fp32)."""
    call = {**demo_call_args(*embedded_kind(pipe)), **overrides}
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=PROMPT, generator=generator, output_type="latent", **call).frames


@pytest.fixture(scope="module", params=["cogvideox", "hunyuan-video"])
def family_pipe(request):
    """(family, pipeline), one build per test module and family."""
    return request.param, build_embedded_pipeline(request.param, seed=0)
