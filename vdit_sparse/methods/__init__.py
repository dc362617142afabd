"""Attention methods: each turns one attention call into a per-head plan.

A method never knows which model it runs in: it reads the token layout, the
step, the layer and its heads from the
:class:`~vdit_sparse.context.AttentionCall`.  Methods register themselves by
name; profiles name them, per layer and per head.
"""

from .base import AttentionMethod, get_method_class, method_names, register_method
from .dense import DenseMethod, SkipMethod
from .block_sparse import BlockSparseMethod, SlidingFramesMethod
from .svg import SVGMethod
from .svdit import SVDiTMethod
from .chipmunk import ChipmunkMethod

__all__ = [
    "AttentionMethod",
    "BlockSparseMethod",
    "ChipmunkMethod",
    "DenseMethod",
    "SVDiTMethod",
    "SVGMethod",
    "SkipMethod",
    "SlidingFramesMethod",
    "get_method_class",
    "method_names",
    "register_method",
]
