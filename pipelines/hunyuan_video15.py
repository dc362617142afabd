"""HunyuanVideo 1.5: dual-stream blocks over ``[video | conditions]``, padded conditions masked.

Every block of ``HunyuanVideo15Transformer3DModel`` is dual-stream: the video
and the conditions are projected separately and joined ``[video | text]``
in one attention.  The transformer joins three conditions into that text
span before the blocks, each as long as its input: the image embedding
tokens (``image_embeds``; zeros and masked out for text-to-video), the ByT5
tokens (``encoder_hidden_states_2``) and the multimodal LLM tokens
(``encoder_hidden_states``), real tokens first, padding last.  The mask the
blocks receive is ``(B, N_text)``, True for real tokens: it becomes our
key-padding mask.  The model masks padded text queries too (their rows see
no key); here those rows output zeros, which nothing real ever reads.
Image-to-video also concatenates the image latents on channels, which
changes nothing in the sequence.
"""

from __future__ import annotations

import torch

from vdit_sparse.geometry import LatentGrid, TokenLayout

from .base import PipelineAdapter, RoutingProcessor, gelu_feed_forward_site

__all__ = ["HunyuanVideo15Adapter"]


class HunyuanVideo15Adapter(PipelineAdapter):
    family = "hunyuan-video-1.5"
    pipeline_class_names = ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")
    transformer_class_names = ("HunyuanVideo15Transformer3DModel",)

    def attention_modules(self, transformer):
        return [block.attn for block in transformer.transformer_blocks]

    def feed_forward_sites(self, transformer):
        sites = []
        for i, block in enumerate(transformer.transformer_blocks):
            sites += [gelu_feed_forward_site(i, "video", block.ff), gelu_feed_forward_site(i, "text", block.ff_context)]
        return sites

    def token_layout(self, transformer, inputs):
        # hidden_states: (B, C, F, H, W) latents.
        _, _, frames, height, width = inputs["hidden_states"].shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        grid = LatentGrid(frames // p_t, height // p, width // p)
        text_length = sum(inputs[name].shape[1] for name in ("encoder_hidden_states", "encoder_hidden_states_2",
                                                               "image_embeds") if inputs.get(name) is not None)
        return TokenLayout(grid, text_length, "suffix")

    def make_processor(self, original, layer_index, dispatcher):
        return HunyuanVideo15SparseProcessor(original, layer_index, dispatcher)

    def default_profile(self, pipe):
        return "hunyuan-video-1.5"

    def decode_latents(self, pipe, latents, call_args):
        scaled = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        return pipe.vae.decode(scaled, return_dict=False)[0]


class HunyuanVideo15SparseProcessor(RoutingProcessor):
    """Routes one HunyuanVideo 1.5 attention layer; q, k, v as ``HunyuanVideo15AttnProcessor2_0`` computes them."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        call = padding = None
        if encoder_hidden_states is not None and attention_mask is not None:
            text_length = encoder_hidden_states.shape[1]
            if attention_mask.shape != (hidden_states.shape[0], text_length):
                raise ValueError(f"HunyuanVideo 1.5 attention mask: expected ({hidden_states.shape[0]}, {text_length}) "
                                 f"for the text tokens, got {tuple(attention_mask.shape)}")
            video = attention_mask.new_ones(hidden_states.shape[0], hidden_states.shape[1])
            padding = torch.cat([video, attention_mask], dim=1).bool()
            call = self.dispatcher.route(self.layer_index, hidden_states.shape[0], attn.heads, padding)
        if call is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(2, (attn.heads, -1))

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_q = heads(attn.add_q_proj(encoder_hidden_states))
        text_k = heads(attn.add_k_proj(encoder_hidden_states))
        text_v = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((query, text_q), (key, text_k), (value, text_v)))

        # (B, S, H, D) -> (B, H, S, D) views for the methods, and back.
        out = self.dispatcher.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), call)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        video_out, text_out = out[:, :-text_length], out[:, -text_length:]
        text_out = text_out * padding[:, -text_length:, None]  # padded text queries: zeros, as rows seeing no key
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out
