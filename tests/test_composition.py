"""How vdit-sparse composes with what else users put on a diffusers pipeline.

Each statement of the README's "Composing with other diffusers features" is
measured here, on the embedded pipelines: CPU offload (model, sequential,
group) in either order, attention processors replaced after applying,
attention backends, QKV fusion, diffusers' cache hooks and torch.compile.
Offload hooks run on the CPU with ``device="cpu"``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

from conftest import run_pipeline
from vdit_sparse import accelerate_pipeline
from vdit_sparse.embedded import build_embedded_pipeline

STEPS = 4  # DEMO_CALL_ARGS' num_inference_steps
PROFILE = {"name": "window-0", "method": "sliding_frames",
           "params": {"window_frames": 0, "block_size": 16, "backend": "reference"}}
# Wan 2.2: two experts, each called for the conditional and the unconditional branch, with 2 layers each:
# STEPS x num_layers attention calls a run, as for the others.
FAMILIES = ["cogvideox", "hunyuan-video", "wan-2.2"]


def fresh_pipe(family: str):
    family, _, variant = family.partition("-2.")
    pipe = build_embedded_pipeline(family, variant=f"2.{variant}" if variant else None, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def reference_outputs(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense latents, sparse latents) of a pipeline with nothing else installed."""
    pipe = fresh_pipe(family)
    dense = run_pipeline(pipe)
    with accelerate_pipeline(pipe, PROFILE):
        sparse = run_pipeline(pipe)
    assert not torch.equal(dense, sparse)
    return dense, sparse


def enable_model_offload(pipe):
    pipe.enable_model_cpu_offload(device="cpu")


def enable_sequential_offload(pipe):
    pipe.enable_sequential_cpu_offload(device="cpu")


def enable_group_offload(pipe):
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)


OFFLOADS = {"model": enable_model_offload, "sequential": enable_sequential_offload, "group": enable_group_offload}


@functools.cache
def offload_problem(offload: str, family: str) -> str | None:
    """Why this offload cannot run the plain pipeline on this machine, or None when it can."""
    pipe = fresh_pipe(family)
    OFFLOADS[offload](pipe)
    try:
        run_pipeline(pipe)
    except Exception as error:  # seen: accelerate's sequential offload with torch 2.13 on the CPU
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


def accelerate_hook_calls(pipe) -> list:
    """Spy on every accelerate hook in the transformer: the list grows each time one runs."""
    calls = []
    for module in pipe.transformer.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            original = hook.pre_forward

            def spy(module, *args, _original=original, **kwargs):
                calls.append(module)
                return _original(module, *args, **kwargs)

            hook.pre_forward = spy
    return calls


@pytest.mark.parametrize("order", ["offload-first", "apply-first"])
@pytest.mark.parametrize("offload", sorted(OFFLOADS))
@pytest.mark.parametrize("family", FAMILIES)
def test_offload_keeps_the_sparse_path_on_every_call_and_survives_remove(family, offload, order):
    problem = offload_problem(offload, family)
    if problem:
        pytest.skip(f"{offload} offload does not run the plain pipeline here ({problem})")
    dense, sparse = reference_outputs(family)
    pipe = fresh_pipe(family)
    if order == "offload-first":
        OFFLOADS[offload](pipe)
    handle = accelerate_pipeline(pipe, PROFILE)
    if order == "apply-first":
        OFFLOADS[offload](pipe)
    for _ in range(3):  # diffusers re-installs model-offload hooks at the end of every call
        assert torch.equal(run_pipeline(pipe), sparse)
        assert handle.stats.calls == {"sliding_frames": STEPS * handle.num_layers}
    handle.remove()
    if offload == "group":
        assert pipe.transformer._diffusers_hook.get_hook("group_offloading") is not None
    else:
        calls = accelerate_hook_calls(pipe)
        assert torch.equal(run_pipeline(pipe), dense)
        assert calls, "remove() dropped the offload hooks the user installed"
    assert torch.equal(run_pipeline(pipe), dense)


def test_offload_installed_before_apply_does_not_keep_a_stale_step_hook():
    pipe = fresh_pipe("cogvideox")
    enable_model_offload(pipe)
    handle = accelerate_pipeline(pipe, PROFILE)
    run_pipeline(pipe)
    handle.remove()
    run_pipeline(pipe)  # the offload hooks are re-installed here; nothing of the handle may run again
    assert handle.stats.calls == {"sliding_frames": STEPS * handle.num_layers}


def replace_with_model_processors(pipe):
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    transformer = pipe.transformer
    if "CogVideoX" in type(pipe).__name__:
        transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
    else:  # its token refiner needs another processor class: set the blocks' one by one
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            block.attn.set_processor(HunyuanVideoAttnProcessor2_0())


SWAPS = {
    ("cogvideox", "fuse_qkv_projections"): lambda pipe: pipe.fuse_qkv_projections(),
    ("cogvideox", "set_attn_processor"): replace_with_model_processors,
    ("hunyuan-video", "set_attn_processor"): replace_with_model_processors,
}


@pytest.mark.parametrize("family, swap", sorted(SWAPS), ids=lambda x: x)
def test_processors_replaced_after_apply_are_reported_and_kept_on_remove(family, swap):
    pipe = fresh_pipe(family)
    handle = accelerate_pipeline(pipe, PROFILE)
    SWAPS[family, swap](pipe)
    replaced = dict(pipe.transformer.attn_processors)
    with pytest.raises(RuntimeError, match=r"replaced after accelerate_pipeline.*layers \[0, 1.*remove\(\)"):
        run_pipeline(pipe)
    handle.remove()
    assert pipe.transformer.attn_processors == replaced  # remove() never undoes what the user did
    run_pipeline(pipe)  # and the pipeline runs as the user set it up
    accelerate_pipeline(pipe, PROFILE).remove()  # it can be accelerated again


def test_qkv_fusion_before_apply_runs_sparse_on_the_fused_projection():
    # diffusers fuses QKV for CogVideoX only (HunyuanVideo has added KV projections)
    _, sparse = reference_outputs("cogvideox")
    pipe = fresh_pipe("cogvideox")
    pipe.fuse_qkv_projections()
    fused_dense = run_pipeline(pipe)
    with accelerate_pipeline(pipe, PROFILE) as handle:
        output = run_pipeline(pipe)
        assert handle.stats.calls == {"sliding_frames": STEPS * handle.num_layers}
    torch.testing.assert_close(output, sparse, rtol=0, atol=1e-5)
    assert torch.equal(run_pipeline(pipe), fused_dense)


@pytest.mark.parametrize("order", ["backend-first", "apply-first"])
def test_attention_backend_reaches_the_model_processors(order):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    pipe = fresh_pipe("hunyuan-video")
    previous = _AttentionBackendRegistry._active_backend
    if order == "backend-first":
        pipe.transformer.set_attention_backend("native")
    processors = dict(pipe.transformer.attn_processors)
    handle = accelerate_pipeline(pipe, {**PROFILE, "dense_layers": [0]})
    originals = [original for _, _, original in handle._installed]  # the model's own self-attention processors
    try:
        if order == "apply-first":
            pipe.transformer.set_attention_backend("native")
        run_pipeline(pipe)
        assert handle.stats.calls["sliding_frames"] == STEPS * (handle.num_layers - 1)
        assert all(p._attention_backend == AttentionBackendName.NATIVE for p in originals)
    finally:
        handle.remove()
        pipe.transformer.reset_attention_backend()
        _AttentionBackendRegistry._active_backend = previous
    assert pipe.transformer.attn_processors == processors


def cache_config(name: str, pipe):
    if name == "first-block":
        return FirstBlockCacheConfig(threshold=0.5)
    timestep = lambda: pipe.current_timestep  # noqa: E731
    if name == "pyramid-attention-broadcast":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep,
        )
    return FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.3,
        unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 1001), tensor_format="BFCHW",
    )


# FasterCache splits the batched CFG halves: CogVideoX only (on HunyuanVideo it fails inside diffusers).
CACHES = [("cogvideox", "first-block"), ("cogvideox", "pyramid-attention-broadcast"), ("cogvideox", "faster-cache"),
          ("hunyuan-video", "first-block"), ("hunyuan-video", "pyramid-attention-broadcast")]


@pytest.mark.parametrize("order", ["cache-first", "apply-first"])
@pytest.mark.parametrize("family, cache", CACHES, ids=lambda x: x)
def test_diffusers_cache_hooks_compose_with_sparse_attention(family, cache, order):
    dense, sparse = reference_outputs(family)
    pipe = fresh_pipe(family)
    pipe.transformer.enable_cache(cache_config(cache, pipe))
    cache_only = run_pipeline(pipe)
    if order == "apply-first":
        pipe.transformer.disable_cache()
    handle = accelerate_pipeline(pipe, PROFILE)
    if order == "apply-first":
        pipe.transformer.enable_cache(cache_config(cache, pipe))
    both = run_pipeline(pipe)
    sparse_calls = handle.stats.calls["sliding_frames"]
    # The cache skips some blocks or attention calls; every attention call that still runs is sparse.
    assert handle.stats.calls == {"sliding_frames": sparse_calls} and 0 < sparse_calls <= STEPS * handle.num_layers
    assert torch.isfinite(both).all()
    assert not torch.equal(both, cache_only) and not torch.equal(both, sparse)
    handle.remove()
    assert torch.equal(run_pipeline(pipe), cache_only)
    pipe.transformer.disable_cache()
    assert torch.equal(run_pipeline(pipe), dense)


def test_torch_compile_after_apply_matches_eager():
    _, sparse = reference_outputs("cogvideox")  # one compile run is enough: tens of seconds on a CPU
    pipe = fresh_pipe("cogvideox")
    handle = accelerate_pipeline(pipe, PROFILE)
    pipe.transformer = torch.compile(pipe.transformer)
    output = run_pipeline(pipe)
    assert handle.stats.calls == {"sliding_frames": STEPS * handle.num_layers}
    torch.testing.assert_close(output, sparse, rtol=0, atol=1e-5)
