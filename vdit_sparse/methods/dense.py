"""The dense method: the model's own attention processor runs, untouched.

It is exact by construction (the same code computes the same numbers), which
is what dense warm-up steps and dense layers need.
"""

from __future__ import annotations

from .base import AttentionMethod, register_method

__all__ = ["DenseMethod"]


@register_method
class DenseMethod(AttentionMethod):
    name = "dense"
    is_dense = True

    def attend(self, q, k, v, call):  # pragma: no cover - the dispatcher never routes here
        raise RuntimeError("the dense method runs the model's own processor; attend() is never called")
