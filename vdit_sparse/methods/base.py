"""The method interface and the registry that profiles resolve names through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..context import AttentionCall, FeedForwardCall
from ..plan import HeadPlan
from ..profile import ProfileError, params_from_dict

__all__ = ["AttentionMethod", "register_method", "get_method_class", "method_names"]

_REGISTRY: dict[str, type["AttentionMethod"]] = {}


@dataclass
class NoParams:
    """A method without parameters."""


class AttentionMethod:
    """One way to compute attention, for the heads a profile gives it.

    Subclasses set ``name`` (what profiles write) and ``Params`` (a dataclass
    of their parameters, validated by the profile loader), and implement
    :meth:`plan`.  Every attention call of the method's layers reaches it:

    1. :meth:`uses_model_processor` decides whether the call runs the model's
       own processor (exact dense, no q, k, v computed by us).  The default
       says yes on the profile's dense warm-up steps; a method that must see
       those steps (to fill a cache) says no and plans a dense pass itself.
       A layer runs the model's processor only when all of its methods agree.
    2. :meth:`plan` returns the :class:`~vdit_sparse.plan.HeadPlan` of the
       call for the method's heads (``q``, ``k``, ``v`` hold just those heads).
       The layer joins the plans of all its methods and runs them in one launch.
       A method whose attention is no block plan (Chipmunk's column-sparse
       deltas) sets ``computes_attention = True`` and implements
       :meth:`attend` instead; its heads run in their own launch.
    3. :meth:`finish` may change the method's heads' output (add a cached
       term, say) and read or fill ``call.state``.

    A method with ``uses_feed_forward = True`` also computes the
    feed-forwards of its layers (:meth:`feed_forward`), at every site its
    adapter names (a feed-forward module, or the parts of one its block
    inlines).  :meth:`needs_step` tells the profile's step caching which
    steps the method must see.

    State kept across steps lives in ``call.state`` (one dict per layer, call
    kind and head group, dropped when the pipeline call ends), never on the
    instance: one instance serves every layer that shares its parameters.
    What an instance may keep is what depends only on the token layout (a
    plan built once per layout).
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    #: True when the method also computes its layers' feed-forwards (:meth:`feed_forward`).
    uses_feed_forward: ClassVar[bool] = False
    #: True when the method computes its heads' attention itself (:meth:`attend`) instead of planning it.
    computes_attention: ClassVar[bool] = False

    def __init__(self, params: Any):
        self.params = params

    @classmethod
    def parse_params(cls, values: dict, *, field_name: str = "params", where: str = "profile") -> Any:
        return params_from_dict(cls.Params, dict(values), field_name=field_name, where=where)

    def uses_model_processor(self, call: AttentionCall) -> bool:
        """True when this call may run the model's own processor instead of a plan of ours."""
        return call.step.warmup

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> HeadPlan:
        """The plan for q, k, v ``(B, h, S, D)``: the ``h`` heads ``call.heads`` of this call."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, float]:
        """For ``computes_attention`` methods: the heads' output ``(B, h, S, D)`` and the fraction of dense
        attention work it took."""
        raise NotImplementedError

    def finish(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """The method's heads' output ``(B, h, S, D)`` after the plan ran; by default unchanged."""
        return out

    def needs_step(self, step) -> bool:
        """True when the method must run at ``step`` (a :class:`~vdit_sparse.context.StepContext`), so the
        profile's step caching may not skip it (Chipmunk refreshes its cache there)."""
        return False

    def feed_forward(self, site, x: torch.Tensor, call: FeedForwardCall) -> torch.Tensor | None:
        """The output of feed-forward ``site`` (a :class:`~vdit_sparse.pipelines.base.FeedForwardSite`)
        for input ``x`` (what :meth:`FeedForwardSite.down_out` gives for its activation), or None to let the
        model compute it."""
        return None


def register_method(cls: type[AttentionMethod]) -> type[AttentionMethod]:
    """Class decorator: make a method available to profiles under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"an attention method named {cls.name!r} is already registered ({_REGISTRY[cls.name]})")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str, *, field_name: str = "method", where: str = "profile") -> type[AttentionMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ProfileError(
            f"{where}: field '{field_name}': unknown method {name!r}; allowed: {', '.join(method_names())}"
        ) from None
