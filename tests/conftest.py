"""Shared fixtures: the embedded pipelines and a seeded way to run them."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides between compiling and interpreting when it is first imported:
# without a GPU its kernels must run in the interpreter, so say so before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vdit_sparse.embedded import DEMO_CALL_ARGS, build_embedded_pipeline

PROMPT = "a red ball moves right over a blue background"


def run_pipeline(pipe, seed: int = 0, **overrides) -> torch.Tensor:
    """Final latents of one seeded pipeline call at the family's demo size (fp32)."""
    family = "hunyuan-video" if type(pipe).__name__.startswith("Hunyuan") else "cogvideox"
    call = {**DEMO_CALL_ARGS[family], **overrides}
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=PROMPT, generator=generator, output_type="latent", **call).frames


@pytest.fixture(scope="module", params=["cogvideox", "hunyuan-video"])
def family_pipe(request):
    """(family, pipeline), one build per test module and family."""
    return request.param, build_embedded_pipeline(request.param, seed=0)
