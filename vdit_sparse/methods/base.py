"""The method interface and the registry that profiles resolve names through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..context import AttentionCall
from ..profile import ProfileError, params_from_dict

__all__ = ["AttentionMethod", "register_method", "get_method_class", "method_names"]

_REGISTRY: dict[str, type["AttentionMethod"]] = {}


@dataclass
class NoParams:
    """A method without parameters."""


class AttentionMethod:
    """One way to compute attention.

    Subclasses set ``name`` (what profiles write) and ``Params`` (a dataclass
    of their parameters, validated by the profile loader), and implement
    :meth:`attend`.  An instance serves every layer that shares its
    parameters; state kept across steps must be keyed by
    ``call.cache_key`` and cleared in :meth:`reset`, which runs before every
    pipeline call.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    #: True for the method that leaves the model's own processor in charge.
    is_dense: ClassVar[bool] = False

    def __init__(self, params: Any):
        self.params = params

    @classmethod
    def parse_params(cls, values: dict, *, field_name: str = "params", where: str = "profile") -> Any:
        return params_from_dict(cls.Params, dict(values), field_name=field_name, where=where)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """q, k, v ``(B, H, S, D)`` -> output ``(B, H, S, D)``; records its work in ``call.stats``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget state kept across steps (a new pipeline call begins)."""


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
