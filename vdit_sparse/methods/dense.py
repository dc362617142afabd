"""``dense`` and ``skip``: every key block, or none.

A layer whose heads are all ``dense`` runs the model's own attention
processor, untouched: exact by construction (the same code computes the same
numbers), which is what dense warm-up steps and dense layers need.  Dense
heads beside heads of other methods run on the block-sparse kernel with every
key block listed.  ``skip`` heads output zero and cost (almost) nothing.
"""

from __future__ import annotations

from ..plan import dense_plan, skip_plan
from .base import AttentionMethod, register_method

__all__ = ["DenseMethod", "SkipMethod"]


@register_method
class DenseMethod(AttentionMethod):
    name = "dense"

    def uses_model_processor(self, call):
        return True

    def plan(self, q, k, v, call):
        return dense_plan(q.shape[2], q.shape[1], call.block_m, call.block_n, q.device)


@register_method
class SkipMethod(AttentionMethod):
    """The head's attention output is zero (Sparse-vDiT's skipped heads); dense on warm-up steps."""

    name = "skip"

    def plan(self, q, k, v, call):
        return skip_plan(q.shape[2], q.shape[1], call.block_m, call.block_n, q.device)
