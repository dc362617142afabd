"""Small diffusers pipelines built from config, fully offline.

No model hub is reachable where this package is tested, so it builds its own
video pipelines: the real diffusers classes (``CogVideoXPipeline``,
``HunyuanVideoPipeline``) wired to tiny, randomly initialised modules and to
tokenizers built locally with the ``tokenizers`` library. Every weight is a
pure function of ``seed``: two builds with the same seed give bit-identical
videos. They exercise the same code paths as the real checkpoints (patch
embedding, RoPE or sin-cos positions, CFG batching, key-padding masks, VAE
frame arithmetic) at a few hundred tokens, so tests and the demo run on a CPU.

Example::

    from vdit_sparse.embedded import DEMO_CALL_ARGS, build_embedded_pipeline

    pipe = build_embedded_pipeline("cogvideox", variant="5b", seed=0)
    video = pipe("a red ball moves left", **DEMO_CALL_ARGS["cogvideox"],
                 generator=torch.Generator().manual_seed(0)).frames[0]

Geometry of the embedded models (the real ones differ on purpose where a
hard-coded real constant would otherwise go unnoticed in tests):

============== ========= ========== ============ ========== =====================
family         VAE space VAE time   patch (t,h,w) text       text position
============== ========= ========== ============ ========== =====================
cogvideox      2x        2x         (1, 2, 2)    16 tokens  prefix [text | video]
cogvideox-1.5  2x        2x         (2, 2, 2)    16 tokens  prefix [text | video]
hunyuan-video  2x        4x         (1, 2, 2)    16 tokens  suffix [video | text]
hunyuan-v-1.5  4x        4x         (1, 1, 1)    33 tokens  suffix [video | conditions]
wan            2x        2x         (1, 2, 2)    16 tokens  none (cross-attention)
============== ========= ========== ============ ========== =====================

HunyuanVideo's ``"i2v"`` is a ``HunyuanVideoImageToVideoPipeline`` as
HunyuanVideo-I2V: the image latents replace latent frame 0 (token
replacement; the sequence is unchanged), a tiny Llava encodes the prompt
with the image's 16 tokens (its template is passed by
:func:`demo_call_args`), one transformer call a step (embedded guidance).

HunyuanVideo 1.5 (``"t2v"``, ``"i2v"``) joins three conditions after the
video: 9 image tokens (zeros and masked for text-to-video), 8 ByT5 tokens and
16 multimodal-LLM tokens, padding last and masked.  Its pipelines take no
``max_sequence_length`` or ``guidance_scale``: the text lengths are pipeline
attributes set by the builder, the CFG scale is the guider's.

Wan comes as ``"2.1"`` and ``"2.2"`` (``WanPipeline``; 2.2 with its two
experts ``transformer`` and ``transformer_2`` switched at ``boundary_ratio``,
both called in the 4 demo steps) and as ``"2.1-i2v"`` and ``"2.2-i2v"``
(``WanImageToVideoPipeline``; 2.1 with a CLIP image encoder whose 5 tokens go
to cross-attention, 2.2 without one, two experts).  Image-to-video conditions
on channels (the transformer takes 10 channels instead of 4) and needs
``num_frames = 4 * k + 1`` (the Wan VAE encodes frames in chunks of 4).
``"2.1-vace"`` is a ``WanVACEPipeline`` whose control branch is one VACE
block (its hint joins after block 0); called without a control video it
conditions on an empty one, as the real pipeline does.

The text length is the ``max_sequence_length`` call argument (both pipelines
pad the prompt to it); :data:`EMBEDDED_TEXT_LEN` is the value
:data:`DEMO_CALL_ARGS` passes. CogVideoX "2b" (sin-cos positions) *requires*
it: its position table is sized for exactly that many text tokens, as the real
2B's is for 226. HunyuanVideo masks padded text keys with a ``[B, 1, 1, N]``
key-padding mask; CogVideoX attends to padded T5 tokens, as the real model does.

Frame counts: the CogVideoX VAE decodes latent frames in pairs after the first,
so ``num_frames`` should give an odd number of latent frames
(``num_frames = 2 * k + 1`` here, ``4 * k + 1`` for the real model); HunyuanVideo
takes ``num_frames = 4 * k + 1``. HunyuanVideo needs height and width divisible
by 16, CogVideoX by 8 (both pipelines check).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch

__all__ = [
    "DEMO_CALL_ARGS",
    "EMBEDDED_FAMILIES",
    "EMBEDDED_MODEL_IDS",
    "REFERENCE_MODEL_ID",
    "call_args_for",
    "demo_call_args",
    "demo_image",
    "EMBEDDED_TEXT_LEN",
    "build_embedded_pipeline",
    "build_tokenizer",
    "load_pipeline",
]

EMBEDDED_TEXT_LEN = 16
"""Text tokens the embedded transformers see at :data:`DEMO_CALL_ARGS`."""

EMBEDDED_FAMILIES: dict[str, tuple[str, ...]] = {
    # family -> variants; the first is the default
    "cogvideox": ("5b", "2b", "1.5", "5b-i2v"),
    "hunyuan-video": ("t2v", "i2v"),
    "hunyuan-video-1.5": ("t2v", "i2v"),
    "wan": ("2.1", "2.2", "2.1-i2v", "2.2-i2v", "2.1-vace"),
}

EMBEDDED_MODEL_IDS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "embedded:cogvideox": ("cogvideox", "5b"),
        "embedded:cogvideox-5b": ("cogvideox", "5b"),
        "embedded:cogvideox-2b": ("cogvideox", "2b"),
        "embedded:cogvideox-1.5": ("cogvideox", "1.5"),
        "embedded:cogvideox-5b-i2v": ("cogvideox", "5b-i2v"),
        "embedded:hunyuan-video": ("hunyuan-video", "t2v"),
        "embedded:hunyuan-video-i2v": ("hunyuan-video", "i2v"),
        "embedded:hunyuan-video-1.5": ("hunyuan-video-1.5", "t2v"),
        "embedded:hunyuan-video-1.5-i2v": ("hunyuan-video-1.5", "i2v"),
        "embedded:wan2.1": ("wan", "2.1"),
        "embedded:wan2.2": ("wan", "2.2"),
        "embedded:wan2.1-i2v": ("wan", "2.1-i2v"),
        "embedded:wan2.2-i2v": ("wan", "2.2-i2v"),
        "embedded:wan2.1-vace": ("wan", "2.1-vace"),
    }
)
"""Model names :func:`load_pipeline` resolves to an embedded pipeline: name -> (family, variant)."""

DEMO_CALL_ARGS: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {
        # 5 latent frames of 8 x 8 tokens (1.5: 3 temporal patches after padding to 6 latent frames)
        "cogvideox": MappingProxyType(
            {
                "height": 32,
                "width": 32,
                "num_frames": 9,
                "num_inference_steps": 4,
                "guidance_scale": 6.0,
                "max_sequence_length": EMBEDDED_TEXT_LEN,
            }
        ),
        # 5 latent frames of 8 x 8 tokens
        "hunyuan-video": MappingProxyType(
            {
                "height": 32,
                "width": 32,
                "num_frames": 17,
                "num_inference_steps": 4,
                "guidance_scale": 6.0,
                "max_sequence_length": EMBEDDED_TEXT_LEN,
            }
        ),
        # 5 latent frames of 8 x 8 tokens; the CFG scale (6) is the guider's, no call argument
        "hunyuan-video-1.5": MappingProxyType({"height": 32, "width": 32, "num_frames": 17, "num_inference_steps": 4}),
        # 5 latent frames of 8 x 8 tokens; guidance > 1: a conditional and an unconditional call each step
        "wan": MappingProxyType(
            {
                "height": 32,
                "width": 32,
                "num_frames": 9,
                "num_inference_steps": 4,
                "guidance_scale": 5.0,
                "max_sequence_length": EMBEDDED_TEXT_LEN,
            }
        ),
    }
)
"""Recommended ``pipe(...)`` keyword arguments per family (pass a prompt and a generator too; the image-to-video
variants take more: :func:`demo_call_args`)."""


def demo_call_args(family: str, variant: str | None = None) -> dict:
    """:data:`DEMO_CALL_ARGS` of ``family`` with what ``variant`` needs besides: the image-to-video variants an
    ``image`` (:func:`demo_image`), and Wan 2.1's image-to-video 512 text tokens (its attention processor splits
    the image tokens from the text by that hard-coded length); HunyuanVideo 1.5's image-to-video takes no height
    or width."""
    args = dict(DEMO_CALL_ARGS[family])
    if variant is not None and variant.endswith("i2v"):
        args["image"] = demo_image(args["height"])
        if (family, variant) == ("wan", "2.1-i2v"):
            args["max_sequence_length"] = _WAN_I2V_TEXT_LEN
        if family == "hunyuan-video-1.5":  # its size is the resolution bucket of the image: no height or width
            del args["height"], args["width"]
        if family == "hunyuan-video":  # Llava's template, sized for the tiny vision tower's 16 image tokens
            args["prompt_template"] = _hvi2v_prompt_template()
    return args

# Words a simple video prompt uses, plus the words of HunyuanVideo's default
# prompt template, so that neither turns into a run of <unk>. Treat the list as
# frozen: it fixes token ids and the vocabulary size, hence the text encoders'
# random weights, hence every embedded video and any transformer trained on them.
_WORDS = """
a an the this that it its is are be and or with without of in on at to from into onto over under
above below behind between through across around along toward towards near far by for as while
then while one two three four five many some several few
red orange yellow green blue purple violet pink white black gray grey brown gold silver dark
bright light pale colorful colourful striped spotted transparent shiny
circle circles square squares triangle triangles rectangle star stars dot dots line lines ball
balls box boxes cube cubes sphere disk ring shape shapes object objects block blocks blob
small large big tiny huge little long short tall wide thin thick round flat
move moves moving moved slide slides sliding roll rolls rolling bounce bounces bouncing spin spins
spinning rotate rotates rotating fall falls falling rise rises rising fly flies flying float floats
floating drift drifts drifting grow grows growing shrink shrinks shrinking pulse pulses pulsing
walk walks walking run runs running jump jumps jumping swim swims swimming zoom zooms zooming
pan pans panning orbit orbits follow follows tracking static still
left right up down forward backward back front top bottom center centre middle side edge corner
slowly quickly fast slow smooth smoothly steady gently
background foreground scene sky sea ocean water wave waves river lake beach sand grass field
forest tree trees mountain mountains hill road street city building house room wall floor table
cloud clouds sun moon night day sunset sunrise snow rain fire smoke light lights shadow shadows
cat dog bird fish horse car boat plane train person man woman child people
camera shot view close closeup wide aerial video frame image picture photo scene animation
texture noise pattern gradient checkerboard grid
describe detailing following aspects main content theme color shape size quantity text spatial
relationships actions events behaviors temporal physical movement changes environment style
atmosphere angles movements transitions used system user
""".split()
_PUNCTUATION = [".", ",", ":", ";", "!", "?", "-", "'", '"', "(", ")", "/"]
_DIGITS = [str(d) for d in range(10)]


def _vocabulary(special_tokens: list[str], extra_tokens: list[str] = ()) -> dict[str, int]:
    """Special tokens first (ids 0..), then the fixed word list; order is part of the model."""
    tokens = list(special_tokens) + list(extra_tokens) + _DIGITS + _PUNCTUATION
    seen = set(tokens)
    for word in _WORDS:
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(kind: str):
    """A WordLevel tokenizer standing in for T5's, Llama 3's or CLIP's.

    ``kind`` is ``"t5"``, ``"llama"`` or ``"clip"``. Text is lowercased and
    split into words and single punctuation marks; unknown words map to the
    unk token. The special tokens follow the real tokenizer:

    - ``"t5"``: ``<pad>`` = 0, ``</s>`` = 1 appended, ``<unk>`` = 2 (as T5).
    - ``"llama"``: ``<|begin_of_text|>`` prepended; the chat-template tokens
      (``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``) are atomic;
      ``"\\n\\n"`` is a token and a space before a digit is its own token, as in
      Llama 3's byte-level BPE. With these rules HunyuanVideo's default prompt
      template tokenizes to exactly its ``crop_start`` of 95 tokens before the
      prompt, so the pipeline's crop leaves the prompt and the closing
      ``<|eot_id|>``, as with the real tokenizer.
    - ``"clip"``: ``<|startoftext|>`` ... ``<|endoftext|>``, padded with
      ``<|endoftext|>`` (CLIPTextModel pools at the first end-of-text token).

    Padding is on the right, so a padded batch's attention mask is ones, then zeros.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = r"\w+|[^\w\s]"
    if kind == "t5":
        vocab = _vocabulary(["<pad>", "</s>", "<unk>"])
        specials = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
        template = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
        pattern = words
        atomic = []
    elif kind == "llama":
        atomic = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        vocab = _vocabulary(["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<unk>", *atomic], ["\n\n", " "])
        specials = dict(
            bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<pad>", unk_token="<unk>"
        )
        bos_id = vocab["<|begin_of_text|>"]
        template = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
        pattern = words + r"|\n+| (?=\d)"
    elif kind == "clip":
        vocab = _vocabulary(["<|startoftext|>", "<|endoftext|>", "<unk>"])
        specials = dict(
            bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"
        )
        template = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            pair="<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
            special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
        )
        pattern = words
        atomic = []
    else:
        raise ValueError(f"build_tokenizer: unknown kind {kind!r}; expected 't5', 'llama' or 'clip'")

    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    # invert=True keeps the pattern's matches as the pieces and drops everything else (whitespace)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
    backend.post_processor = template
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in [*set(specials.values()), *atomic]]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="right",
        truncation_side="right",
        model_max_length=77 if kind == "clip" else 4096,
        additional_special_tokens=atomic or None,
        **specials,
    )


def _seeded(seed: int, offset: int, make):
    """Build one module with the global RNG seeded, without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + offset)
        module = make()
    return module.eval().requires_grad_(False)


def _t5_encoder(seed: int, offset: int, tokenizer, width: int, heads: int, *, umt5: bool = False):
    """A 2-layer T5 (or UMT5) encoder of ``width`` for ``tokenizer`` (T5's, ByT5's and UMT5's stand-in)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = (UMT5Config if umt5 else T5Config)(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed, offset, lambda: (UMT5EncoderModel if umt5 else T5EncoderModel)(config))


def _build_cogvideox(variant: str, seed: int):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    is_v15 = variant == "1.5"
    is_i2v = variant == "5b-i2v"  # the image latents join the noisy ones on channels
    tokenizer = build_tokenizer("t5")
    text_dim = 32
    text_encoder = _t5_encoder(seed, 1, tokenizer, text_dim, 4)

    spatial_ratio, temporal_ratio = 2, 2
    vae = _seeded(
        seed,
        2,
        lambda: AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            # len(block_out_channels) - 1 downsamples: 2x space; the first compresses time too
            down_block_types=("CogVideoXDownBlock3D",) * 2,
            up_block_types=("CogVideoXUpBlock3D",) * 2,
            block_out_channels=(8, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=temporal_ratio,
            sample_height=32,
            sample_width=32,
            scaling_factor=1.15258426 if variant == "2b" else 0.7,
            invert_scale_latents=is_v15,
        ),
    )
    # The real 1.5's sample size is a RoPE table bound ("slice" grid), larger than typical outputs.
    sample_latent = 32 if is_v15 else 16
    transformer = _seeded(
        seed,
        3,
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=4,
            attention_head_dim=16,  # RoPE splits it 4 (t) + 6 (h) + 6 (w), each even
            in_channels=8 if is_i2v else 4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=text_dim,
            num_layers=2,
            sample_width=sample_latent,
            sample_height=sample_latent,
            sample_frames=9,
            patch_size=2,
            patch_size_t=2 if is_v15 else None,
            patch_bias=not is_v15,
            # read by the sin-cos table to turn latent frames back into video frames: must match the VAE
            temporal_compression_ratio=temporal_ratio,
            max_text_seq_length=EMBEDDED_TEXT_LEN,
            use_rotary_positional_embeddings=variant != "2b",
            use_learned_positional_embeddings=is_i2v,  # as CogVideoX-5b-I2V (sized for the demo's latents)
        ),
    )
    # Scheduler configs of THUDM/CogVideoX-2b / -5b / CogVideoX1.5-5B (2B trained with SNR shift 3).
    scheduler = CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0 if variant == "2b" else 1.0,
    )
    assert vae.config.temporal_compression_ratio == temporal_ratio
    assert 2 ** (len(vae.config.block_out_channels) - 1) == spatial_ratio
    pipeline = CogVideoXImageToVideoPipeline if is_i2v else CogVideoXPipeline
    return pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


# HunyuanVideo-I2V: a CLIP vision input of 32 x 32 in 8 x 8 patches, 16 image tokens (real: 336 / 14 -> 576)
_HVI2V_IMAGE_SIZE, _HVI2V_IMAGE_PATCH = 32, 8
_HVI2V_IMAGE_TOKENS = (_HVI2V_IMAGE_SIZE // _HVI2V_IMAGE_PATCH) ** 2
_HVI2V_IMAGE_TOKEN = "<image>"


def _hvi2v_prompt_template() -> dict:
    """The pipeline's default template (crop_start 103, image_emb_start 5) sized for our 16 image tokens (it
    hard-codes the real CLIP ViT-L/14's 576); :func:`demo_call_args` passes it."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    start = DEFAULT_PROMPT_TEMPLATE["image_emb_start"]  # 5: <image>'s index, also with the local tokenizer
    # a plain dict: the pipeline's check_inputs refuses anything else
    return {**DEFAULT_PROMPT_TEMPLATE, "image_emb_len": _HVI2V_IMAGE_TOKENS, "image_emb_end": start + _HVI2V_IMAGE_TOKENS}


def _clip_image_processor(size: int):
    """CLIP's image processor at ``size`` px: resize, centre crop, OpenAI CLIP mean and std, bicubic (its defaults,
    as the real checkpoints')."""
    try:  # the PIL one: without torchvision, newer transformers fall back to it with a warning
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _hvi2v_llava(seed: int, tokenizer, llama_config):
    """HunyuanVideo-I2V's prompt encoder: a tiny CLIP vision tower (16 image features, CLS dropped as Llava's
    default strategy) projected into the Llama, and its image processor."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision_config = CLIPVisionConfig(
        hidden_size=16,  # distinct from the Llama width: the projector really maps
        intermediate_size=32,
        projection_dim=16,
        num_hidden_layers=2,  # Llava reads hidden_states[-2]: layer 1's output
        num_attention_heads=2,
        image_size=_HVI2V_IMAGE_SIZE,
        patch_size=_HVI2V_IMAGE_PATCH,
    )
    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=llama_config,
        image_token_index=tokenizer.convert_tokens_to_ids(_HVI2V_IMAGE_TOKEN),
        image_seq_length=_HVI2V_IMAGE_TOKENS,
        pad_token_id=tokenizer.pad_token_id,  # read by the pipeline to mask padding (LlavaConfig has none)
    )
    text_encoder = _seeded(seed, 1, lambda: LlavaForConditionalGeneration(llava_config))
    return text_encoder, _clip_image_processor(_HVI2V_IMAGE_SIZE)


def _build_hunyuan_video(variant: str, seed: int):
    """``"t2v"``: a ``HunyuanVideoPipeline``; ``"i2v"``: a ``HunyuanVideoImageToVideoPipeline`` as
    HunyuanVideo-I2V (token replacement), whose prompt encoder is a tiny Llava around the same Llama."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from tokenizers import AddedToken
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    i2v = variant == "i2v"
    tokenizer = build_tokenizer("llama")
    if i2v:  # Llava's image placeholder: a new id after the frozen vocabulary (the other ids are unchanged)
        tokenizer.add_tokens([AddedToken(_HVI2V_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer_2 = build_tokenizer("clip")
    llama_dim, clip_dim = 32, 32
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=llama_dim,
        intermediate_size=64,
        # the pipeline reads hidden_states[-3]: with 3 layers that is layer 1's output, not the embeddings
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    if i2v:
        text_encoder, image_processor = _hvi2v_llava(seed, tokenizer, llama_config)
    else:
        text_encoder = _seeded(seed, 1, lambda: LlamaModel(llama_config))
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer_2),
        hidden_size=clip_dim,
        intermediate_size=64,
        projection_dim=clip_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer_2.bos_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        pad_token_id=tokenizer_2.pad_token_id,
    )
    text_encoder_2 = _seeded(seed, 2, lambda: CLIPTextModel(clip_config))
    vae = _seeded(
        seed,
        3,
        lambda: AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 3,
            up_block_types=("HunyuanVideoUpBlock3D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=2,
            temporal_compression_ratio=4,  # the only ratios the HunyuanVideo VAE takes are 4 and 8
            mid_block_add_attention=True,
        ),
    )
    transformer = _seeded(
        seed,
        4,
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=4,
            attention_head_dim=16,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            mlp_ratio=4.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=llama_dim,
            pooled_projection_dim=clip_dim,
            rope_theta=256.0,
            rope_axes_dim=(4, 6, 6),  # (t, h, w); must sum to attention_head_dim
            # HunyuanVideo-I2V: the image latents replace latent frame 0 (its token-replacement blocks)
            image_condition_type="token_replace" if i2v else None,
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0)
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                      text_encoder_2=text_encoder_2, vae=vae, transformer=transformer, scheduler=scheduler)
    if i2v:
        from diffusers import HunyuanVideoImageToVideoPipeline  # here: its module makes transformers warn without torchvision

        return HunyuanVideoImageToVideoPipeline(**components, image_processor=image_processor)
    return HunyuanVideoPipeline(**components)


# --- Wan 2.1 / 2.2 ----------------------------------------------------------------------------

# Wan 2.1 I2V needs exactly 512 text tokens (see demo_call_args).
_WAN_I2V_TEXT_LEN = 512

# Tiny sizes shared by every variant.
_WAN_Z_DIM = 4  # VAE latent channels (real: 16)
_WAN_SPATIAL, _WAN_TEMPORAL = 2, 2  # VAE compression (real: 8, 4)
_WAN_TEXT_DIM = 32  # UMT5 d_model = transformer text_dim (real: 4096)
_WAN_IMAGE_DIM = 32  # CLIP vision hidden size = transformer image_dim (real: 1280)

# Expert switch points: transformer (high noise) runs while t >= boundary_ratio * 1000.
# Real values; with 4 UniPC steps at the flow shifts below both experts run (2 steps each).
_WAN_BOUNDARY = {"2.2": 0.875, "2.2-i2v": 0.9}
# Flow shifts of the real configs: Wan 2.1 at 480p and Wan 2.2 A14B T2V / I2V.
_WAN_FLOW_SHIFT = {"2.1": 3.0, "2.1-i2v": 3.0, "2.2": 12.0, "2.2-i2v": 5.0, "2.1-vace": 3.0}


def demo_image(size: int = 32):
    """A small deterministic RGB PIL image (a colour gradient with a square) for the I2V variants."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), np.full_like(x, 96)], axis=-1)
    q = size // 4
    rgb[q : 2 * q, q : 2 * q] = (255, 255, 255)
    return Image.fromarray(rgb.astype(np.uint8))  # H x W x 3 uint8: RGB


def _wan_vae(seed: int):
    from diffusers import AutoencoderKLWan

    return _seeded(
        seed,
        2,
        lambda: AutoencoderKLWan(
            base_dim=8,
            z_dim=_WAN_Z_DIM,
            dim_mult=[1, 2],  # one down/up stage: 2x space
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[True],  # ... and 2x time at that stage
            # the pipelines read these two from the config; they must match the layout above
            scale_factor_spatial=_WAN_SPATIAL,
            scale_factor_temporal=_WAN_TEMPORAL,
            # the first z_dim entries of the real Wan 2.1 VAE statistics
            latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
            latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
        ),
    )


def _wan_transformer(seed: int, offset: int, in_channels: int, image_dim: int | None, vace: bool = False):
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    extra = dict(vace_layers=[0], vace_in_channels=2 * _WAN_Z_DIM + _WAN_SPATIAL**2) if vace else {}
    return _seeded(
        seed,
        offset,
        lambda: (WanVACETransformer3DModel if vace else WanTransformer3DModel)(
            **extra,
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=16,  # RoPE splits it t 8 + h 4 + w 4 (h = w = 2 * (16 // 6)), all even
            in_channels=in_channels,
            out_channels=_WAN_Z_DIM,
            text_dim=_WAN_TEXT_DIM,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            # Wan 2.1 I2V: CLIP features -> image_embedder (image_dim -> inner 64) -> attn2's add_k/add_v
            image_dim=image_dim,
            added_kv_proj_dim=None if image_dim is None else 4 * 16,
            rope_max_seq_len=1024,
        ),
    )


def _wan_image_encoder(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=_WAN_IMAGE_DIM,
        intermediate_size=64,
        projection_dim=_WAN_IMAGE_DIM,
        num_hidden_layers=2,  # the pipeline takes hidden_states[-2], i.e. layer 1's output
        num_attention_heads=4,
        image_size=32,
        patch_size=16,  # (32 / 16)^2 + CLS = 5 image tokens (real: 257)
        hidden_act="gelu",
    )
    image_encoder = _seeded(seed, 5, lambda: CLIPVisionModel(config))
    return image_encoder, _clip_image_processor(32)


def _build_wan(variant: str, seed: int):
    """``"2.1"`` / ``"2.2"``: ``WanPipeline`` with one or two experts; ``"2.1-i2v"`` / ``"2.2-i2v"``:
    ``WanImageToVideoPipeline``, 2.1 with a CLIP image encoder feeding cross-attention, 2.2 without and with two
    experts."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    i2v = variant.endswith("-i2v")
    two_experts = variant.startswith("2.2")

    tokenizer = build_tokenizer("t5")  # stands in for UMT5's (pad 0, </s> 1 appended)
    text_encoder = _t5_encoder(seed, 1, tokenizer, _WAN_TEXT_DIM, 4, umt5=True)
    vae = _wan_vae(seed)

    # I2V input = [noisy latents (z) | first-frame mask (TEMPORAL channels) | condition latents (z)]
    in_channels = _WAN_Z_DIM + (_WAN_TEMPORAL + _WAN_Z_DIM if i2v else 0)
    image_dim = _WAN_IMAGE_DIM if variant == "2.1-i2v" else None
    transformer = _wan_transformer(seed, 3, in_channels, image_dim)
    transformer_2 = _wan_transformer(seed, 4, in_channels, image_dim) if two_experts else None

    # Wan's diffusers scheduler config: UniPC on flow-matching sigmas
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=_WAN_FLOW_SHIFT[variant],
    )
    common = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=_WAN_BOUNDARY.get(variant),
    )
    if variant == "2.1-vace":
        from diffusers import WanVACEPipeline

        # the control branch: one VACE block whose hint joins after block 0; its input is the inactive and
        # reactive latents and the mask folded into VAE-space patches: z + z + spatial^2 channels
        common["transformer"] = _wan_transformer(seed, 6, in_channels, image_dim, vace=True)
        return WanVACEPipeline(**common)
    if not i2v:
        return WanPipeline(**common)

    from diffusers import WanImageToVideoPipeline  # imported here: its module makes transformers warn without torchvision

    image_encoder, image_processor = _wan_image_encoder(seed) if variant == "2.1-i2v" else (None, None)
    return WanImageToVideoPipeline(image_encoder=image_encoder, image_processor=image_processor, **common)


# --- HunyuanVideo 1.5 ---------------------------------------------------------------------------

_HV15_TEXT_LEN = EMBEDDED_TEXT_LEN  # MLLM tokens after the crop (real: 1000)
_HV15_BYT5_LEN = 8  # ByT5 tokens (real: 256)
_HV15_IMAGE_SIZE, _HV15_IMAGE_PATCH = 24, 8  # SigLIP input 24 x 24, 3 x 3 = 9 image tokens (real: 384 / 14 -> 729)
_HV15_IMAGE_TOKENS = (_HV15_IMAGE_SIZE // _HV15_IMAGE_PATCH) ** 2

# The local "llama" tokenizer has no chat template and the pipeline calls
# tokenizer.apply_chat_template(...). Real Qwen2.5-VL uses ChatML
# (<|im_start|>role\n...<|im_end|>\n); we use the Llama 3 layout instead, whose
# header tokens the local tokenizer already has as atomic tokens, so the frozen
# vocabulary stays unchanged. Like ChatML, the generation suffix after the
# prompt is 5 tokens (<|eot_id|> <|start_header_id|> assistant <|end_header_id|> \n\n).
_HV15_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _hv15_template_prefix_len(tokenizer, system_message: str) -> int:
    """Tokens before the user prompt in the rendered chat template: the pipeline's crop_start (real: 108)."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    sentinel = "SENTINELPROMPT"
    text = tokenizer.apply_chat_template(
        format_text_input([sentinel], system_message), tokenize=False, add_generation_prompt=True
    )[0]
    return len(tokenizer(text.split(sentinel)[0], add_special_tokens=False).input_ids)


def _hv15_text_encoders(seed: int):
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    tokenizer = build_tokenizer("llama")  # stands in for Qwen2Tokenizer (byte-level BPE chat tokenizer)
    tokenizer.chat_template = _HV15_CHAT_TEMPLATE
    qwen_config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        # the pipeline reads hidden_states[-3]; with 3 layers that is layer 1's output, not the embeddings
        num_hidden_layers=3,
        num_attention_heads=4,  # head dim 8
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Qwen2.5-VL's multimodal RoPE: mrope_section sums to head_dim / 2 (real: [16, 24, 24] for 128)
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 1, 1]},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    text_encoder = _seeded(seed, 1, lambda: Qwen2_5_VLTextModel(qwen_config))

    # ByT5 stand-in: the word-level "t5" tokenizer (pad 0, </s> 1, unk 2 as T5/ByT5); the pipeline
    # only calls tokenizer_2(text, padding="max_length", max_length=..., truncation=True, ...)
    tokenizer_2 = build_tokenizer("t5")
    # width 24: distinct from the other encoders' widths, so any miswiring fails loudly
    text_encoder_2 = _t5_encoder(seed, 2, tokenizer_2, 24, 3)
    return tokenizer, text_encoder, tokenizer_2, text_encoder_2


def _hv15_image_encoder(seed: int):
    # torchvision is not installed: transformers' SiglipImageProcessor would fall back to (and warn
    # about) SiglipImageProcessorPil, so use that directly; it has the same preprocess() signature.
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    siglip_config = SiglipVisionConfig(
        hidden_size=16,  # = transformer image_embed_dim (real: 1152)
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_channels=3,
        image_size=_HV15_IMAGE_SIZE,
        patch_size=_HV15_IMAGE_PATCH,
        vision_use_head=False,  # the pipeline reads last_hidden_state only
    )
    image_encoder = _seeded(seed, 5, lambda: SiglipVisionModel(siglip_config))
    feature_extractor = SiglipImageProcessorPil(
        size={"height": _HV15_IMAGE_SIZE, "width": _HV15_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return image_encoder, feature_extractor


def _build_hunyuan_video15(variant: str, seed: int):
    """A tiny ``HunyuanVideo15Pipeline`` ("t2v") or ``HunyuanVideo15ImageToVideoPipeline`` ("i2v")."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Transformer3DModel,
    )

    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = _hv15_text_encoders(seed)

    latent_channels = 4
    vae = _seeded(
        seed,
        3,
        lambda: AutoencoderKLHunyuanVideo15(
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            # log2(4) = 2 downsampling stages, both 2x space and 2x time (the temporal ones are the last
            # log2(temporal) stages, as in the real 16x/4x VAE); the third stage only holds resnets
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            spatial_compression_ratio=4,
            temporal_compression_ratio=4,  # must not exceed the spatial ratio (else fewer temporal stages are built)
            scaling_factor=1.03682,
        ),
    )
    transformer = _seeded(
        seed,
        4,
        lambda: HunyuanVideo15Transformer3DModel(
            in_channels=2 * latent_channels + 1,  # latents | condition latents | condition mask
            out_channels=latent_channels,
            num_attention_heads=4,
            attention_head_dim=16,
            num_layers=2,
            num_refiner_layers=1,
            mlp_ratio=4.0,
            patch_size=1,
            patch_size_t=1,
            qk_norm="rms_norm",
            text_embed_dim=text_encoder.config.hidden_size,
            text_embed_2_dim=text_encoder_2.config.d_model,
            image_embed_dim=16,  # SigLIP hidden size
            rope_theta=256.0,
            rope_axes_dim=(4, 6, 6),  # (t, h, w); each even, summing to attention_head_dim
            target_size=32,  # pixel size of the resolution buckets (i2v output size; t2v default size)
            task_type=variant,
            use_meanflow=False,
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)  # 480p configs
    guider = ClassifierFreeGuidance(guidance_scale=6.0)

    components = dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=guider,
    )
    if variant == "t2v":
        from diffusers import HunyuanVideo15Pipeline

        pipe = HunyuanVideo15Pipeline(**components)
    else:
        # importing this pipeline makes transformers warn that torchvision is missing (it imports
        # SiglipImageProcessor, which then falls back to SiglipImageProcessorPil)
        from diffusers import HunyuanVideo15ImageToVideoPipeline

        image_encoder, feature_extractor = _hv15_image_encoder(seed)
        pipe = HunyuanVideo15ImageToVideoPipeline(
            **components, image_encoder=image_encoder, feature_extractor=feature_extractor
        )

    # Text lengths are hard-coded pipeline attributes (no call argument); shrink them.
    pipe.tokenizer_max_length = _HV15_TEXT_LEN
    pipe.tokenizer_2_max_length = _HV15_BYT5_LEN
    pipe.prompt_template_encode_start_idx = _hv15_template_prefix_len(tokenizer, pipe.system_message)
    pipe.vision_num_semantic_tokens = _HV15_IMAGE_TOKENS  # t2v's all-zero (masked) image tokens

    assert vae.spatial_compression_ratio == 4 and vae.temporal_compression_ratio == 4
    assert sum(transformer.config.rope_axes_dim) == transformer.config.attention_head_dim
    return pipe


_BUILDERS = {
    "cogvideox": _build_cogvideox,
    "hunyuan-video": _build_hunyuan_video,
    "hunyuan-video-1.5": _build_hunyuan_video15,
    "wan": _build_wan,
}


def build_embedded_pipeline(
    family: str = "cogvideox",
    *,
    variant: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    transformer_weights: str | os.PathLike | None = None,
):
    """Build a small, deterministic diffusers video pipeline on the CPU.

    Args:
        family: ``"cogvideox"`` (a ``CogVideoXPipeline``), ``"hunyuan-video"``
            (a ``HunyuanVideoPipeline``), ``"hunyuan-video-1.5"`` (a
            ``HunyuanVideo15Pipeline`` or its image-to-video pipeline) or
            ``"wan"`` (a ``WanPipeline`` or ``WanImageToVideoPipeline``).
        variant: for ``"cogvideox"``: ``"5b"`` (RoPE, the default), ``"2b"``
            (sin-cos positions, no RoPE), ``"1.5"`` (RoPE with
            ``patch_size_t=2``) or ``"5b-i2v"`` (a ``CogVideoXImageToVideoPipeline``
            with learned positions sized for the demo call).
            ``"hunyuan-video"``: ``"t2v"`` or ``"i2v"`` (a
            ``HunyuanVideoImageToVideoPipeline`` with token replacement).
            ``"hunyuan-video-1.5"``: ``"t2v"`` or ``"i2v"``.
            ``"wan"``: ``"2.1"`` (the default), ``"2.2"`` (two experts),
            ``"2.1-i2v"``, ``"2.2-i2v"``, ``"2.1-vace"`` (a ``WanVACEPipeline``);
            see the module docstring.
        seed: every weight is a function of it; the caller's RNG state is left alone.
        dtype: the modules' dtype (they are built in float32, then cast). All
            modules are in eval mode with ``requires_grad`` off.
        transformer_weights: a ``.safetensors`` state dict to load into the
            transformer (e.g. a trained reference model). Its keys and shapes
            must match the embedded transformer exactly.

    Recommended call sizes are :data:`DEMO_CALL_ARGS[family] <DEMO_CALL_ARGS>`:
    32 x 32 pixels, 9 frames (CogVideoX) or 17 frames (HunyuanVideo), 4 steps,
    ``max_sequence_length=EMBEDDED_TEXT_LEN``; both give 5 latent frames of
    8 x 8 tokens. Other sizes work within the constraints in the module docstring.
    """
    if family not in EMBEDDED_FAMILIES:
        raise ValueError(f"unknown embedded family {family!r}; expected one of {sorted(EMBEDDED_FAMILIES)}")
    variants = EMBEDDED_FAMILIES[family]
    variant = variants[0] if variant is None else variant
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} for family {family!r}; expected one of {list(variants)}")
    pipe = _BUILDERS[family](variant, seed)
    if transformer_weights is not None:
        _load_transformer_weights(pipe.transformer, Path(transformer_weights))
    if dtype != torch.float32:
        # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules even when there are none
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, dtype=dtype)
    return pipe


def _load_transformer_weights(transformer: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"transformer_weights: no such file {str(path)!r}")
    state = load_file(str(path))
    expected = transformer.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"transformer_weights {str(path)!r} does not fit the embedded {type(transformer).__name__}: "
            f"{len(missing)} missing keys (first: {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(first: {unexpected[:3]}). Was it trained with a different family, variant or size?"
        )
    wrong_shape = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if state[key].shape != expected[key].shape
    ]
    if wrong_shape:
        raise ValueError(
            f"transformer_weights {str(path)!r}: shape mismatch in {len(wrong_shape)} tensors: {wrong_shape[:3]}"
        )
    transformer.load_state_dict(state, strict=True)


REFERENCE_MODEL_ID = "embedded:reference"
"""The trained reference CogVideoX (:mod:`vdit_sparse.reference_model`): real learned attention, small enough for a CPU."""


def call_args_for(model: str) -> dict:
    """Recommended ``pipe(...)`` keyword arguments for an embedded model name; ``{}`` (the pipeline's defaults) otherwise."""
    if model == REFERENCE_MODEL_ID:
        from .reference_model import REFERENCE_CALL_ARGS

        return dict(REFERENCE_CALL_ARGS)
    if model in EMBEDDED_MODEL_IDS:
        return demo_call_args(*EMBEDDED_MODEL_IDS[model])
    return {}


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Resolve a model name to a pipeline on ``device``.

    ``model`` is :data:`REFERENCE_MODEL_ID` (the trained reference model), one
    of :data:`EMBEDDED_MODEL_IDS` (built offline with random weights), a local
    directory saved with ``save_pretrained``, or a hub id; the last two go to
    ``DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)`` unchanged.
    """
    if model == REFERENCE_MODEL_ID:
        from .reference_model import build_reference_pipeline

        return build_reference_pipeline(device=device, dtype=dtype)
    if model in EMBEDDED_MODEL_IDS:
        family, variant = EMBEDDED_MODEL_IDS[model]
        return build_embedded_pipeline(family, variant=variant, dtype=dtype).to(device)
    if model.startswith("embedded:"):
        raise ValueError(
            f"unknown embedded model {model!r}; expected one of {sorted([*EMBEDDED_MODEL_IDS, REFERENCE_MODEL_ID])}"
        )

    from diffusers import DiffusionPipeline
    from diffusers.utils import deprecation_utils

    # diffusers 0.42 renamed from_pretrained's torch_dtype to dtype (the old name warns);
    # older releases know only torch_dtype
    dtype_kwarg = {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ValueError(
                f"{str(local)!r} is a directory but not a diffusers pipeline (no model_index.json); "
                "save one with pipe.save_pretrained(dir) or pass a hub id"
            )
        return DiffusionPipeline.from_pretrained(str(local), **dtype_kwarg).to(device)
    # a hub id is "name" or "owner/name"; anything else that names a path must exist locally
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_like_path or local.exists():
        raise FileNotFoundError(
            f"model {model!r}: local directory {str(local.resolve())!r} does not exist. "
            f"Pass an existing pipeline directory, a hub id (owner/name), or one of {sorted(EMBEDDED_MODEL_IDS)}."
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **dtype_kwarg)
    except Exception as error:  # hub errors come in many types (OSError, HTTPError, ValueError, ...)
        raise OSError(
            f"could not load model {model!r}: it is not a local directory ({str(local.resolve())!r} does not "
            f"exist) and loading it as a hub id failed ({type(error).__name__}: {error}). Offline? Use a "
            f"local directory, set HF_HUB_OFFLINE=1 with a filled cache, or one of {sorted(EMBEDDED_MODEL_IDS)}."
        ) from error
    return pipe.to(device)
