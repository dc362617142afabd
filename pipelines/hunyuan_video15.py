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
from .hunyuan_video import joint_attention

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
    """Routes one HunyuanVideo 1.5 attention layer: a dual-stream layer as HunyuanVideo's (the same projections,
    norms and RoPE as ``HunyuanVideo15AttnProcessor2_0``), with its padded text queries zeroed."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        call = None
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
        return joint_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                               lambda q, k, v: self.dispatcher.attend(q, k, v, call), text_valid=attention_mask.bool())
