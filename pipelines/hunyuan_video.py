"""HunyuanVideo: text is a suffix of the attention sequence, padded text is masked.

The transformer has dual-stream blocks (``transformer_blocks``: video and text
projected separately, then joined ``[video | text]``) and single-stream blocks
(``single_transformer_blocks``: one projection over the joined sequence).
Layer indices run over the dual-stream blocks first, then the single-stream
ones.  The attention mask the blocks receive is ``(B, 1, 1, S)`` bool, True
for real tokens: it only masks padded text keys, so it becomes our
key-padding mask.  The token refiner's text-only attention is not touched.
Image-to-video (HunyuanVideo-I2V) replaces latent frame 0 by the image's
latents or concatenates them on channels: the sequence is the same (its
token-replacement blocks keep the same attention and MLP modules).
"""

from __future__ import annotations

import torch

from vdit_sparse.geometry import LatentGrid, TokenLayout

from .base import FeedForwardSite, PipelineAdapter, RoutingProcessor, gelu_feed_forward_site

__all__ = ["HunyuanVideoAdapter", "joint_attention"]


class HunyuanVideoAdapter(PipelineAdapter):
    family = "hunyuan-video"
    pipeline_class_names = ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline")
    transformer_class_names = ("HunyuanVideoTransformer3DModel",)

    def attention_modules(self, transformer):
        dual = [block.attn for block in transformer.transformer_blocks]
        single = [block.attn for block in transformer.single_transformer_blocks]
        return dual + single

    def feed_forward_sites(self, transformer):
        sites = []
        for i, block in enumerate(transformer.transformer_blocks):
            sites += [gelu_feed_forward_site(i, "video", block.ff), gelu_feed_forward_site(i, "text", block.ff_context)]
        first_single = len(transformer.transformer_blocks)
        for i, block in enumerate(transformer.single_transformer_blocks, start=first_single):
            # proj_out maps [attention | mlp] features; the MLP's are the last mlp_dim columns.
            mlp_dim = block.proj_mlp.out_features
            columns = slice(block.proj_out.in_features - mlp_dim, block.proj_out.in_features)
            gelu = block.act_mlp.approximate if isinstance(block.act_mlp, torch.nn.GELU) else None
            sites.append(FeedForwardSite(i, "joint", block.proj_mlp, block.act_mlp, block.proj_out, None, columns, gelu))
        return sites

    def token_layout(self, transformer, inputs):
        # hidden_states: (B, C, F, H, W) latents.
        _, _, frames, height, width = inputs["hidden_states"].shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        grid = LatentGrid(frames // p_t, height // p, width // p)
        text_length = inputs["encoder_hidden_states"].shape[1]
        return TokenLayout(grid, text_length, "suffix")

    def make_processor(self, original, layer_index, dispatcher):
        return HunyuanVideoSparseProcessor(original, layer_index, dispatcher)

    def default_profile(self, pipe):
        return "hunyuan-video"

    def decode_latents(self, pipe, latents, call_args):
        scaled = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        return pipe.vae.decode(scaled, return_dict=False)[0]


def _key_padding_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """(B, 1, 1, S) bool -> (B, S); None when it masks nothing we can express as key padding."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.ndim != 4 or attention_mask.shape[1:3] != (1, 1):
        raise ValueError(
            "HunyuanVideo attention mask: expected a (B, 1, 1, S) bool key-padding mask, got "
            f"dtype {attention_mask.dtype} and shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.shape[-1] != seq_len:
        raise ValueError(f"HunyuanVideo attention mask covers {attention_mask.shape[-1]} tokens, the sequence has {seq_len}")
    return attention_mask[:, 0, 0, :]


class HunyuanVideoSparseProcessor(RoutingProcessor):
    """Routes one HunyuanVideo attention layer (dual- or single-stream)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        call = None
        if encoder_hidden_states is not None:
            seq_len = hidden_states.shape[1] + encoder_hidden_states.shape[1]
            padding = _key_padding_mask(attention_mask, seq_len)
            call = self.dispatcher.route(self.layer_index, hidden_states.shape[0], attn.heads, padding)
        if call is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        return joint_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                               lambda q, k, v: self.dispatcher.attend(q, k, v, call))


def _heads_qkv(attn, x, projections, norm_q, norm_k):
    """q, k, v ``(B, S, H, D)`` of ``x`` through one stream's three projections and its q/k norms (if any)."""
    query, key, value = (projection(x).unflatten(2, (attn.heads, -1)) for projection in projections)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def joint_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb, attend, text_valid=None):
    """(video output, text output) of one HunyuanVideo (or 1.5) attention over ``[video | text]`` with ``attend``
    (q, k, v ``(B, H, S, D)`` -> output) in place of SDPA; q, k, v as the model's processors compute them.

    A single-stream block (``attn.add_q_proj`` None) projects the joined
    sequence once and rotates its video part; a dual-stream block projects
    video and text apart.  ``text_valid`` ``(B, N_text)``, when given, zeroes
    the outputs of padded text queries (rows the model's mask leaves without
    keys) before the output projection.
    """
    from diffusers.models.embeddings import apply_rotary_emb

    text_length = encoder_hidden_states.shape[1]
    single_stream = attn.add_q_proj is None
    if single_stream:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    query, key, value = _heads_qkv(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)
    if image_rotary_emb is not None:
        if single_stream:  # RoPE on the video part only

            def rotate_video(x):
                video = apply_rotary_emb(x[:, :-text_length], image_rotary_emb, sequence_dim=1)
                return torch.cat([video, x[:, -text_length:]], dim=1)

            query, key = rotate_video(query), rotate_video(key)
        else:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    if not single_stream:
        text_projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        text_q, text_k, text_v = _heads_qkv(attn, encoder_hidden_states, text_projections, attn.norm_added_q,
                                            attn.norm_added_k)
        query = torch.cat([query, text_q], dim=1)
        key = torch.cat([key, text_k], dim=1)
        value = torch.cat([value, text_v], dim=1)

    # (B, S, H, D) -> (B, H, S, D) views for the methods, and back.
    out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
    video_out, text_out = out[:, :-text_length], out[:, -text_length:]
    if text_valid is not None:
        text_out = text_out * text_valid[:, :, None]
    if getattr(attn, "to_out", None) is not None:
        video_out = attn.to_out[1](attn.to_out[0](video_out))
    if getattr(attn, "to_add_out", None) is not None:
        text_out = attn.to_add_out(text_out)
    return video_out, text_out
