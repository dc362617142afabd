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

__all__ = ["accelerate_pipeline", "check_profile", "AccelerationHandle"]

_RUN_END_HOOK = "vdit_sparse_run_end"
_HANDLE_ATTR = "_vdit_sparse_handle"


class StepTracker:
    """Turns the timestep each transformer forward receives into a step index and a call kind.

    The step index is the position of the received timestep among the
    scheduler's timesteps, compared in the dtype the transformer receives:
    HunyuanVideo casts its timestep to bf16, where neighbouring steps of a
    50-step schedule round to one value.  When several steps match, the
    pipeline's full-precision ``current_timestep`` picks among them (without
    it, the earliest one not before the last step seen).  A second forward at
    the same step (the unconditional call under true CFG) gets ``call_kind`` 1.
    Without scheduler timesteps (the transformer called by hand) each new
    timestep value starts a new step.

    A new pipeline call is recognised without help: every call sets new
    scheduler timesteps (a new tensor) before its first step, and a step
    index lower than the last one also starts over (a transformer driven by
    hand).  :attr:`new_run` says whether the last observed forward began a run.
    The pipeline and its scheduler are read at every forward, so a scheduler
    swapped after applying is followed.
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.reset()

    def reset(self) -> None:
        self._calls_per_step: dict[int, int] = {}
        self._schedule: Any = None  # the scheduler's timesteps object of the current run
        self._schedule_cpu: torch.Tensor | None = None
        self._last_timestep: float | None = None
        self._last_step = -1
        self._fallback_step = -1
        self.new_run = False

    def observe(self, timestep: torch.Tensor | float) -> tuple[int, int, int]:
        """-> (step_index, num_steps, call_kind); num_steps is 0 when unknown."""
        received = timestep.detach().flatten()[0].cpu() if torch.is_tensor(timestep) else torch.tensor(float(timestep), dtype=torch.float64)
        value = float(received)
        scheduler = getattr(self.pipe, "scheduler", None)
        schedule = getattr(scheduler, "timesteps", None)
        began = self._last_step < 0
        if schedule is not None and len(schedule) > 0:
            if schedule is not self._schedule:  # set_timesteps ran: a new pipeline call
                began = True
                self._schedule, self._schedule_cpu = schedule, torch.as_tensor(schedule).detach().cpu()
            step, num_steps = self._match(received, began), len(self._schedule_cpu)
        else:
            if value != self._last_timestep:
                self._fallback_step += 1
            step, num_steps = self._fallback_step, 0
        self.new_run = began or step < self._last_step
        if self.new_run:
            self._calls_per_step.clear()
        self._last_step = step
        self._last_timestep = value
        call_kind = self._calls_per_step.get(step, 0)
        self._calls_per_step[step] = call_kind + 1
        return step, num_steps, call_kind

    def _match(self, received: torch.Tensor, began: bool) -> int:
        """Index of the schedule entry that becomes ``received`` in ``received``'s dtype (the nearest if none does)."""
        as_received = self._schedule_cpu.to(received.dtype).double()
        distance = (as_received - received.double()).abs()
        candidates = torch.nonzero(distance == distance.min()).flatten().tolist()
        if len(candidates) == 1:
            return candidates[0]
        exact = getattr(self.pipe, "current_timestep", None)  # diffusers video pipelines set it to the step's t
        if exact is not None and torch.as_tensor(exact).to(received.dtype).cpu() == received:
            exact = float(exact)
            return min(candidates, key=lambda i: abs(float(self._schedule_cpu[i]) - exact))
        later = [i for i in candidates if began or i >= self._last_step]
        return later[0] if later else candidates[0]


class _RunEndHook(ModelHook):
    """Hears the end of every pipeline call: diffusers resets stateful hooks then (``maybe_free_model_hooks``)."""

    _is_stateful = True

    def __init__(self, handle: "AccelerationHandle"):
        super().__init__()
        self.handle = handle

    def reset_state(self, module):
        self.handle._end_run()
        return module


def _remove_registry_hook(registry: HookRegistry, name: str) -> None:
    """``registry.remove_hook(name)``, keeping the hooks registered after it working.

    diffusers' ``remove_hook`` relinks the next hook's ``forward`` to what the
    removed hook wrapped; for a hook with a ``new_forward`` of its own (Pyramid
    Attention Broadcast, FasterCache) that overwrites the new forward instead
    of what it wraps.  So the next hook's ``original_forward`` is relinked here.
    """
    index = registry._hook_order.index(name)
    later = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
    kept = later.forward if later is not None and later.original_forward is not None else None
    registry.remove_hook(name, recurse=False)
    if kept is not None:
        later.original_forward, later.forward = later.forward, kept


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
        self._tracker = StepTracker(pipe)
        self._step: StepContext | None = None
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
        # (module, our processor, the processor it replaced), per layer
        self._installed: list[tuple[torch.nn.Module, Any, Any]] = []
        self._forward_hook: Any = None
        self._registry_created = False
        self._removed = False

    # -- installation --------------------------------------------------------------

    def _install(self) -> None:
        for layer, module in enumerate(self._modules):
            routing = self.adapter.make_processor(module.processor, layer, self)
            self._installed.append((module, routing, module.processor))
            module.set_processor(routing)
        # The step context comes from a PyTorch forward pre-hook on the transformer, not from a
        # wrapper around its forward: diffusers' CPU offload removes and re-installs its own
        # forward wrappers after every call, which would drop ours, and a wrapper of ours removed
        # later would drop theirs.
        self._forward_hook = self.transformer.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        # The end-of-call reset reaches every diffusers hook registry under the transformer; ours
        # sits on the first attention module, whose forward no offload wrapper touches.
        first = self._modules[0]
        self._registry_created = not hasattr(first, "_diffusers_hook")
        HookRegistry.check_if_exists_or_initialize(first).register_hook(_RunEndHook(self), _RUN_END_HOOK)
        setattr(self.transformer, _HANDLE_ATTR, self)

    def remove(self) -> None:
        """Put the original processors back and drop the hooks; the pipeline computes exactly as before.

        A processor that was replaced after applying (``fuse_qkv_projections()``,
        ``set_attn_processor``) is the user's choice and stays.
        """
        if self._removed:
            return
        for module, routing, original in self._installed:
            if module.processor is routing:
                module.set_processor(original)
        self._forward_hook.remove()
        first = self._modules[0]
        _remove_registry_hook(first._diffusers_hook, _RUN_END_HOOK)
        if self._registry_created and not first._diffusers_hook.hooks:
            del first._diffusers_hook
        delattr(self.transformer, _HANDLE_ATTR)
        self._end_run()
        self._removed = True

    def reset(self) -> None:
        """Forget the current run: the next transformer forward starts a new one.

        Not needed between pipeline calls, even interrupted ones: a new call
        is recognised by the new scheduler timesteps it sets.  Use it when
        driving the transformer by hand.
        """
        self._end_run()

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # -- the step context, fed by the transformer's forward pre-hook ------------------

    def _on_forward(self, transformer, args, kwargs) -> None:
        self._check_processors()
        self._begin_forward(transformer, args, kwargs)

    def _check_processors(self) -> None:
        """Refuse to run when processors were swapped after applying: those layers would silently run dense."""
        replaced = [layer for layer, (module, routing, _) in enumerate(self._installed) if module.processor is not routing]
        if replaced:
            now = sorted({type(self._installed[layer][0].processor).__name__ for layer in replaced})
            raise RuntimeError(
                f"vdit-sparse: attention processors were replaced after accelerate_pipeline (layers {replaced} now "
                f"run {', '.join(now)}; fuse_qkv_projections() and set_attn_processor() do this), so these layers "
                "would run without the profile. Call handle.remove(), which keeps the new processors, then "
                "accelerate_pipeline() again; or make the change before applying."
            )

    def _begin_forward(self, transformer, args, kwargs) -> None:
        inputs = bind_forward_inputs(transformer.forward, args, kwargs)
        layout = self.adapter.token_layout(transformer, inputs)
        timestep = self.adapter.timestep(inputs)
        step, num_steps, call_kind = self._tracker.observe(timestep)
        if self._tracker.new_run:
            self.stats.reset()
            for method in {id(m): m for m in self._methods.values() if m is not None}.values():
                method.reset()
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        self._step = StepContext(step, num_steps, value, call_kind, layout)

    def _end_run(self) -> None:
        self._tracker.reset()
        self._step = None

    # -- the dispatcher side that processors call ----------------------------------

    def sparse_call(self, layer_index, batch, heads, key_padding_mask) -> AttentionCall | None:
        step = self._step
        method = self._methods[layer_index]
        dense = (
            self._removed  # a processor of ours brought back after remove() (unfuse_qkv_projections)
            or step is None
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
    handle = AccelerationHandle(pipe, find_adapter(pipe), check_profile(pipe, profile))
    handle._install()
    return handle


def check_profile(pipe: Any, profile: Union[str, Path, Profile, dict, ResolvedProfile]) -> ResolvedProfile:
    """Load ``profile`` and check that it fits ``pipe``, changing nothing.

    Raises :class:`~vdit_sparse.profile.ProfileError` for a profile written
    for another model family or for other layer or head counts, and
    ``TypeError`` for a pipeline vdit-sparse does not support.
    :func:`accelerate_pipeline` makes the same checks; call this one to fail
    before long work, such as a dense baseline run.
    """
    adapter = find_adapter(pipe)
    resolved = load_profile(profile)
    transformer = pipe.transformer
    resolved.check_model(adapter.family, len(adapter.attention_modules(transformer)), adapter.num_heads(transformer))
    return resolved
