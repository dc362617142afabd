"""Wan 2.1 and 2.2: self-attention over video tokens only, text in cross-attention.

Each ``WanTransformerBlock`` has ``attn1`` (self-attention over the video
tokens, with Wan's interleaved RoPE), ``attn2`` (cross-attention to the text
and, for Wan 2.1 image-to-video, the CLIP image tokens: left to the model) and
``ffn``.  The self-attention sequence is the latent grid and nothing else, so
the token layout has no text; image-to-video conditions on channels (the
image latents and mask concatenated to the noisy latents), which changes
nothing in the sequence.

``WanVACEPipeline``'s transformer adds a control branch (``vace_blocks``, its
own self-attention over the control tokens, whose hints are added to the main
stream after some blocks): the main blocks' ``attn1`` are taken over, the
control branch runs as the model runs it, and step caching is refused.

Wan 2.2 A14B pipelines hold two experts, ``transformer`` (high noise) and
``transformer_2`` (low noise), switched at ``boundary_ratio``: one handle
takes both.  Layers are numbered over ``transformer`` first, then
``transformer_2`` (40 + 40 for A14B), so a profile names an expert's layers
by that offset.
"""

from __future__ import annotations

import torch

from vdit_sparse.geometry import LatentGrid, TokenLayout

from .base import PipelineAdapter, RoutingProcessor, gelu_feed_forward_site

__all__ = ["WanAdapter"]


class WanAdapter(PipelineAdapter):
    family = "wan"
    pipeline_class_names = ("WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline")
    transformer_class_names = ("WanTransformer3DModel", "WanVACETransformer3DModel")

    def transformers(self, pipe):
        return [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None]

    def attention_modules(self, transformer):
        return [block.attn1 for block in transformer.blocks]

    def feed_forward_sites(self, transformer):
        return [gelu_feed_forward_site(i, "video", block.ffn) for i, block in enumerate(transformer.blocks)]

    def step_cache_refusal(self, transformer):
        if hasattr(transformer, "vace_blocks"):
            return ("Wan VACE adds its control hints to the hidden states between blocks, so a skipped step would "
                    "add them again to the reused output")
        return None

    def block_passthrough(self, block, args, kwargs):
        return args[0] if args else kwargs["hidden_states"]  # a Wan block returns its hidden states only

    def token_layout(self, transformer, inputs):
        # hidden_states: (B, C, F, H, W) latents, patches of (p_t, p_h, p_w).
        _, _, frames, height, width = inputs["hidden_states"].shape
        p_t, p_h, p_w = transformer.config.patch_size
        return TokenLayout(LatentGrid(frames // p_t, height // p_h, width // p_w), 0, "suffix")

    def make_processor(self, original, layer_index, dispatcher):
        return WanSparseProcessor(original, layer_index, dispatcher)

    def default_profile(self, pipe):
        experts = self.transformers(pipe)
        if len(experts) > 1:
            return "wan2.2-a14b"
        return "wan2.1-1.3b" if experts[0].config.num_layers <= 30 else "wan2.1-14b"

    def decode_latents(self, pipe, latents, call_args):
        config = pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, pipe.vae.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, pipe.vae.dtype)
        return pipe.vae.decode(latents.to(pipe.vae.dtype) * std + mean, return_dict=False)[0]


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of ``x`` ``(B, S, H, D)``: each pair ``(x[2i], x[2i+1])`` turned by its angle
    (``cos`` and ``sin`` repeat each angle's value over the pair, as ``WanRotaryPosEmbed`` returns them)."""
    first, second = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([first * c - second * s, first * s + second * c], dim=-1).flatten(-2).type_as(x)


class WanSparseProcessor(RoutingProcessor):
    """Routes one Wan self-attention layer (``attn1``); q, k, v as ``WanAttnProcessor`` computes them."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        call = None
        if encoder_hidden_states is None and attention_mask is None:
            call = self.dispatcher.route(self.layer_index, hidden_states.shape[0], attn.heads, None)
        if call is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)  # honours fused projections
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS norms across heads
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = rotate_pairs(query, *rotary_emb), rotate_pairs(key, *rotary_emb)
        out = self.dispatcher.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), call)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
