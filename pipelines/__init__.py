"""One adapter per model family; :func:`find_adapter` picks the one for a pipeline."""

from __future__ import annotations

from .base import PipelineAdapter
from .cogvideox import CogVideoXAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .hunyuan_video15 import HunyuanVideo15Adapter
from .wan import WanAdapter

__all__ = [
    "PipelineAdapter", "CogVideoXAdapter", "HunyuanVideoAdapter", "HunyuanVideo15Adapter", "WanAdapter", "ADAPTERS",
    "find_adapter",
]

ADAPTERS: tuple[PipelineAdapter, ...] = (CogVideoXAdapter(), HunyuanVideoAdapter(), HunyuanVideo15Adapter(), WanAdapter())


def find_adapter(pipe) -> PipelineAdapter:
    """The adapter for ``pipe``, chosen by its pipeline and transformer classes."""
    pipeline_name = type(pipe).__name__
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:  # a Wan 2.2 pipeline may hold only its second expert
        transformer = getattr(pipe, "transformer_2", None)
    transformer_name = type(transformer).__name__
    for adapter in ADAPTERS:
        if pipeline_name in adapter.pipeline_class_names or transformer_name in adapter.transformer_class_names:
            if transformer_name not in adapter.transformer_class_names:
                raise TypeError(
                    f"{pipeline_name} holds a transformer of class {transformer_name}; "
                    f"vdit-sparse supports {', '.join(adapter.transformer_class_names)} for this pipeline"
                )
            return adapter
    supported = sorted(name for adapter in ADAPTERS for name in adapter.pipeline_class_names)
    raise TypeError(f"unsupported pipeline {pipeline_name} (transformer {transformer_name}); supported: {', '.join(supported)}")
