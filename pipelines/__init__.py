"""One adapter per model family; :func:`find_adapter` picks the one for a pipeline."""

from __future__ import annotations

from .base import PipelineAdapter
from .cogvideox import CogVideoXAdapter
from .hunyuan_video import HunyuanVideoAdapter

__all__ = ["PipelineAdapter", "CogVideoXAdapter", "HunyuanVideoAdapter", "ADAPTERS", "find_adapter"]

ADAPTERS: tuple[PipelineAdapter, ...] = (CogVideoXAdapter(), HunyuanVideoAdapter())


def find_adapter(pipe) -> PipelineAdapter:
    """The adapter for ``pipe``, chosen by its pipeline and transformer classes."""
    pipeline_name = type(pipe).__name__
    transformer = getattr(pipe, "transformer", None)
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
