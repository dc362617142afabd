"""Sample the trained reference model densely and measure how structured its attention is.

Writes three files (defaults in docs/):

- ``reference-samples.png``: one row per prompt, every other frame across.
- ``reference-attention.json``: for every layer and head, at a mid denoising
  step, averaged over the video queries of the conditional branch and over the
  prompts: the attention mass on keys in the query's own latent frame, within
  +-1 latent frame, at the same spatial position (+-1 patch) in the other
  frames, and on text; beside each, the value uniform attention would give.
  Spatial heads have a large +-1-frame mass, temporal heads a large
  same-position mass.
- ``reference-attention.png``: per layer (rows) and head (columns), the mean
  attention probability by relative offset (frame offset -4..4 as a 3 x 3 set
  of tiles, row and column offsets -7..7 inside each tile), averaged over all
  video queries. A spatial head lights up the centre tile; a temporal head a
  dot at the centre of every tile.

Attention probabilities are not materialised by the pipeline, so a forward
pre-hook on each block's ``attn1`` captures its inputs and recomputes q, k and v
with ``vdit_sparse.pipelines.cogvideox.attention_inputs`` (as
``CogVideoXAttnProcessor2_0`` computes them: to_q/to_k/to_v, per-head LayerNorm,
RoPE on the video part); a forward hook checks that ``to_out(P @ V)`` equals
the module's real output (``recompute_max_rel_err`` in the JSON).

Runs on the CPU (a few minutes) or a GPU::

    python -m scripts.reference_model.sample                # assets/ weights, docs/ outputs
    python -m scripts.reference_model.sample --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vdit_sparse.geometry import LatentGrid, TokenLayout
from vdit_sparse.pipelines.cogvideox import attention_inputs
from vdit_sparse.reference_model import (
    DEFAULT_WEIGHTS_PATH,
    REFERENCE_CALL_ARGS,
    build_reference_pipeline,
)
from vdit_sparse.video import frames_to_array

REPO = Path(__file__).resolve().parents[2]

DEFAULT_PROMPTS = (
    "red circle moving right",
    "blue square moving left spinning",
    "yellow triangle moving down and green ring moving up",
    "striped white star moving up, camera pans left",
)
MAP_FRAMES = 4  # relative frame offsets -4..4 drawn
MAP_RADIUS = 7  # relative row/column offsets -7..7 drawn


def joint_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities ``(B, H, S, S)`` and values ``(B, H, S, D)`` of a CogVideoX ``attn1``
    over ``[text | video]``, text first.

    q, k, v come from :func:`vdit_sparse.pipelines.cogvideox.attention_inputs` (as
    ``CogVideoXAttnProcessor2_0`` computes them); the probabilities are computed in float32.
    """
    q, k, v = (x.float() for x in attention_inputs(attn, hidden_states, encoder_hidden_states, image_rotary_emb))
    # SDPA's default scale, as the processor uses
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1), v


class AttentionStructure:
    """Per-head attention statistics of the video queries at one denoising step.

    Hooks are registered on the transformer (to know the step from its
    ``timestep`` argument) and on each block's ``attn1``; ``remove()`` takes
    them all off.
    """

    def __init__(self, transformer, layout: TokenLayout, timestep: int):
        self.layout, self.timestep, self.active = layout, int(timestep), False
        grid = layout.grid
        index = torch.arange(grid.num_tokens)
        frame, row, col = index // grid.tokens_per_frame, index % grid.tokens_per_frame // grid.width, index % grid.width
        d_frame = frame[None, :] - frame[:, None]  # (query, key)
        d_row, d_col = row[None, :] - row[:, None], col[None, :] - col[:, None]
        self.masks = {
            "own_frame": d_frame == 0,
            "within_1_frame": d_frame.abs() <= 1,
            "same_position_other_frames": (d_frame != 0) & (d_row.abs() <= 1) & (d_col.abs() <= 1),
        }
        # relative-offset bins, (2F-1) x (2H-1) x (2W-1)
        self.offset_shape = (2 * grid.frames - 1, 2 * grid.height - 1, 2 * grid.width - 1)
        self.offset_bin = (
            ((d_frame + grid.frames - 1) * self.offset_shape[1] + d_row + grid.height - 1) * self.offset_shape[2]
            + d_col
            + grid.width
            - 1
        ).flatten()
        self.offset_count = torch.zeros(int(np.prod(self.offset_shape))).index_add_(
            0, self.offset_bin, torch.ones(self.offset_bin.numel())
        )
        layers = len(transformer.transformer_blocks)
        heads = transformer.transformer_blocks[0].attn1.heads
        self.mass = {name: torch.zeros(layers, heads, dtype=torch.float64) for name in [*self.masks, "text"]}
        self.offset_mass = torch.zeros(layers, heads, self.offset_count.numel(), dtype=torch.float64)
        self.captures = 0
        self.max_rel_err = 0.0
        self._pending = {}
        self._handles = [transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True)]
        for layer, block in enumerate(transformer.transformer_blocks):
            self._handles.append(block.attn1.register_forward_pre_hook(self._before(layer), with_kwargs=True))
            self._handles.append(block.attn1.register_forward_hook(self._after(layer), with_kwargs=True))

    def uniform(self) -> dict[str, float]:
        """The masses uniform attention over all keys (text included) would give."""
        seq_len = self.layout.seq_len
        values = {name: mask.sum(-1).double().mean().item() / seq_len for name, mask in self.masks.items()}
        values["text"] = self.layout.text_length / seq_len
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_transformer(self, module, args, kwargs):
        timestep = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        self.active = timestep is not None and int(torch.as_tensor(timestep).flatten()[0]) == self.timestep
        if self.active:
            self.captures += 1

    def _before(self, layer: int):
        def hook(attn, args, kwargs):
            if not self.active:
                return
            hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            rotary = kwargs.get("image_rotary_emb")
            text_len, heads = text.shape[1], attn.heads
            if text_len != self.layout.text_length or hidden.shape[1] != self.layout.grid.num_tokens:
                raise ValueError(
                    f"attention sequence {text_len} text + {hidden.shape[1]} video tokens does not match "
                    f"the layout {self.layout}; call the pipeline at REFERENCE_CALL_ARGS sizes"
                )
            with torch.no_grad():
                # the conditional branch is the last batch element (CFG batches [uncond, cond])
                probs, v = joint_attention(attn, hidden[-1:], text[-1:], rotary)
                probs = probs[0]  # (H, S, S)
                self._pending[layer] = (probs @ v[0]).transpose(0, 1).reshape(1, -1, heads * v.shape[-1])
                video = probs[:, text_len:].cpu().double()  # video queries, all keys
                self.mass["text"][layer] += video[:, :, :text_len].sum(-1).mean(-1)
                on_video = video[:, :, text_len:]
                for name, mask in self.masks.items():
                    self.mass[name][layer] += (on_video * mask).sum(-1).mean(-1)
                self.offset_mass[layer].index_add_(1, self.offset_bin, on_video.flatten(1))

        return hook

    def _after(self, layer: int):
        def hook(attn, args, kwargs, output):
            attended = self._pending.pop(layer, None)
            if attended is None:
                return
            with torch.no_grad():
                ours = attn.to_out[0](attended.to(attn.to_out[0].weight.dtype)).float()
                hidden, text = output  # the processor returns (video, text)
                real = torch.cat([text, hidden], dim=1)[-1:].float()
                err = ((ours - real).norm() / real.norm().clamp_min(1e-12)).item()
            self.max_rel_err = max(self.max_rel_err, err)

        return hook

    def results(self) -> dict:
        count = max(1, self.captures)
        layers, heads = self.offset_mass.shape[:2]
        per_head = []
        for layer in range(layers):
            for head in range(heads):
                entry = {"layer": layer, "head": head}
                entry.update({name: round(self.mass[name][layer, head].item() / count, 4) for name in self.mass})
                per_head.append(entry)
        return {"heads": per_head}

    def offset_maps(self) -> torch.Tensor:
        """Mean attention probability by relative offset, cropped: (layers, heads, 2M+1, 2R+1, 2R+1)."""
        mean = self.offset_mass / max(1, self.captures) / self.offset_count.clamp_min(1).double()
        maps = mean.view(*mean.shape[:2], *self.offset_shape)
        f0, h0, w0 = (size // 2 for size in self.offset_shape)
        return maps[
            :,
            :,
            f0 - MAP_FRAMES : f0 + MAP_FRAMES + 1,
            h0 - MAP_RADIUS : h0 + MAP_RADIUS + 1,
            w0 - MAP_RADIUS : w0 + MAP_RADIUS + 1,
        ]


def _colour_map(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 along a dark-purple-orange-yellow ramp."""
    anchors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
    position = np.clip(values, 0, 1) * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    frac = (position - low)[..., None]
    return (anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


def write_samples_png(videos: list[np.ndarray], prompts: list[str], path: Path, scale: int = 2) -> None:
    frames, height, width, _ = videos[0].shape
    shown = list(range(0, frames, 2))
    label, gap = 14, 2
    canvas = Image.new("RGB", (len(shown) * (width * scale + gap) + gap, len(videos) * (height * scale + label + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, (video, prompt) in enumerate(zip(videos, prompts)):
        top = gap + row * (height * scale + label + gap)
        draw.text((gap + 2, top + 1), f'"{prompt}"  (frames {", ".join(map(str, shown))})', fill="black", font=font)
        for column, frame in enumerate(shown):
            tile = Image.fromarray((video[frame] * 255).round().astype(np.uint8)).resize((width * scale, height * scale), Image.NEAREST)
            canvas.paste(tile, (gap + column * (width * scale + gap), top + label))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def write_attention_png(maps: torch.Tensor, per_head: list[dict], seq_len: int, path: Path, scale: int = 2) -> None:
    layers, heads, frames, size, _ = maps.shape
    tiles_across = 3
    tile_gap, cell_gap, label = 1, 8, 24
    cell = tiles_across * (size + tile_gap) * scale
    header = 28
    canvas = Image.new("RGB", (40 + heads * (cell + cell_gap), header + layers * (cell + label + cell_gap)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    lookup = {(entry["layer"], entry["head"]): entry for entry in per_head}
    draw.text(
        (40, 2),
        "rows: layers; columns: heads; tiles: frame offset -4..4 (row-major), inside: row/col offset -7..7\n"
        "colour: log probability over uniform, 1x (dark) to 100x (light); f: mass within +-1 frame, p: at same position in other frames",
        fill="black",
        font=font,
    )
    for layer in range(layers):
        top = header + layer * (cell + label + cell_gap)
        draw.text((2, top + label + cell // 2 - 6), f"L{layer}", fill="black", font=font)
        for head in range(heads):
            left = 40 + head * (cell + cell_gap)
            head_map = maps[layer, head].numpy()
            # enrichment over uniform attention (1 / seq_len per key) on one log scale for all heads
            shown = np.log(np.maximum(head_map * seq_len, 1.0)) / np.log(100.0)
            entry = lookup[(layer, head)]
            draw.text((left, top), f"H{head} f{entry['within_1_frame']:.2f}", fill="black", font=font)
            draw.text((left, top + 11), f"p{entry['same_position_other_frames']:.2f}", fill="black", font=font)
            for index in range(frames):
                tile = Image.fromarray(_colour_map(shown[index])).resize((size * scale, size * scale), Image.NEAREST)
                row, column = divmod(index, tiles_across)
                canvas.paste(tile, (left + column * (size + tile_gap) * scale, top + label + row * (size + tile_gap) * scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_PATH)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=REFERENCE_CALL_ARGS["num_inference_steps"])
    parser.add_argument("--guidance-scale", type=float, default=REFERENCE_CALL_ARGS["guidance_scale"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", action="append", dest="prompts", help="repeatable; default: four built-in prompts")
    parser.add_argument("--capture-step", type=int, default=None, help="denoising step to measure (default: the middle one)")
    parser.add_argument("--samples-png", type=Path, default=REPO / "docs" / "reference-samples.png")
    parser.add_argument("--attention-json", type=Path, default=REPO / "docs" / "reference-attention.json")
    parser.add_argument("--attention-png", type=Path, default=REPO / "docs" / "reference-attention.png")
    args = parser.parse_args(argv)
    prompts = args.prompts or list(DEFAULT_PROMPTS)

    started = time.perf_counter()
    pipe = build_reference_pipeline(args.weights, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    call_args = dict(REFERENCE_CALL_ARGS, num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    pipe.scheduler.set_timesteps(args.steps)
    capture_step = args.steps // 2 if args.capture_step is None else args.capture_step
    timestep = int(pipe.scheduler.timesteps[capture_step])

    patch = pipe.transformer.config.patch_size
    latent_frames = (call_args["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    grid = LatentGrid(
        latent_frames,
        call_args["height"] // pipe.vae_scale_factor_spatial // patch,
        call_args["width"] // pipe.vae_scale_factor_spatial // patch,
    )
    layout = TokenLayout(grid, text_length=call_args["max_sequence_length"], text_position="prefix")
    structure = AttentionStructure(pipe.transformer, layout, timestep)
    videos = []
    try:
        for index, prompt in enumerate(prompts):
            generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
            output = pipe(prompt, **call_args, generator=generator, output_type="np")
            videos.append(frames_to_array(output.frames[0]))
            print(f"[{time.perf_counter() - started:6.1f}s] {prompt}", flush=True)
    finally:
        structure.remove()

    write_samples_png(videos, prompts, args.samples_png)
    per_head = structure.results()["heads"]
    write_attention_png(structure.offset_maps(), per_head, layout.seq_len, args.attention_png)

    uniform = structure.uniform()
    spatial_threshold = 2 * uniform["within_1_frame"]
    temporal_threshold = 10 * uniform["same_position_other_frames"]

    def ranked(key: str, threshold: float) -> dict:
        heads = sorted(per_head, key=lambda entry: -entry[key])
        return {
            "metric": key,
            "threshold": round(threshold, 4),
            "count": sum(entry[key] >= threshold for entry in per_head),
            "top": [{"layer": e["layer"], "head": e["head"], key: e[key]} for e in heads[:8]],
        }

    report = {
        "what": "attention structure of the dense reference model (vdit_sparse.reference_model)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights": str(args.weights),
        "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "prompts": prompts,
        "call_args": call_args,
        "seed": args.seed,
        "capture": {
            "step": capture_step,
            "timestep": timestep,
            "branch": "conditional",
            "queries": "all video tokens",
            "averaged_over_prompts": structure.captures,
        },
        "layout": {"latent_frames": grid.frames, "rows": grid.height, "cols": grid.width, "text_tokens": layout.text_length},
        "definitions": {
            "own_frame": "mass on video keys in the query's latent frame",
            "within_1_frame": "mass on video keys within +-1 latent frame of the query's",
            "same_position_other_frames": "mass on video keys in other frames within +-1 patch of the query's row and column",
            "text": "mass on the text tokens",
        },
        "uniform": {key: round(value, 4) for key, value in uniform.items()},
        "summary": {
            "spatial_heads": ranked("within_1_frame", spatial_threshold),
            "temporal_heads": ranked("same_position_other_frames", temporal_threshold),
            # the thresholds DESIGN.md section 6 quotes for its earlier run
            "own_frame_above_0.6": sum(entry["own_frame"] > 0.6 for entry in per_head),
            "same_position_above_0.4": sum(entry["same_position_other_frames"] > 0.4 for entry in per_head),
            "max_own_frame": max(entry["own_frame"] for entry in per_head),
        },
        "recompute_max_rel_err": structure.max_rel_err,
        "heads": per_head,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.attention_json.parent.mkdir(parents=True, exist_ok=True)
    args.attention_json.write_text(json.dumps(report, indent=1) + "\n")

    summary = report["summary"]
    print(f"uniform: {report['uniform']}")
    for layer in range(len(pipe.transformer.transformer_blocks)):
        cells = [e for e in per_head if e["layer"] == layer]
        print(f"L{layer} +-1 frame: " + " ".join(f"{e['within_1_frame']:.2f}" for e in cells)
              + " | same pos: " + " ".join(f"{e['same_position_other_frames']:.2f}" for e in cells))
    print(
        f"spatial heads (+-1 frame >= {summary['spatial_heads']['threshold']}): {summary['spatial_heads']['count']}; "
        f"temporal heads (same position >= {summary['temporal_heads']['threshold']}): {summary['temporal_heads']['count']}; "
        f"recompute check {structure.max_rel_err:.2e}; {report['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
