"""CogVideoX (2B, 5B, 1.5): text is a prefix of the attention sequence.

``CogVideoXAttnProcessor2_0`` joins ``[text | video]``, projects q, k, v in
``(B, H, S, D)``, applies RoPE to the video part only (5B and 1.5; 2B uses
sincos positions added before the blocks) and calls
``F.scaled_dot_product_attention`` directly, so attention backends never
reach it: the processor below replaces it, computing q, k, v the same way.
"""

from __future__ import annotations

import torch

from vdit_sparse.geometry import LatentGrid, TokenLayout

from .base import PipelineAdapter, RoutingProcessor, gelu_feed_forward_site

__all__ = ["CogVideoXAdapter", "attention_inputs"]


class CogVideoXAdapter(PipelineAdapter):
    family = "cogvideox"
    pipeline_class_names = (
        "CogVideoXPipeline",
        "CogVideoXImageToVideoPipeline",
        "CogVideoXVideoToVideoPipeline",
    )
    transformer_class_names = ("CogVideoXTransformer3DModel",)

    def attention_modules(self, transformer):
        return [block.attn1 for block in transformer.transformer_blocks]

    def feed_forward_sites(self, transformer):
        return [gelu_feed_forward_site(i, "joint", block.ff) for i, block in enumerate(transformer.transformer_blocks)]

    def token_layout(self, transformer, inputs):
        # hidden_states: (B, F, C, H, W) latents; patches of p x p pixels and, on 1.5, p_t frames.
        _, frames, _, height, width = inputs["hidden_states"].shape
        p = transformer.config.patch_size
        p_t = transformer.config.patch_size_t or 1
        grid = LatentGrid(frames // p_t, height // p, width // p)
        text_length = inputs["encoder_hidden_states"].shape[1]
        return TokenLayout(grid, text_length, "prefix")

    def make_processor(self, original, layer_index, dispatcher):
        return CogVideoXSparseProcessor(original, layer_index, dispatcher)

    def default_profile(self, pipe):
        config = pipe.transformer.config
        if config.patch_size_t is not None:
            return "cogvideox1.5-5b"
        return "cogvideox-5b" if config.use_rotary_positional_embeddings else "cogvideox-2b"

    def decode_latents(self, pipe, latents, call_args):
        # CogVideoX 1.5 pads the latent frames to a multiple of patch_size_t and drops the padding before decoding.
        patch_size_t = pipe.transformer.config.patch_size_t
        num_frames = call_args.get("num_frames", 49)  # the pipelines' default
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        padding = 0 if patch_size_t is None else (-latent_frames) % patch_size_t
        return pipe.decode_latents(latents[:, padding:])


def attention_inputs(
    attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_rotary_emb=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, H, S, D)`` of a CogVideoX ``attn1`` over ``[text | video]``, as its own processor computes them.

    The one CogVideoX q/k/v path of the package: the routing processor below
    and the reference-model diagnostics (scripts/) both use it.  Honours QKV
    fusion (``pipe.fuse_qkv_projections()``), the per-head norms and RoPE on
    the video part (5B and 1.5; 2B has no rotary embedding).
    """
    batch, text_length = hidden_states.shape[0], encoder_hidden_states.size(1)
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        query[:, :, text_length:] = apply_rotary_emb(query[:, :, text_length:], image_rotary_emb)
        if not attn.is_cross_attention:
            key[:, :, text_length:] = apply_rotary_emb(key[:, :, text_length:], image_rotary_emb)
    return query, key, value


class CogVideoXSparseProcessor(RoutingProcessor):
    """Routes one CogVideoX attention layer: the original processor when dense, else q, k, v to the dispatcher."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = hidden_states.shape[0]
        call = None
        if attention_mask is None:  # CogVideoX never passes one; if someone does, stay exact and dense
            call = self.dispatcher.route(self.layer_index, batch, attn.heads, None)
        if call is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        text_length = encoder_hidden_states.size(1)
        query, key, value = attention_inputs(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self.dispatcher.attend(query, key, value, call)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, video_out = out.split([text_length, out.size(1) - text_length], dim=1)
        return video_out, encoder_out
