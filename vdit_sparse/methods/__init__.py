"""Attention methods: each turns one attention call's q, k, v into an output.

A method never knows which model it runs in: it reads the token layout, the
step and the layer from the :class:`~vdit_sparse.context.AttentionCall`.
Methods register themselves by name; profiles name them.
"""

from .base import AttentionMethod, get_method_class, method_names, register_method
from .dense import DenseMethod
from .block_sparse import BlockSparseMethod, SlidingFramesMethod, masked_block_attention
from .svg import SVGMethod

__all__ = [
    "AttentionMethod",
    "BlockSparseMethod",
    "DenseMethod",
    "SVGMethod",
    "SlidingFramesMethod",
    "get_method_class",
    "masked_block_attention",
    "method_names",
    "register_method",
]
