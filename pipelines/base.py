"""What an adapter tells the toolkit about one model family, and nothing about methods.

An adapter knows: which attention modules of the transformer to take over
(in layer order), where each block's feed-forward is, where the text sits in
the attention sequence, how to read the latent grid and the timestep from the
transformer's inputs, and how the family's own processor computes q, k and v.  It never decides what attention
to run: its processor asks the dispatcher, and when the answer is "dense" it
hands the call to the model's original processor unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import torch

from vdit_sparse.context import AttentionCall
from vdit_sparse.geometry import TokenLayout

__all__ = [
    "PipelineAdapter", "Dispatcher", "FeedForwardSite", "RoutingProcessor", "bind_forward_inputs", "gelu_feed_forward_site",
]


class Dispatcher(Protocol):
    """The side of the toolkit a processor talks to (implemented in vdit_sparse.api)."""

    def route(
        self, layer_index: int, batch: int, heads: int, key_padding_mask: torch.Tensor | None, head_offset: int = 0
    ) -> AttentionCall | None:
        """The call to hand to :meth:`attend`, or None when the model's own processor should run it."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """q, k, v ``(B, H, S, D)`` -> ``(B, H, S, D)``."""


def bind_forward_inputs(forward, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name a forward call's arguments the way its signature does."""
    bound = inspect.signature(forward).bind_partial(*args, **kwargs)
    return dict(bound.arguments)


class RoutingProcessor:
    """Base of the adapters' processors: one per attention layer, holding the model's own processor.

    A subclass's ``__call__`` asks ``dispatcher.route`` first and hands the
    whole call to ``original`` when the answer is None, so dense calls run
    exactly the code they ran before.
    """

    #: Attributes diffusers sets on a model's processors that belong to the processor we hold:
    #: ``set_attention_backend`` after applying reaches the model's processor through us.
    _DELEGATED = frozenset({"_attention_backend"})

    def __init__(self, original: Any, layer_index: int, dispatcher: Dispatcher):
        self.original = original
        self.layer_index = layer_index
        self.dispatcher = dispatcher

    def __getattr__(self, name: str) -> Any:  # only called for attributes we do not have
        if name in RoutingProcessor._DELEGATED:
            return getattr(self.original, name)  # AttributeError when the model's processor has none either
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RoutingProcessor._DELEGATED:
            setattr(self.original, name, value)
        else:
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class FeedForwardSite:
    """One feed-forward of a transformer block: ``down(activation(up(x)))``.

    ``layer_index`` is the block's position in the adapter's layer order (the
    index of its attention layer).  ``stream`` is ``"joint"`` for a block over
    one sequence of text and video (CogVideoX, HunyuanVideo single-stream),
    ``"video"`` or ``"text"`` for HunyuanVideo's dual-stream ``ff`` and
    ``ff_context``.  ``module`` is the module whose forward is exactly this
    feed-forward, or None where the block inlines it (HunyuanVideo
    single-stream: ``proj_mlp``, ``act_mlp``, then one ``proj_out`` over the
    joined attention and MLP features); ``down_columns`` are then the input
    features of ``down`` the MLP feeds (None: all of them), the last ones.  ``gelu`` is the
    activation's ``approximate`` (``"tanh"`` or ``"none"``) when it is a GELU,
    which the MLP delta kernels compute themselves, else None.
    """

    layer_index: int
    stream: str
    up: torch.nn.Linear
    activation: Callable[[torch.Tensor], torch.Tensor]
    down: torch.nn.Linear
    module: torch.nn.Module | None = None
    down_columns: slice | None = None
    gelu: str | None = None

    def down_out(self, activation: torch.Tensor) -> torch.Tensor:
        """What the feed-forward adds for ``activation``: ``down(activation)``, or for an inlined site the MLP
        features' share of ``down`` (no bias: the bias belongs to the whole projection)."""
        if self.down_columns is None:
            return self.down(activation)
        return torch.nn.functional.linear(activation, self.down.weight[:, self.down_columns])

    def down_weight_t(self) -> torch.Tensor:
        """The weight of ``down`` over the MLP's features, transposed: ``(hidden units, output features)``."""
        weight = self.down.weight if self.down_columns is None else self.down.weight[:, self.down_columns]
        return weight.t().contiguous()


def gelu_feed_forward_site(layer_index: int, stream: str, feed_forward: torch.nn.Module) -> FeedForwardSite:
    """The site of a diffusers ``FeedForward`` with a GELU (``net = [GELU(proj), Dropout, Linear, ...]``)."""
    act = feed_forward.net[0]
    return FeedForwardSite(layer_index, stream, act.proj, act.gelu, feed_forward.net[2], module=feed_forward,
                           gelu=act.approximate)


class PipelineAdapter:
    """Base of the per-family adapters; subclasses fill in the class attributes and methods."""

    family: ClassVar[str]
    pipeline_class_names: ClassVar[tuple[str, ...]]
    transformer_class_names: ClassVar[tuple[str, ...]]

    def transformers(self, pipe: Any) -> list[torch.nn.Module]:
        """The pipeline's transformers a handle takes over, in layer order (Wan 2.2 has two experts)."""
        return [pipe.transformer]

    def attention_modules(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The self-attention modules of one transformer to take over, in its layer order."""
        raise NotImplementedError

    def attention_layers(self, pipe: Any) -> list[torch.nn.Module]:
        """The self-attention modules of all the pipeline's transformers: list index = layer index."""
        return [module for transformer in self.transformers(pipe) for module in self.attention_modules(transformer)]

    def feed_forward_sites(self, transformer: torch.nn.Module) -> list[FeedForwardSite]:
        """Every block's feed-forward of one transformer, in its layer order (a block may have two: video and
        text)."""
        raise NotImplementedError

    def all_feed_forward_sites(self, pipe: Any) -> list[FeedForwardSite]:
        """The feed-forward sites of all the pipeline's transformers, with layer indices as
        :meth:`attention_layers` numbers them."""
        sites, offset = [], 0
        for transformer in self.transformers(pipe):
            sites += [dataclasses.replace(site, layer_index=site.layer_index + offset)
                      for site in self.feed_forward_sites(transformer)]
            offset += len(self.attention_modules(transformer))
        return sites

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer block that holds each attention module, in layer order.

        Blocks are the entries of the transformer's top-level module lists
        (``transformer_blocks``, ``single_transformer_blocks``, ...), which it
        runs one after another in layer order.
        """
        owner: dict[int, torch.nn.Module] = {}
        for child in transformer.children():
            if isinstance(child, torch.nn.ModuleList):
                for block in child:
                    owner.update((id(module), block) for module in block.modules())
        modules = self.attention_modules(transformer)
        missing = [i for i, module in enumerate(modules) if id(module) not in owner]
        if missing:
            raise RuntimeError(f"{type(transformer).__name__}: attention layers {missing} sit in no top-level block list")
        return [owner[id(module)] for module in modules]

    def step_cache_refusal(self, transformer: torch.nn.Module) -> str | None:
        """Why the profile's step caching cannot run on this transformer, or None when it can."""
        return None

    def block_passthrough(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """What ``block`` returns when it changes nothing: the streams it received, in its output's form.

        Step caching returns this from every block but the first on a skipped
        step.  The blocks of CogVideoX and HunyuanVideo take and return
        ``(hidden_states, encoder_hidden_states)``.
        """
        inputs = inspect.signature(type(block).forward).bind(block, *args, **kwargs).arguments
        return inputs["hidden_states"], inputs["encoder_hidden_states"]

    def num_heads(self, transformer: torch.nn.Module) -> int:
        return self.attention_modules(transformer)[0].heads

    def layers_and_heads(self, pipe: Any) -> tuple[int, int]:
        """What a profile's ``model.num_layers`` and ``model.num_heads`` describe: the attention layers of all the
        pipeline's transformers, and the heads of one layer."""
        return len(self.attention_layers(pipe)), self.num_heads(self.transformers(pipe)[0])

    def token_layout(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        """The attention sequence's layout for one forward, read from that forward's inputs."""
        raise NotImplementedError

    def timestep(self, inputs: dict[str, Any]) -> torch.Tensor:
        return inputs["timestep"]

    def make_processor(self, original: Any, layer_index: int, dispatcher: Dispatcher) -> Any:
        raise NotImplementedError

    def default_profile(self, pipe: Any) -> str:
        """The built-in profile for this pipeline's model (what the command line uses when no profile is given)."""
        raise NotImplementedError

    def decode_latents(self, pipe: Any, latents: torch.Tensor, call_args: dict[str, Any]) -> torch.Tensor:
        """The pipeline's final latents (``output_type="latent"``) -> the VAE's video tensor, as the pipeline decodes them."""
        raise NotImplementedError
