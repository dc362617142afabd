"""``accelerate_pipeline(pipe, profile)``: sparse attention inside a diffusers video pipeline.

Example::

    from diffusers import CogVideoXPipeline
    from vdit_sparse import accelerate_pipeline

    pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
    with accelerate_pipeline(pipe, "sliding-frames") as handle:
        video = pipe("a red ball rolls left", num_frames=49).frames[0]
        print(handle.stats.as_dict())
    # leaving the block (or handle.remove()) restores the pipeline exactly

What it changes: the processors of the transformer's self-attention modules
(swapped for routing processors that keep the originals) and one diffusers
``ModelHook`` on the transformer that turns each forward's inputs into a
:class:`~vdit_sparse.context.StepContext`.  Nothing else in the pipeline, and
nothing process-wide, is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .context import AttentionCall, RunStats, StepContext
from .methods import AttentionMethod
from .pipelines import PipelineAdapter, find_adapter
from .pipelines.base import bind_forward_inputs
from .profile import Profile, ResolvedProfile, load_profile

__all__ = ["accelerate_pipeline", "AccelerationHandle"]

_STEP_HOOK = "vdit_sparse_step_context"
_HANDLE_ATTR = "_vdit_sparse_handle"


class StepTracker:
    """Turns the timestep each transformer forward receives into a step index and a call kind.

    The index is the position of the nearest of the scheduler's timesteps
    (pipelines may cast the timestep to bf16, so exact equality would fail).
    A second forward at the same step (the unconditional call under true CFG)
    gets ``call_kind`` 1.  Without scheduler timesteps (the transformer called
    by hand) each new timestep value starts a new step.  A step index lower
    than the last one means a new run began without the pipeline's reset (an
    interrupted call, say): the tracker then starts over and says so in
    :attr:`restarted`.
    """

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.reset()

    def reset(self) -> None:
        self._calls_per_step: dict[int, int] = {}
        self._last_timestep: float | None = None
        self._last_step = -1
        self._fallback_step = -1
        self.restarted = False

    def observe(self, timestep: torch.Tensor | float) -> tuple[int, int, int]:
        """-> (step_index, num_steps, call_kind); num_steps is 0 when unknown."""
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        schedule = getattr(self.scheduler, "timesteps", None)
        if schedule is not None and len(schedule) > 0:
            schedule = torch.as_tensor(schedule).float().cpu()
            step = int((schedule - value).abs().argmin())
            num_steps = len(schedule)
        else:
            if value != self._last_timestep:
                self._fallback_step += 1
            step, num_steps = self._fallback_step, 0
        self.restarted = step < self._last_step
        if self.restarted:
            self._calls_per_step.clear()
        self._last_step = step
        self._last_timestep = value
        call_kind = self._calls_per_step.get(step, 0)
        self._calls_per_step[step] = call_kind + 1
        return step, num_steps, call_kind


class _StepContextHook(ModelHook):
    """Builds the step context before each transformer forward; reset by the pipeline after each call."""

    _is_stateful = True

    def __init__(self, handle: "AccelerationHandle"):
        super().__init__()
        self.handle = handle

    def pre_forward(self, module, *args, **kwargs):
        self.handle._begin_forward(module, args, kwargs)
        return args, kwargs

    def reset_state(self, module):
        self.handle._end_run()
        return module


class AccelerationHandle:
    """What :func:`accelerate_pipeline` returns: the live state, the statistics, and ``remove()``.

    ``stats`` counts, for the current or last pipeline call, the attention
    calls per path and the fraction of attention work computed.
    """

    def __init__(self, pipe: Any, adapter: PipelineAdapter, profile: ResolvedProfile):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.adapter = adapter
        self.profile = profile
        self.stats = RunStats()
        self._modules = adapter.attention_modules(self.transformer)
        self.num_layers = len(self._modules)
        self.num_heads = adapter.num_heads(self.transformer)
        self._tracker = StepTracker(getattr(pipe, "scheduler", None))
        self._step: StepContext | None = None
        self._run_open = False
        self._methods: dict[int, AttentionMethod | None] = {}
        shared: dict[tuple, AttentionMethod] = {}
        for layer in range(self.num_layers):
            method_cls, params = profile.layer_plan(layer)
            if method_cls.is_dense:
                self._methods[layer] = None
                continue
            # Layers with the same method and parameters share one instance (and its caches, keyed per layer).
            key = (method_cls, repr(params))
            if key not in shared:
                shared[key] = method_cls(params)
            self._methods[layer] = shared[key]
        self._originals: list[Any] = []
        self._removed = False

    # -- installation --------------------------------------------------------------

    def _install(self) -> None:
        for layer, module in enumerate(self._modules):
            self._originals.append(module.processor)
            module.set_processor(self.adapter.make_processor(module.processor, layer, self))
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.register_hook(_StepContextHook(self), _STEP_HOOK)
        setattr(self.transformer, _HANDLE_ATTR, self)

    def remove(self) -> None:
        """Put the original processors back and drop the hook; the pipeline computes exactly as before."""
        if self._removed:
            return
        for module, original in zip(self._modules, self._originals):
            module.set_processor(original)
        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(_STEP_HOOK, recurse=False)
        delattr(self.transformer, _HANDLE_ATTR)
        self._removed = True

    def reset(self) -> None:
        """Forget the current run: the next transformer forward starts a new one.

        The pipeline does this itself after every call; call it after a call
        that was interrupted during its first step (one interrupted later is
        recognised when the next call's steps go back).
        """
        self._end_run()

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # -- the step context, fed by the transformer hook ------------------------------

    def _begin_forward(self, transformer, args, kwargs) -> None:
        inputs = bind_forward_inputs(transformer.forward, args, kwargs)
        layout = self.adapter.token_layout(transformer, inputs)
        timestep = self.adapter.timestep(inputs)
        step, num_steps, call_kind = self._tracker.observe(timestep)
        if not self._run_open or self._tracker.restarted:  # first forward of a pipeline call
            self._run_open = True
            self.stats.reset()
            for method in {id(m): m for m in self._methods.values() if m is not None}.values():
                method.reset()
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        self._step = StepContext(step, num_steps, value, call_kind, layout)

    def _end_run(self) -> None:
        self._tracker.reset()
        self._step = None
        self._run_open = False

    # -- the dispatcher side that processors call ----------------------------------

    def sparse_call(self, layer_index, batch, heads, key_padding_mask) -> AttentionCall | None:
        step = self._step
        method = self._methods[layer_index]
        dense = (
            step is None
            or method is None
            or step.step_index < self.profile.dense_warmup_steps(step.num_steps)
        )
        if dense:
            seq_len = step.layout.seq_len if step is not None else 0
            self.stats.record("dense", 1.0, batch * heads, seq_len)
            return None
        return AttentionCall(layer_index, step, key_padding_mask, self.stats)

    def attend(self, q, k, v, call: AttentionCall) -> torch.Tensor:
        seq_len = call.layout.seq_len
        if q.shape[-2] != seq_len:
            raise RuntimeError(
                f"layer {call.layer_index}: the attention sequence has {q.shape[-2]} tokens, but the layout read from "
                f"the transformer inputs says {seq_len} ({call.layout})"
            )
        return self._methods[call.layer_index].attend(q, k, v, call)

    def summary(self) -> dict:
        """What the last (or current) run did, for reports."""
        return {
            "profile": self.profile.name,
            "family": self.adapter.family,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            **self.stats.as_dict(),
        }


def _is_compiled(module: torch.nn.Module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or (
        getattr(module, "_compiled_call_impl", None) is not None
    )


def accelerate_pipeline(pipe: Any, profile: Union[str, Path, Profile, dict, ResolvedProfile]) -> AccelerationHandle:
    """Apply a sparse-attention profile to a diffusers video pipeline, in place.

    ``profile`` is a built-in profile name (see
    :func:`vdit_sparse.profile.builtin_profiles`), a YAML path, a dict or a
    :class:`Profile`.  Returns a handle; ``handle.remove()`` (or leaving the
    handle's ``with`` block) restores the pipeline exactly.  Call it before
    ``torch.compile``; apply at most one profile at a time.
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise TypeError(f"{type(pipe).__name__} has no `transformer`; vdit-sparse accelerates DiT video pipelines")
    if _is_compiled(transformer):
        raise RuntimeError(
            "the pipeline's transformer is already wrapped by torch.compile; call accelerate_pipeline "
            "before torch.compile (compile the accelerated transformer afterwards)"
        )
    existing = getattr(transformer, _HANDLE_ATTR, None)
    if existing is not None:
        raise RuntimeError(
            f"vdit-sparse has already been applied to this pipeline (profile '{existing.profile.name}'); "
            "call handle.remove() first"
        )
    adapter = find_adapter(pipe)
    resolved = load_profile(profile)
    modules = adapter.attention_modules(transformer)
    resolved.check_model(adapter.family, len(modules), adapter.num_heads(transformer))
    handle = AccelerationHandle(pipe, adapter, resolved)
    handle._install()
    return handle
