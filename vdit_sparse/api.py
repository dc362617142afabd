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
(swapped for routing processors that keep the originals), a PyTorch forward
pre-hook on each transformer (Wan 2.2 has two) that turns each forward's inputs into a
:class:`~vdit_sparse.context.StepContext`, a diffusers ``ModelHook`` on the
first attention module that hears the end of every pipeline call, for a
method that computes feed-forwards a ``ModelHook`` on each feed-forward
module, and for a profile with ``step_cache`` a ``ModelHook`` on each
transformer block.  Nothing else in the pipeline, and nothing process-wide, is touched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .context import AttentionCall, FeedForwardCall, RunStats, StateStore, StepContext
from .methods import AttentionMethod
from .pipelines import PipelineAdapter, find_adapter
from .pipelines.base import bind_forward_inputs
from .profile import Profile, ProfileError, ResolvedProfile, load_profile
from .routing import HeadGroup, LayerRouting

__all__ = ["accelerate_pipeline", "check_profile", "AccelerationHandle"]

_RUN_END_HOOK = "vdit_sparse_run_end"
_FEED_FORWARD_HOOK = "vdit_sparse_feed_forward"
_STEP_CACHE_HOOK = "vdit_sparse_step_cache"
_HANDLE_ATTR = "_vdit_sparse_handle"


class StepTracker:
    """Turns the timestep each transformer forward receives into a step index and a call kind.

    The diffusers pipelines loop over the scheduler's timesteps and pass the
    transformer a view of the current entry (CogVideoX) or keep one as
    ``pipe.current_timestep`` (all of them): its position in the schedule's
    storage is the step index, read without waiting for the GPU.  Otherwise
    the received value is matched against the schedule in the dtype the
    transformer receives (HunyuanVideo casts to bf16, where neighbouring
    steps of a 50-step schedule round to one value; the full-precision
    ``current_timestep`` then picks among them, or else the earliest one not
    before the last step seen).  A second forward at the same step (the
    unconditional call under true CFG) gets ``call_kind`` 1.  Without
    scheduler timesteps (the transformer called by hand) each new timestep
    value starts a new step.

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
        #: The timestep of the last observed forward, as a float.
        self.timestep_value = math.nan

    def observe(self, timestep: torch.Tensor | float) -> tuple[int, int, int]:
        """-> (step_index, num_steps, call_kind); num_steps is 0 when unknown."""
        scheduler = getattr(self.pipe, "scheduler", None)
        schedule = getattr(scheduler, "timesteps", None)
        began = self._last_step < 0
        if schedule is not None and len(schedule) > 0:
            if schedule is not self._schedule:  # set_timesteps ran: a new pipeline call
                began = True
                self._schedule, self._schedule_cpu = schedule, torch.as_tensor(schedule).detach().cpu()
            step = self._position_in_schedule(timestep)
            if step is None:
                step = self._match(_first_value(timestep), began)
            num_steps, value = len(self._schedule_cpu), float(self._schedule_cpu[step])
        else:
            value = float(_first_value(timestep))
            if value != self._last_timestep:
                self._fallback_step += 1
            step, num_steps = self._fallback_step, 0
        self.new_run = began or step < self._last_step
        if self.new_run:
            self._calls_per_step.clear()
        self._last_step = step
        self._last_timestep = self.timestep_value = value
        call_kind = self._calls_per_step.get(step, 0)
        self._calls_per_step[step] = call_kind + 1
        return step, num_steps, call_kind

    def _position_in_schedule(self, timestep) -> int | None:
        """The step whose schedule entry ``timestep`` (or the pipeline's ``current_timestep``) is a view of."""
        schedule = self._schedule
        if not torch.is_tensor(schedule) or schedule.dim() != 1:
            return None
        for candidate in (timestep, getattr(self.pipe, "current_timestep", None)):
            if not torch.is_tensor(candidate) or candidate.untyped_storage().data_ptr() != schedule.untyped_storage().data_ptr():
                continue
            offset = candidate.storage_offset() - schedule.storage_offset()
            step, rest = divmod(offset, schedule.stride(0))
            if rest == 0 and 0 <= step < len(schedule):
                return step
        return None

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


def _first_value(timestep: torch.Tensor | float) -> torch.Tensor:
    """The timestep's first entry as a CPU tensor in its own dtype (reading a GPU value waits for the GPU)."""
    if torch.is_tensor(timestep):
        return timestep.detach().flatten()[0].cpu()
    return torch.tensor(float(timestep), dtype=torch.float64)


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


class _FeedForwardHook(ModelHook):
    """Hands one feed-forward module's calls to the method of its layer (the model's forward when it declines)."""

    def __init__(self, handle: "AccelerationHandle", site: Any, method: AttentionMethod):
        super().__init__()
        self.handle, self.site, self.method = handle, site, method

    def new_forward(self, module, hidden_states, *args, **kwargs):
        output = self.handle._feed_forward(self.site, self.method, hidden_states)
        return output if output is not None else self.fn_ref.original_forward(hidden_states, *args, **kwargs)


class _InlinedFeedForward:
    """A feed-forward its block inlines, ``down(cat([other, activation(up(x))]))`` (HunyuanVideo single-stream):
    when the method computes it, ``up`` returns a zero placeholder the activation passes on, and ``down``
    computes its other features' share and adds the method's result."""

    def __init__(self, handle: "AccelerationHandle", site: Any, method: AttentionMethod):
        self.handle, self.site, self.method = handle, site, method
        self.pending: torch.Tensor | None = None  # the method's result, between up and down
        self.inside = False  # the method is running (and calls the three parts itself)

    def up(self, x, original):
        if self.inside:
            return original(x)
        self.inside = True
        try:
            self.pending = self.handle._feed_forward(self.site, self.method, x)
        finally:
            self.inside = False
        if self.pending is None:
            return original(x)
        return x.new_zeros(()).expand(*x.shape[:-1], self.site.up.out_features)

    def activation(self, x, original):
        return x if self.pending is not None and not self.inside else original(x)

    def down(self, x, original):
        if self.pending is None or self.inside:
            return original(x)
        mine, self.pending = self.pending, None
        down, first = self.site.down, self.site.down_columns.start
        return torch.nn.functional.linear(x[..., :first], down.weight[:, :first], down.bias) + mine


class _InlinedUpHook(ModelHook):
    def __init__(self, inlined: _InlinedFeedForward):
        super().__init__()
        self.inlined = inlined

    def new_forward(self, module, x):
        return self.inlined.up(x, self.fn_ref.original_forward)


class _InlinedActivationHook(_InlinedUpHook):
    def new_forward(self, module, x):
        return self.inlined.activation(x, self.fn_ref.original_forward)


class _InlinedDownHook(_InlinedUpHook):
    def new_forward(self, module, x):
        return self.inlined.down(x, self.fn_ref.original_forward)


def _shapes(output) -> list:
    """The shapes of a block's output: one tensor (Wan) or a tuple of them."""
    return [output.shape] if torch.is_tensor(output) else [t.shape for t in output]


class _StepCacheHook(ModelHook):
    """One transformer block under step caching: on a skipped step the first block returns the block stack's
    output of the last computed step and the others return what they receive; the last block keeps its output
    on computed steps."""

    def __init__(self, handle: "AccelerationHandle", first: bool, last: bool):
        super().__init__()
        self.handle, self.first, self.last = handle, first, last

    def new_forward(self, module, *args, **kwargs):
        reused = self.handle._reused_block_output(module, self.first, args, kwargs)
        if reused is not None:
            return reused
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            self.handle._keep_block_output(output)
        return output


class AccelerationHandle:
    """What :func:`accelerate_pipeline` returns: the live state, the statistics, and ``remove()``.

    ``stats`` counts, for the current or last pipeline call, the attention
    calls per path and the fraction of attention work computed.
    """

    def __init__(self, pipe: Any, adapter: PipelineAdapter, profile: ResolvedProfile,
                 layers: list[LayerRouting] | None = None):
        """``layers`` replaces the routing the profile gives (the offline search routes every layer to itself);
        the profile still sets the dense warm-up."""
        self.pipe = pipe
        #: The transformers the handle covers (Wan 2.2's two experts; one elsewhere). Layers are numbered over
        #: them in this order.
        self.transformers = adapter.transformers(pipe)
        self.adapter = adapter
        self.profile = profile
        self.stats = RunStats()
        self._modules = adapter.attention_layers(pipe)
        self.num_layers = len(self._modules)
        self.num_heads = adapter.num_heads(self.transformers[0])
        self._tracker = StepTracker(pipe)
        self._step: StepContext | None = None
        self.state = StateStore()
        self._layers: list[LayerRouting] = layers if layers is not None else self._profile_layers(profile)
        # Feed-forward sites whose layer has a method that computes them: (module, method).
        self._feed_forwards = []
        if any(g.method.uses_feed_forward for layer in self._layers for g in layer.groups):
            for site in adapter.all_feed_forward_sites(pipe):
                owner = next((g.method for g in self._layers[site.layer_index].groups if g.method.uses_feed_forward), None)
                if owner is not None:
                    self._feed_forwards.append((site, owner))
        # Step caching: each transformer's blocks, in order, when the profile skips steps.
        self._blocks: list[list[torch.nn.Module]] = []
        if profile.profile.step_cache is not None and profile.profile.step_cache.skip_steps:
            for transformer in self.transformers:
                refusal = adapter.step_cache_refusal(transformer)
                if refusal is not None:
                    raise ProfileError(f"profile '{profile.name}': field 'step_cache': {type(transformer).__name__}: "
                                       f"{refusal}")
                blocks: list[torch.nn.Module] = []
                for block in adapter.blocks(transformer):
                    if all(block is not seen for seen in blocks):
                        blocks.append(block)
                self._blocks.append(blocks)
        self._skipping = False  # whether the current forward reuses the last computed step's output
        self._forward_layers = 0  # attention layers of the transformer the current forward runs
        # (module, our processor, the processor it replaced), per layer
        self._installed: list[tuple[torch.nn.Module, Any, Any]] = []
        # modules we gave a diffusers hook registry of their own (dropped again by remove())
        self._registries: list[torch.nn.Module] = []
        self._forward_hooks: list[Any] = []
        self._hooked: list[tuple[torch.nn.Module, str]] = []
        self._removed = False

    def _profile_layers(self, profile: ResolvedProfile) -> list[LayerRouting]:
        # Groups with the same method and parameters share one instance: it keeps only what
        # depends on the token layout (its plans); what it keeps across steps is in self.state.
        shared: dict[tuple, AttentionMethod] = {}
        layers = []
        for layer in range(self.num_layers):
            groups = []
            for spec in profile.layer_groups(layer, self.num_heads):
                key = (spec.method, repr(spec.params))
                if key not in shared:
                    shared[key] = spec.method(spec.params)
                groups.append(HeadGroup(shared[key], spec.heads))
            layers.append(LayerRouting(layer, groups))
        return layers

    # -- installation --------------------------------------------------------------

    def _install(self) -> None:
        for layer, module in enumerate(self._modules):
            routing = self.adapter.make_processor(module.processor, layer, self)
            self._installed.append((module, routing, module.processor))
            module.set_processor(routing)
        # The step context comes from a PyTorch forward pre-hook on each transformer, not from a
        # wrapper around its forward: diffusers' CPU offload removes and re-installs its own
        # forward wrappers after every call, which would drop ours, and a wrapper of ours removed
        # later would drop theirs.
        self._forward_hooks = [t.register_forward_pre_hook(self._on_forward, with_kwargs=True) for t in self.transformers]
        # The end-of-call reset reaches every diffusers hook registry under the transformer; ours
        # sits on the first attention module, whose forward no offload wrapper touches.
        self._register(self._modules[0], _RunEndHook(self), _RUN_END_HOOK)
        for site, method in self._feed_forwards:
            if site.module is not None:
                self._register(site.module, _FeedForwardHook(self, site, method), _FEED_FORWARD_HOOK)
            else:  # inlined in its block: the hooks on its three parts pass the method's result along
                inlined = _InlinedFeedForward(self, site, method)
                self._register(site.up, _InlinedUpHook(inlined), _FEED_FORWARD_HOOK)
                self._register(site.activation, _InlinedActivationHook(inlined), _FEED_FORWARD_HOOK)
                self._register(site.down, _InlinedDownHook(inlined), _FEED_FORWARD_HOOK)
        for blocks in self._blocks:
            for index, block in enumerate(blocks):
                hook = _StepCacheHook(self, first=index == 0, last=index == len(blocks) - 1)
                self._register(block, hook, _STEP_CACHE_HOOK)
        for transformer in self.transformers:
            setattr(transformer, _HANDLE_ATTR, self)

    def _register(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        if not hasattr(module, "_diffusers_hook"):
            self._registries.append(module)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._hooked.append((module, name))

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
        for hook in self._forward_hooks:
            hook.remove()
        for module, name in self._hooked:
            _remove_registry_hook(module._diffusers_hook, name)
        for module in self._registries:  # registries we created, now empty
            if not module._diffusers_hook.hooks:
                del module._diffusers_hook
        for transformer in self.transformers:
            delattr(transformer, _HANDLE_ATTR)
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

    # The decisions below (which step, which path, which plan) are Python over the handle's state:
    # under torch.compile they run eagerly (one graph break each) instead of becoming guards that
    # would recompile the transformer at every step.  See README, "torch.compile".

    @torch.compiler.disable
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
            self.state.new_run()
        else:
            self.state.update_peak()  # what the last forward left
        self._forward_layers = len(self.adapter.attention_modules(transformer))
        warmup = step < self.profile.dense_warmup_steps(num_steps)
        self._step = StepContext(step, num_steps, self._tracker.timestep_value, call_kind, layout, warmup)
        self._skipping = bool(self._blocks) and step in self.profile.skip_steps(num_steps) and not any(
            group.method.needs_step(self._step) for layer in self._layers for group in layer.groups
        )

    # -- step caching, fed by the blocks' hooks -------------------------------------

    @torch.compiler.disable
    def _reused_block_output(self, block, first: bool, args: tuple, kwargs: dict):
        """On a skipped step: the first block's output is the last computed step's; the others pass through."""
        step = self._step
        if not self._skipping or step is None or self._removed:
            return None
        passthrough = self.adapter.block_passthrough(block, args, kwargs)
        if not first:
            return passthrough
        kept = self.state.slot(("step_cache", step.call_kind)).get("output")
        if kept is None or _shapes(kept) != _shapes(passthrough):
            self._skipping = False  # nothing computed before at this shape: compute this step
            return None
        batch = _shapes(passthrough)[0][0]
        for _ in range(self._forward_layers):
            self.stats.record("step_cache", 0.0, batch * self.num_heads, step.layout.seq_len)
        return kept

    @torch.compiler.disable
    def _feed_forward(self, site, method: AttentionMethod, x: torch.Tensor) -> torch.Tensor | None:
        """The method's output for feed-forward ``site`` at input ``x``, or None to let the model compute it."""
        step = self._step
        if step is None or self._removed:
            return None
        state = self.state.slot((site.layer_index, step.call_kind, "feed_forward", site.stream))
        return method.feed_forward(site, x, FeedForwardCall(site.layer_index, site.stream, step, state))

    @torch.compiler.disable
    def _keep_block_output(self, output) -> None:
        step = self._step
        if step is not None and not self._removed:
            self.state.slot(("step_cache", step.call_kind))["output"] = output  # a tensor or a tuple of them

    def _end_run(self) -> None:
        self.state.update_peak()
        self.state.clear()
        self._tracker.reset()
        self._step = None

    # -- the dispatcher side that processors call ----------------------------------

    @torch.compiler.disable
    def route(self, layer_index: int, batch: int, heads: int, key_padding_mask: torch.Tensor | None,
              head_offset: int = 0) -> AttentionCall | None:
        """The call to hand to :meth:`attend`, or None when the model's own processor should run it."""
        step = self._step
        if self._removed or step is None:  # after remove() (a processor of ours brought back), or no forward seen
            return None
        call = AttentionCall(layer_index, step, key_padding_mask, self.stats, head_offset)
        if self._layers[layer_index].uses_model_processor(call):
            self.stats.record("dense", 1.0, batch * heads, step.layout.seq_len)
            return None
        return call

    @torch.compiler.disable
    def attend(self, q, k, v, call: AttentionCall) -> torch.Tensor:
        seq_len = call.layout.seq_len
        if q.shape[-2] != seq_len:
            raise RuntimeError(
                f"layer {call.layer_index}: the attention sequence has {q.shape[-2]} tokens, but the layout read from "
                f"the transformer inputs says {seq_len} ({call.layout})"
            )
        return self._layers[call.layer_index].attend(q, k, v, call, self.state)

    def summary(self) -> dict:
        """What the last (or current) run did, for reports."""
        return {
            "profile": self.profile.name,
            "family": self.adapter.family,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            **self.stats.as_dict(),
            "state_bytes": self.state.nbytes(),
            "state_bytes_on_gpu": self.state.nbytes("cuda"),
            "peak_state_bytes": self.state.peak_bytes,
        }


def _is_compiled(module: torch.nn.Module | None) -> bool:
    if module is None:
        return False
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
    if getattr(pipe, "transformer", None) is None and getattr(pipe, "transformer_2", None) is None:
        raise TypeError(f"{type(pipe).__name__} has no `transformer`; vdit-sparse accelerates DiT video pipelines")
    if any(_is_compiled(getattr(pipe, name, None)) for name in ("transformer", "transformer_2")):
        raise RuntimeError(
            "the pipeline's transformer is already wrapped by torch.compile; call accelerate_pipeline "
            "before torch.compile (compile the accelerated transformer afterwards)"
        )
    adapter = find_adapter(pipe)
    for transformer in adapter.transformers(pipe):
        existing = getattr(transformer, _HANDLE_ATTR, None)
        if existing is not None:
            raise RuntimeError(
                f"vdit-sparse has already been applied to this pipeline (profile '{existing.profile.name}'); "
                "call handle.remove() first"
            )
    handle = AccelerationHandle(pipe, adapter, check_profile(pipe, profile))
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
    resolved.check_model(adapter.family, *adapter.layers_and_heads(pipe))
    return resolved
