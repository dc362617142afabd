"""The trained reference model: a small CogVideoX whose attention was learned.

Random weights say nothing about quality: their attention is unstructured, so
any sparse pattern looks as good (or as bad) as any other. This module builds
a real ``CogVideoXPipeline`` around a small ``CogVideoXTransformer3DModel``
(6 layers, 8 heads of 32 dims, RoPE as in CogVideoX-5B, patch 2) and a small
``AutoencoderKLCogVideoX``, trained by ``scripts/reference_model/train.py`` on
procedurally generated videos of coloured shapes moving over panning, smoothly
textured backgrounds. The tokenizer and the small T5 text encoder are those of
the embedded CogVideoX pipeline (:mod:`vdit_sparse.embedded`); the T5 was
trained together with the transformer, and its weights are stored with theirs.
``assets/REFERENCE_MODEL.md`` is its model card.

Example::

    import torch
    from vdit_sparse.reference_model import REFERENCE_CALL_ARGS, build_reference_pipeline

    pipe = build_reference_pipeline()  # assets/reference-cogvideox.safetensors
    video = pipe("red circle moving right", **REFERENCE_CALL_ARGS,
                 generator=torch.Generator().manual_seed(0)).frames[0]

Geometry at :data:`REFERENCE_CALL_ARGS`: 17 frames of 64 x 64 pixels -> VAE
(2x space, 2x time) -> 9 latent frames of 32 x 32 x 4 -> patch 2 -> 9 frames of
16 x 16 = 256 tokens, 2304 video tokens after a 16-token text prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch

__all__ = [
    "DEFAULT_WEIGHTS_PATH",
    "REFERENCE_CALL_ARGS",
    "REFERENCE_CONFIG",
    "VARIABLE_KEYS",
    "build_reference_pipeline",
    "init_reference_pipeline",
]

WEIGHTS_FORMAT = "vdit-sparse-reference/1"

# assets/ is a top-level folder of the repository, beside vdit_sparse/, not part of the
# installed package. An editable install (`pip install -e .`, how this repository is
# set up) imports this file from the checkout, so two levels up from it is the
# repository root and the shipped weights are found there. A regular (wheel) install
# copies only the package into site-packages: there this path does not exist and
# build_reference_pipeline() asks for an explicit `weights=` path.
DEFAULT_WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "assets" / "reference-cogvideox.safetensors"

_TEXT_LEN = 16

REFERENCE_CONFIG: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {
        # CogVideoXTransformer3DModel keyword arguments
        "transformer": MappingProxyType(
            {
                "num_attention_heads": 8,
                "attention_head_dim": 32,  # RoPE splits it 8 (t) + 12 (h) + 12 (w)
                "in_channels": 4,
                "out_channels": 4,
                "time_embed_dim": 128,
                "text_embed_dim": 32,  # the embedded T5's d_model
                "num_layers": 6,
                # latent pixels (32 x 32 -> 16 x 16 tokens): the RoPE base grid, as 90 x 60 is for the real 5B
                "sample_width": 32,
                "sample_height": 32,
                "sample_frames": 17,  # video frames; (17 - 1) / 2 + 1 = 9 latent frames
                "patch_size": 2,
                "patch_size_t": None,
                "temporal_compression_ratio": 2,  # must match the VAE
                "max_text_seq_length": _TEXT_LEN,
                "use_rotary_positional_embeddings": True,  # the 5B style
                "use_learned_positional_embeddings": False,
            }
        ),
        # AutoencoderKLCogVideoX keyword arguments, scaling_factor excepted: that is measured
        # on the trained encoder's latents and stored with the weights.
        "vae": MappingProxyType(
            {
                "in_channels": 3,
                "out_channels": 3,
                # len(block_out_channels) - 1 downsamples: 2x space; the first compresses time too
                "down_block_types": ("CogVideoXDownBlock3D",) * 2,
                "up_block_types": ("CogVideoXUpBlock3D",) * 2,
                "block_out_channels": (32, 64),
                "latent_channels": 4,
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "temporal_compression_ratio": 2,
                "sample_height": 64,
                "sample_width": 64,
            }
        ),
        # Tokenizer, T5 text encoder and scheduler come from this embedded pipeline (the T5's
        # weights are stored with the reference weights too, so a later change to the embedded
        # builder cannot silently change what the transformer was trained on).
        "embedded": MappingProxyType({"family": "cogvideox", "variant": "5b", "seed": 0}),
    }
)
"""The reference model's architecture; the weights file records the one it was trained with."""

VARIABLE_KEYS = frozenset({("transformer", "num_layers")})
"""The parts of :data:`REFERENCE_CONFIG` a weights file may set otherwise: ``python -m scripts.reference_model.train
--num-layers`` trains deeper or shallower variants, and :func:`build_reference_pipeline` builds what the file says."""

REFERENCE_CALL_ARGS: Mapping[str, object] = MappingProxyType(
    {
        "height": 64,
        "width": 64,
        "num_frames": 17,  # 9 latent frames of 16 x 16 tokens
        "num_inference_steps": 25,
        "guidance_scale": 6.0,
        "max_sequence_length": _TEXT_LEN,
    }
)
"""Recommended ``pipe(...)`` keyword arguments: the size the model was trained at."""


def _plain(value):
    """REFERENCE_CONFIG as JSON-ready dicts and lists (MappingProxyType and tuples are not JSON)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def _vocabulary_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def _config_with(num_layers: int | None) -> dict:
    """REFERENCE_CONFIG as plain dicts, with the transformer's depth set to ``num_layers`` when given."""
    config = _plain(REFERENCE_CONFIG)
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        config["transformer"]["num_layers"] = num_layers
    return config


def init_reference_pipeline(seed: int = 0, vae_scaling_factor: float = 1.0, num_layers: int | None = None):
    """An untrained reference pipeline on the CPU in float32: the starting point of training.

    The transformer and VAE are freshly initialised from ``seed``; tokenizer,
    text encoder and scheduler are the embedded CogVideoX pipeline's.
    ``num_layers`` sets the transformer's depth (default: :data:`REFERENCE_CONFIG`'s).
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel

    from .embedded import build_embedded_pipeline

    embedded = build_embedded_pipeline(
        REFERENCE_CONFIG["embedded"]["family"],
        variant=REFERENCE_CONFIG["embedded"]["variant"],
        seed=REFERENCE_CONFIG["embedded"]["seed"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**_config_with(num_layers)["transformer"])
        vae = AutoencoderKLCogVideoX(**REFERENCE_CONFIG["vae"], scaling_factor=vae_scaling_factor)
    return CogVideoXPipeline(
        tokenizer=embedded.tokenizer,
        text_encoder=embedded.text_encoder,
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=embedded.scheduler,
    )


def build_reference_pipeline(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The trained reference ``CogVideoXPipeline`` on ``device`` in ``dtype``.

    Args:
        weights: the ``.safetensors`` file written by ``scripts/reference_model/train.py``;
            ``None`` reads :data:`DEFAULT_WEIGHTS_PATH` (``assets/`` of the repository,
            found from an editable install).
        device: where the pipeline goes.
        dtype: the modules' dtype (weights are stored in float16 and loaded in float32 first).

    The transformer's depth is the one the file records (:data:`VARIABLE_KEYS`).
    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` when it
    was trained with another architecture or tokenizer than this code builds.
    """
    from safetensors import safe_open

    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS_PATH
    if not path.is_file():
        hint = (
            " The reference weights ship in the repository's assets/ folder, which only an editable install "
            "(pip install -e .) finds by default; pass weights=PATH otherwise."
            if weights is None
            else ""
        )
        raise FileNotFoundError(f"reference weights: no such file {str(path)!r}.{hint}")

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise ValueError(
            f"reference weights {str(path)!r}: format {metadata.get('format')!r}, expected {WEIGHTS_FORMAT!r}"
        )
    trained_config, config = json.loads(metadata["config"]), _plain(REFERENCE_CONFIG)
    changed = sorted(
        (part, key)
        for part in set(trained_config) | set(config)
        for key in set(trained_config.get(part, {})) | set(config.get(part, {}))
        if trained_config.get(part, {}).get(key) != config.get(part, {}).get(key)
    )
    fixed = [f"{part}.{key}" for part, key in changed if (part, key) not in VARIABLE_KEYS]
    if fixed:
        raise ValueError(
            f"reference weights {str(path)!r} were trained with another REFERENCE_CONFIG "
            f"(differs in {fixed}); retrain with python -m scripts.reference_model.train"
        )

    pipe = init_reference_pipeline(
        vae_scaling_factor=float(metadata["vae_scaling_factor"]), num_layers=trained_config["transformer"]["num_layers"]
    )
    if _vocabulary_digest(pipe.tokenizer) != metadata["tokenizer_vocabulary_sha256"]:
        raise ValueError(
            f"reference weights {str(path)!r} were trained with another tokenizer vocabulary than "
            "vdit_sparse.embedded.build_tokenizer('t5') now builds; retrain with python -m scripts.reference_model.train"
        )
    for prefix in ("transformer", "vae", "text_encoder"):
        module = getattr(pipe, prefix)
        part = {key[len(prefix) + 1 :]: tensor for key, tensor in state.items() if key.startswith(prefix + ".")}
        expected = module.state_dict()
        missing, unexpected = sorted(set(expected) - set(part)), sorted(set(part) - set(expected))
        wrong_shape = [key for key in expected if key in part and part[key].shape != expected[key].shape]
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"reference weights {str(path)!r}: the {prefix} does not fit ({len(missing)} missing keys, "
                f"first {missing[:3]}; {len(unexpected)} unexpected, first {unexpected[:3]}; "
                f"{len(wrong_shape)} of another shape, first {wrong_shape[:3]})"
            )
        module.load_state_dict({key: tensor.to(expected[key].dtype) for key, tensor in part.items()}, strict=True)
        module.eval().requires_grad_(False)
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules even when there are none
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, device=device, dtype=dtype)
    return pipe
