"""torch.compile: the kernels are single graph nodes, and a compiled accelerated pipeline matches eager
without recompiling at every step.

On the CPU the kernel path runs in the Triton interpreter (TRITON_INTERPRET=1);
the graphs dynamo builds around it are the same as on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import run_pipeline
from vdit_sparse import accelerate_pipeline
from vdit_sparse.embedded import build_embedded_pipeline
from vdit_sparse.kernels._triton_runtime import interpreter_active

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not interpreter_active(),
    reason="triton was imported before TRITON_INTERPRET=1 was set",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernels_compile_as_single_nodes_without_graph_breaks():
    from vdit_sparse.kernels.block_sparse_attention import block_sparse_attention
    from vdit_sparse.kernels.indices import block_mask_to_indices
    from vdit_sparse.kernels.permute import gather_rows
    from vdit_sparse.kernels.row_errors import masked_row_errors

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 80, 32, generator=gen).to(DEVICE) for _ in range(3))
    indices, counts = block_mask_to_indices((torch.rand(1, 3, 5, 5, generator=gen) < 0.5).to(DEVICE))
    rows = torch.stack([torch.randperm(80, generator=gen) for _ in range(3)]).to(torch.int32)[None].to(DEVICE)
    sampled = torch.arange(0, 80, 7, device=DEVICE)
    masks = (torch.rand(2, len(sampled), 80, generator=gen) < 0.4).to(DEVICE)
    masks[..., :2] = True

    def layer(q, k, v):
        k, v = gather_rows(k, rows), gather_rows(v, rows)
        out = block_sparse_attention(q, k, v, indices, counts, block_m=16, block_n=16, query_rows=rows)
        return out, masked_row_errors(q, k, v, sampled, masks)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fake implementations give the shapes
    for got, expected in zip(compiled(q, k, v), layer(q, k, v)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_compiled_pipeline_matches_eager_and_compiles_once_per_step_kind():
    pipe = build_embedded_pipeline("cogvideox", seed=0)
    pipe.set_progress_bar_config(disable=True)
    profile = {"name": "svg", "method": "svg", "dense_warmup_steps": 1, "dense_layers": [0],
               "params": {"density": 0.3, "block_size": 16, "backend": "triton"}}
    with accelerate_pipeline(pipe, profile):
        eager = run_pipeline(pipe)

    def no_recompiles_after_first_sparse_step(pipe, step_index, timestep, callback_kwargs):
        if step_index >= 1:  # step 0 compiled the dense warm-up kind, step 1 the sparse kind
            torch._dynamo.config.error_on_recompile = True
        return callback_kwargs

    torch._dynamo.reset()
    counters.clear()
    handle = accelerate_pipeline(pipe, profile)
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer)
    try:
        compiled = run_pipeline(pipe, callback_on_step_end=no_recompiles_after_first_sparse_step)
        again = run_pipeline(pipe, num_inference_steps=6)  # another call, another schedule: still no recompile
        assert handle.stats.calls == {"dense": 6 * 1 + 1 * (handle.num_layers - 1), "svg": 5 * (handle.num_layers - 1)}
    finally:
        torch._dynamo.config.error_on_recompile = False
        pipe.transformer = transformer
        handle.remove()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    assert torch.isfinite(again).all()
    # The graph breaks are the two decisions that must stay in Python (README, "torch.compile").
    reasons = " ".join(counters["graph_break"])
    assert "AccelerationHandle.route" in reasons and "AccelerationHandle.attend" in reasons
    assert len(counters["graph_break"]) == 2, list(counters["graph_break"])
