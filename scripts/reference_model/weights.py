"""Writing and reading the reference model's weights file, for training: what
vdit_sparse.reference_model.build_reference_pipeline loads, written by :mod:`.train`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from vdit_sparse.reference_model import DEFAULT_WEIGHTS_PATH, WEIGHTS_FORMAT, _config_with, _plain, _vocabulary_digest


def save_reference_weights(pipe, path: str | os.PathLike, training: Mapping[str, object] | None = None) -> Path:
    """Write the pipeline's transformer, VAE and text encoder to one ``.safetensors`` file.

    Tensors are stored in float16 (the file must stay under 25 MB); the
    metadata records the architecture, the VAE's scaling factor, a digest of
    the tokenizer's vocabulary and, optionally, a short training summary.
    """
    from safetensors.torch import save_file

    state = {}
    for prefix, module in (("transformer", pipe.transformer), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        for key, tensor in module.state_dict().items():
            stored = tensor.detach().to("cpu")
            state[f"{prefix}.{key}"] = (stored.half() if stored.is_floating_point() else stored).contiguous()
    metadata = {
        "format": WEIGHTS_FORMAT,
        "config": json.dumps(_config_with(pipe.transformer.config.num_layers), sort_keys=True),
        "vae_scaling_factor": repr(float(pipe.vae.config.scaling_factor)),
        "tokenizer_vocabulary_sha256": _vocabulary_digest(pipe.tokenizer),
    }
    if training is not None:
        metadata["training"] = json.dumps(_plain(training), sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def read_training_summary(weights: str | os.PathLike | None = None) -> dict | None:
    """The training summary :mod:`.train` stored in a weights file.

    A resumed run nests the summary of the run it continued under ``resumed_from``.
    ``None`` when the file holds none; ``weights=None`` reads :data:`vdit_sparse.reference_model.DEFAULT_WEIGHTS_PATH`.
    """
    from safetensors import safe_open

    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS_PATH
    with safe_open(str(path), framework="pt") as handle:
        summary = (handle.metadata() or {}).get("training")
    return None if summary is None else json.loads(summary)
