"""Train the reference model of vdit_sparse.reference_model on procedural videos.

Two phases under one wall-clock cap (default 560 s on one H200):

1. The VAE. The demo must decode to a recognisable moving shape, so the latent
   space has to mean pixels. A randomly initialised AutoencoderKLCogVideoX
   decodes anything to noise, and a hand-built identity VAE cannot be written
   into the real class (causal 3D convolutions, spatial norms). So the tiny
   VAE is trained first, briefly, as an autoencoder on the same videos
   (reconstruction MSE plus a very small KL term), through the same
   ``vae.encode``/``vae.decode`` calls the pipeline makes at inference. Its
   ``scaling_factor`` is then measured so the transformer sees unit-variance
   latents, as the real CogVideoX scaling factors are chosen.
2. The transformer and the text encoder, on the frozen VAE's latents of fresh
   videos, with the pipeline's own CogVideoXDDIMScheduler and its prediction
   objective (v-prediction, read from the scheduler config), 10% text dropout
   for classifier-free guidance, bf16 autocast, AdamW and an EMA of the weights.
   With ``--still-share`` a share of the steps trains on stills instead: each
   video's first frame rendered alone and encoded as a one-frame video (one
   latent frame), as image-video joint training does; a still step holds
   ``--still-batch-size`` of them.

Data (DESIGN.md section 6: attention only becomes spatial or temporal when the
data has local spatial correlation and motion everywhere): each video is a
smooth multi-octave noise canvas seen through a window that pans 0.5-1.5
pixels a frame, with one to three coloured shapes (circle, square, rectangle,
triangle, ring, star; some striped or spotted) moving left, right, up or down
at 1.5-3 pixels a frame, some spinning, growing or shrinking, drawn in order so
they occlude one another. The prompt describes them: "striped red circle moving
left spinning and blue square moving up", "yellow star moving right, camera
pans left". The scene statistics are the constants below ``CHANGES``.

Text: the tokenizer and the small T5 of the embedded CogVideoX pipeline. A
frozen random T5 gives nearly the same embedding to prompts one word apart
(cosine 0.95), so the T5 trains together with the transformer (its own
learning rate, ``--text-lr``); both are saved as EMA weights.

The shipped weights (assets/reference-cogvideox.safetensors) came from two
runs on one H200, 880 s in all (the cap is 15 minutes; one device command may
run 10)::

    python scripts/train_reference_model.py --max-seconds 510 --high-noise-share 0.3 --still-share 0.35 \
        --out stage1.safetensors
    python scripts/train_reference_model.py --resume stage1.safetensors --seed 1 --max-seconds 400 \
        --lr 3e-4 --text-lr 6e-4 --high-noise-share 0.3 --still-share 0.35

Their logs are benchmarks/results/reference-training.json and
reference-training-stage2.json; both summaries are stored in the weights
file's metadata too (``vdit_sparse.reference_model.read_training_summary()``).
Runs that were measured but not shipped: benchmarks/results/reference-experiments/.

A quick CPU check of the whole path::

    python scripts/train_reference_model.py --device cpu --steps 2 --vae-steps 2 \
        --batch-size 2 --vae-batch-size 1 --out /tmp/ref.safetensors --log /tmp/ref.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from vdit_sparse.reference_model import (  # noqa: E402
    REFERENCE_CALL_ARGS,
    REFERENCE_CONFIG,
    build_reference_pipeline,
    init_reference_pipeline,
    read_training_summary,
    save_reference_weights,
)

# ---------------------------------------------------------------------------
# Procedural videos
# ---------------------------------------------------------------------------

COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.50, 0.00),
    "yellow": (1.00, 0.90, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 1.00),
    "purple": (0.55, 0.10, 0.80),
    "pink": (1.00, 0.40, 0.75),
    "white": (0.97, 0.97, 0.97),
    "black": (0.03, 0.03, 0.03),
}
SHAPES = ("circle", "square", "rectangle", "triangle", "ring", "star")
TEXTURES = ("", "striped", "spotted")
# screen directions: +x is right, +y is down
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
CHANGES = ("", "spinning", "growing", "shrinking")

# Scene statistics. Motion is what the prompt's direction word has to explain, so
# it is made large against where a shape happens to start: a shape crosses 24-48 px
# of the 64 px frame in 17 frames, and its path's midpoint lies within 8 px of the
# frame's centre. (The first retrained model saw 0.8-2 px a frame and 12 px of
# jitter, and followed the prompt's colour but not its direction.) Larger, plainer
# shapes (radius 12-16 px, 85% single, 80% untextured, 70% rigid) were tried for the
# shape word and did not teach it: benchmarks/results/reference-experiments/.
SHAPE_COUNT_WEIGHTS = (0.7, 0.25, 0.05)  # one, two or three shapes
SPEED_RANGE = (1.5, 3.0)  # pixels a frame
MIDPOINT_JITTER = 8.0  # pixels, each axis
RADIUS_RANGE = (8.0, 12.0)  # pixels
TEXTURE_WEIGHTS = (0.6, 0.2, 0.2)  # of TEXTURES, in scenes of one or two shapes
CHANGE_WEIGHTS = (0.5, 0.2, 0.15, 0.15)  # of CHANGES, likewise
PAN_PHRASE_SHARE = 0.5  # single-shape prompts that also name the camera's pan
# A shape turned at random averages, over its unknown turn, to a round blob; an
# upright one (ShapeVideos' upright_share, --upright-share) starts at the turn
# below: square and rectangle axis-aligned, the triangle's and the star's point up.
# Trained with --upright-share 1, the model drew every shape as the same boxy blob
# and the shape word stayed at chance (benchmarks/results/reference-experiments/).
UPRIGHT_ANGLE = {"triangle": math.pi, "star": -math.pi / 2}  # radians; other shapes 0


def _direction_word(dx: float, dy: float) -> str:
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def shape_distance(kind: str, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Signed distance-like value of one of the SHAPES at shape-local coordinates.

    ``u`` and ``w`` are in units of the shape's radius (the frame that turns and
    scales with the shape); the value is < 0 inside, in the same units.
    """
    if kind == "circle":
        return torch.sqrt(u * u + w * w + 1e-8) - 1.0
    if kind == "square":
        return torch.maximum(u.abs(), w.abs()) - 0.85
    if kind == "rectangle":
        return torch.maximum(u.abs() - 1.2, w.abs() - 0.55)
    if kind == "triangle":  # circumradius 1.1
        sides = [u * math.cos(a) + w * math.sin(a) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return torch.stack(sides).amax(0) - 0.55
    if kind == "ring":
        return (torch.sqrt(u * u + w * w + 1e-8) - 0.75).abs() - 0.25
    if kind == "star":  # five-pointed
        return torch.sqrt(u * u + w * w + 1e-8) - (0.72 + 0.28 * torch.cos(5 * torch.atan2(w, u)))
    raise ValueError(f"unknown shape {kind!r}; shapes: {SHAPES}")


def shape_distances(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:func:`shape_distance` of every one of the SHAPES, stacked first."""
    return torch.stack([shape_distance(kind, u, w) for kind in SHAPES])


class ShapeVideos:
    """Random videos ``(B, 3, T, H, W)`` in [-1, 1] with prompts that describe them.

    Scene parameters are drawn on the CPU with ``random.Random(seed)`` (prompts
    are strings anyway); pixels are rendered on ``device`` in one vectorised pass.
    """

    MAX_SHAPES = 3

    def __init__(self, frames: int, size: int, device: torch.device, seed: int, upright_share: float = 0.0):
        if not 0 <= upright_share <= 1:
            raise ValueError(f"upright_share must be in [0, 1], got {upright_share}")
        self.frames, self.size, self.device = frames, size, torch.device(device)
        self.upright_share = upright_share
        # its own stream, so that the scenes (and prompts) of a seed do not depend on upright_share
        self.upright_rng = random.Random(seed + 1_000_003)
        self.rng = random.Random(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # the window pans at most 1.5 px a frame, so the canvas needs that much margin each way
        self.max_pan = 1.5
        self.margin = math.ceil(self.max_pan * (frames - 1) / 2) + 4
        self.canvas = size + 2 * self.margin

    def _scene(self):
        rng = self.rng
        count = rng.choices((1, 2, 3), weights=SHAPE_COUNT_WEIGHTS)[0]
        colours = rng.sample(sorted(COLOURS), count)
        centre, shapes, phrases = (self.size - 1) / 2, [], []
        for colour in colours:
            kind = rng.choice(SHAPES)
            # three shapes fill the 16 text tokens with "colour shape moving dir" alone
            texture = rng.choices(TEXTURES, weights=TEXTURE_WEIGHTS)[0] if count < 3 else ""
            change = rng.choices(CHANGES, weights=CHANGE_WEIGHTS)[0] if count < 3 else ""
            direction = rng.choice(sorted(DIRECTIONS))
            angle = math.atan2(DIRECTIONS[direction][1], DIRECTIONS[direction][0]) + rng.uniform(-0.2, 0.2)
            speed = rng.uniform(*SPEED_RANGE)
            vx, vy = speed * math.cos(angle), speed * math.sin(angle)
            mid_x, mid_y = (centre + rng.uniform(-MIDPOINT_JITTER, MIDPOINT_JITTER) for _ in range(2))
            half = (self.frames - 1) / 2  # the path is centred: the shape is at mid at the middle frame
            spin = rng.choice((-1, 1)) * rng.uniform(0.15, 0.3) if change == "spinning" else 0.0
            angle0 = rng.uniform(0, 2 * math.pi)
            if self.upright_rng.random() < self.upright_share:
                angle0 = UPRIGHT_ANGLE.get(kind, 0.0)
            growth = {"growing": 1.0, "shrinking": -1.0}.get(change, 0.0) * math.log(2.0) / (self.frames - 1)
            shapes.append(
                dict(
                    kind=SHAPES.index(kind),
                    texture=TEXTURES.index(texture),
                    colour=COLOURS[colour],
                    x0=mid_x - vx * half,
                    y0=mid_y - vy * half,
                    vx=vx,
                    vy=vy,
                    angle0=angle0,
                    spin=spin,
                    size0=rng.uniform(*RADIUS_RANGE),
                    growth=growth,
                )
            )
            phrases.append(" ".join(word for word in (texture, colour, kind, "moving", direction, change) if word))
        pan_angle, pan_speed = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, self.max_pan)
        pan = (pan_speed * math.cos(pan_angle), pan_speed * math.sin(pan_angle))
        prompt = " and ".join(phrases)
        if count == 1 and rng.random() < PAN_PHRASE_SHARE:
            prompt += ", camera pans " + _direction_word(*pan)
        return shapes, pan, prompt

    def _smooth_noise(self, batch: int, channels: int) -> torch.Tensor:
        """Multi-octave noise on the canvas, unit std per video: correlated over 8 to 40 pixels."""
        total = torch.zeros(batch, channels, self.canvas, self.canvas, device=self.device)
        for cells, amplitude in ((3, 1.0), (6, 0.5), (12, 0.25)):
            coarse = torch.randn(batch, channels, cells, cells, device=self.device, generator=self.generator)
            total += amplitude * F.interpolate(coarse, size=(self.canvas, self.canvas), mode="bicubic", align_corners=False)
        return total / total.flatten(1).std(dim=1).view(batch, 1, 1, 1)

    def _background(self, pans: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Muted noise canvases seen through a window panning at ``pans`` (B, 2) px a frame,
        at the frame indices ``t`` (T,): (B, T, 3, H, W)."""
        batch, frames, size, device = pans.shape[0], len(t), self.size, self.device
        grey = 0.3 + 0.4 * torch.rand(batch, 1, 1, 1, device=device, generator=self.generator)
        canvas = grey + 0.18 * self._smooth_noise(batch, 1) + 0.05 * self._smooth_noise(batch, 3)
        t = t - (self.frames - 1) / 2
        origin = self.margin + pans[:, None, :] * t[None, :, None]  # (B, T, 2) window corner, canvas px
        pixel = torch.arange(size, device=device, dtype=torch.float32)
        x = pixel.view(1, 1, 1, size) + origin[..., 0, None, None]
        y = pixel.view(1, 1, size, 1) + origin[..., 1, None, None]
        # grid_sample, align_corners=False: pixel centre i sits at (2 i + 1) / n - 1
        grid = torch.stack(
            [((2 * x + 1) / self.canvas - 1).expand(-1, -1, size, size), ((2 * y + 1) / self.canvas - 1).expand(-1, -1, size, size)],
            dim=-1,
        )
        frames_of = canvas[:, None].expand(-1, frames, -1, -1, -1).reshape(batch * frames, 3, self.canvas, self.canvas)
        window = F.grid_sample(frames_of, grid.view(batch * frames, size, size, 2), mode="bilinear", align_corners=False)
        return window.view(batch, frames, 3, size, size)

    def sample(self, batch: int, with_coverage: bool = False, scenes: list | None = None, frames: int | None = None):
        """``batch`` videos and their prompts; with ``with_coverage`` also the shapes' coverage
        ``(B, T, H, W)`` in [0, 1] (how much of each pixel the shapes cover).

        ``scenes`` renders the given ``(shapes, pan, prompt)`` triples (as ``_scene`` draws
        them) instead of drawing ``batch`` new ones; the backgrounds are still drawn.
        ``frames`` renders only the first ``frames`` frames of each video (1: a still of
        its first frame, which the causal VAE encodes as it encodes a video's first frame).
        """
        scenes = [self._scene() for _ in range(batch)] if scenes is None else list(scenes)
        batch = len(scenes)
        frames = self.frames if frames is None else frames
        if not 1 <= frames <= self.frames:
            raise ValueError(f"frames must be in 1..{self.frames}, got {frames}")
        device, size, slots = self.device, self.size, self.MAX_SHAPES
        fields = ("kind", "texture", "x0", "y0", "vx", "vy", "angle0", "spin", "size0", "growth")
        # one row per slot: the fields, the colour, present; empty slots all zero. Built as
        # Python lists and copied once (element-wise tensor writes cost 30 ms a still batch)
        empty = [0.0] * (len(fields) + 4)
        rows = [
            [[float(shape[field]) for field in fields] + list(shape["colour"]) + [1.0] for shape in shapes]
            + [empty] * (slots - len(shapes))
            for shapes, _, _ in scenes
        ]
        packed = torch.tensor(rows, dtype=torch.float32).to(device)  # (B, slots, fields + 4)
        table, colours, present = packed[..., : len(fields)].movedim(-1, 0), packed[..., -4:-1], packed[..., -1]
        kind, texture, x0, y0, vx, vy, angle0, spin, size0, growth = table
        size0 = torch.where(present > 0, size0, 1.0)  # empty slots: alpha is zeroed below, but keep them finite
        pans = torch.tensor([pan for _, pan, _ in scenes], device=device, dtype=torch.float32)

        t = torch.arange(frames, device=device, dtype=torch.float32)
        video = self._background(pans, t)  # (B, T, 3, H, W)
        t_mid = t - (self.frames - 1) / 2
        # per shape and frame: (B, K, T, 1, 1)
        expand = lambda v: v[:, :, None, None, None]  # noqa: E731
        tt = t.view(1, 1, frames, 1, 1)
        cx, cy = expand(x0) + expand(vx) * tt, expand(y0) + expand(vy) * tt
        theta = expand(angle0) + expand(spin) * tt
        scale = expand(size0) * torch.exp(expand(growth) * t_mid.view(1, 1, frames, 1, 1))
        pixel = torch.arange(size, device=device, dtype=torch.float32)
        dx, dy = pixel.view(1, 1, 1, 1, size) - cx, pixel.view(1, 1, 1, size, 1) - cy
        # shape-local coordinates in units of the shape's radius (they rotate and scale with it)
        u = (torch.cos(theta) * dx + torch.sin(theta) * dy) / scale
        w = (-torch.sin(theta) * dx + torch.cos(theta) * dy) / scale
        distance = torch.gather(shape_distances(u, w), 0, kind.long()[None, :, :, None, None, None].expand(1, -1, -1, frames, size, size))[0]
        alpha = torch.sigmoid(-distance * scale / 0.6) * present[:, :, None, None, None]  # 0.6 px soft edge

        # textures live in shape-local pixels, so they move, turn and scale with the shape
        local_u, local_w = u * scale, w * scale
        stripes = 0.5 + 0.5 * torch.tanh(3 * torch.sin(2 * math.pi * local_u / 6.0))
        spots = torch.sigmoid(8 * (torch.cos(2 * math.pi * local_u / 7.0) * torch.cos(2 * math.pi * local_w / 7.0) - 0.4))
        pattern = torch.where(texture[:, :, None, None, None] == 1, stripes, torch.where(texture[:, :, None, None, None] == 2, spots, 0.0))
        luma = (colours * torch.tensor([0.3, 0.59, 0.11], device=device)).sum(-1, keepdim=True)
        second = torch.where(luma > 0.5, 0.3 * colours, 0.35 * colours + 0.65)  # darker on bright, lighter on dark
        for k in range(slots):
            first_k, second_k = colours[:, k, None, :, None, None], second[:, k, None, :, None, None]  # (B, 1, 3, 1, 1)
            shade = first_k + (second_k - first_k) * pattern[:, k, :, None]  # (B, T, 3, H, W)
            a = alpha[:, k, :, None]
            video = video * (1 - a) + a * shade
        video = video.clamp(0, 1) * 2 - 1
        video, prompts = video.permute(0, 2, 1, 3, 4).contiguous(), [prompt for _, _, prompt in scenes]
        if not with_coverage:
            return video, prompts
        coverage = 1 - torch.prod(1 - alpha, dim=1)  # (B, T, H, W): union of the shapes
        return video, prompts, coverage


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _lr_factor(progress: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor``; ``progress`` in [0, 1] (steps or time, whichever is further)."""
    if progress < warmup:
        return progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    return floor + (1 - floor) * cosine


def _curve(losses: list[float], points: int = 40) -> list[list[float]]:
    """The loss curve as ``points`` (step, mean loss over the window ending there) pairs."""
    if not losses:
        return []
    window = max(1, len(losses) // points)
    return [[end, sum(losses[end - window : end]) / window] for end in range(window, len(losses) + 1, window)]


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class PhaseTimer:
    """Where a training step's time goes, with ``--time-phases``.

    ``mark(name)`` charges the time since the previous mark to ``name``. CUDA runs
    asynchronously, so each mark first waits for the device (which slows training
    a little: the option is for measuring, not for the shipped runs). Disabled, a
    mark does nothing. Steps before ``skip`` (cuDNN autotuning, allocator growth)
    are not counted. Steps of another kind than ``"video"`` (``start_step(step,
    "still")``) charge phases named ``"still/<name>"``, averaged over their own steps.
    """

    def __init__(self, enabled: bool, device: torch.device, skip: int = 20):
        self.enabled, self.device, self.skip = enabled, device, skip
        self.totals: dict[str, float] = {}
        self.kind_of: dict[str, str] = {}  # phase name -> the kind of step it belongs to
        self.steps_of: dict[str, int] = {}
        self._last, self._counting, self._kind = None, False, "video"

    @property
    def steps(self) -> int:
        return sum(self.steps_of.values())

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start_step(self, step: int, kind: str = "video") -> None:
        if self.enabled:
            self._kind, self._counting = kind, step >= self.skip
            if self._counting:
                self.steps_of[kind] = self.steps_of.get(kind, 0) + 1
            self._last = self._now()

    def mark(self, name: str) -> None:
        if not self.enabled:
            return
        now = self._now()
        if self._counting:
            key = name if self._kind == "video" else f"{self._kind}/{name}"
            self.totals[key] = self.totals.get(key, 0.0) + now - self._last
            self.kind_of[key] = self._kind
        self._last = now

    def report(self) -> dict | None:
        """Mean milliseconds per step of its kind for each phase, and each phase's share of all the time."""
        if not self.enabled or self.steps == 0:
            return None
        total = sum(self.totals.values())
        report = {
            "steps_measured": self.steps,
            "ms_per_step": {
                name: round(1e3 * seconds / self.steps_of[self.kind_of[name]], 2) for name, seconds in self.totals.items()
            },
            "share": {name: round(seconds / total, 3) for name, seconds in self.totals.items()},
        }
        if set(self.steps_of) != {"video"}:
            report["steps_measured_by_kind"] = dict(self.steps_of)
        return report


def train_vae(vae, data: ShapeVideos, args, deadline: float, log: dict) -> None:
    device = data.device
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, losses, step = time.perf_counter(), [], 0
    budget = max(1e-6, deadline - start)
    while step < args.vae_steps and time.perf_counter() < deadline:
        progress = max(step / args.vae_steps, (time.perf_counter() - start) / budget)
        for group in optimizer.param_groups:
            group["lr"] = args.vae_lr * _lr_factor(progress)
        video, _ = data.sample(args.vae_batch_size)
        with _autocast(device):
            posterior = vae.encode(video).latent_dist
            recon = vae.decode(posterior.sample(generator=data.generator)).sample
        reconstruction = F.mse_loss(recon.float(), video)
        # a KL term this small only keeps the posterior's scale sane; the latents stay informative
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
        loss = reconstruction + args.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(reconstruction.item())
        step += 1
        if step % 100 == 0 or step == 1:
            print(f"vae step {step:5d}  mse {losses[-1]:.5f}  kl {kl.item():.3f}  {time.perf_counter() - start:6.1f}s", flush=True)
    vae.eval().requires_grad_(False)

    # held-out reconstruction and the latent scale (the transformer should see unit variance)
    with torch.no_grad(), _autocast(device):
        latents, errors = [], []
        for _ in range(4):
            video, _ = data.sample(args.vae_batch_size)
            posterior = vae.encode(video).latent_dist
            recon = vae.decode(posterior.mode()).sample.float().clamp(-1, 1)
            errors.append(F.mse_loss((recon + 1) / 2, (video + 1) / 2).item())
            latents.append(posterior.sample(generator=data.generator).float())
        latents = torch.cat(latents)
    mse01 = sum(errors) / len(errors)
    scaling_factor = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    log["vae"] = {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "batch_size": args.vae_batch_size,
        "final_mse": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "heldout_psnr_db": round(10 * math.log10(1.0 / max(mse01, 1e-12)), 2),
        "latent_mean": latents.mean().item(),
        "latent_std": latents.std().item(),
        "scaling_factor": scaling_factor,
        "loss_curve": _curve(losses),
    }
    print(f"vae: {step} steps, held-out PSNR {log['vae']['heldout_psnr_db']} dB, scaling factor {scaling_factor:.4f}", flush=True)


SIMILARITY_PROMPTS = (
    "red circle moving right",
    "blue circle moving right",
    "red circle moving left",
    "red square moving right",
    "green triangle moving up spinning",
    "yellow star moving down, camera pans left",
    "striped purple ring moving left and orange rectangle moving down",
    "",
)


def prompt_similarity(pipe, device: torch.device) -> dict:
    """Pairwise cosine similarity of the prompt embeddings (flattened) of SIMILARITY_PROMPTS.

    Close to 1 means the transformer sees nearly the same conditioning whatever
    the prompt; the untrained T5 gives a mean of 0.68 and a maximum of 0.97 here
    (prompts one word apart). scripts/text_embedding_similarity.py looks closer.
    """
    with torch.no_grad():
        text, _ = pipe.encode_prompt(
            list(SIMILARITY_PROMPTS),
            do_classifier_free_guidance=False,
            max_sequence_length=REFERENCE_CALL_ARGS["max_sequence_length"],
            device=device,
        )
    flat = F.normalize(text.float().flatten(1), dim=1)
    cosine = flat @ flat.T
    off_diagonal = cosine[~torch.eye(len(flat), dtype=torch.bool, device=cosine.device)]
    return {
        "prompts": list(SIMILARITY_PROMPTS),
        "min": round(off_diagonal.min().item(), 4),
        "mean": round(off_diagonal.mean().item(), 4),
        "max": round(off_diagonal.max().item(), 4),
    }


def latent_coverage(coverage: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
    """Pixel coverage ``(B, T, H, W)`` pooled onto the latents ``(B, F, C, h, w)``: ``(B, F, 1, h, w)``.

    The causal VAE keeps frame 0 alone and then compresses time in pairs; each
    latent frame takes the largest coverage of the frames it holds and the mean
    over the pixels of each latent pixel.
    """
    batch, frames, _, height, width = latent_shape
    first, rest = coverage[:, :1], coverage[:, 1:]
    timed = first
    if frames > 1:
        pairs = rest.reshape(batch, frames - 1, -1, *rest.shape[-2:]).amax(dim=2)
        timed = torch.cat([first, pairs], dim=1)  # (B, F, H, W)
    return F.adaptive_avg_pool2d(timed, (height, width))[:, :, None]


def train_transformer(pipe, data: ShapeVideos, args, deadline: float, log: dict) -> None:
    """Train the transformer and, jointly, the small T5 text encoder (a frozen random T5
    gives nearly identical embeddings to prompts one word apart, so text conditioning stays weak)."""
    device, transformer, text_encoder, vae, scheduler = (
        data.device,
        pipe.transformer,
        pipe.text_encoder,
        pipe.vae,
        pipe.scheduler,
    )
    prediction = scheduler.config.prediction_type
    if prediction not in ("v_prediction", "epsilon"):
        raise ValueError(f"scheduler prediction_type {prediction!r} is not one this script trains for")
    frames = (REFERENCE_CALL_ARGS["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    height, width = REFERENCE_CALL_ARGS["height"], REFERENCE_CALL_ARGS["width"]
    # what a step of each kind renders (video frames), how many, and its rotary embedding
    kinds = {
        "video": (data.frames, args.batch_size, pipe._prepare_rotary_positional_embeddings(height, width, frames, device)),
        "still": (1, args.still_batch_size, pipe._prepare_rotary_positional_embeddings(height, width, 1, device)),
    }
    similarity_before = prompt_similarity(pipe, device)
    transformer.train().requires_grad_(True)
    # the T5 stays in eval mode (no dropout) but learns
    text_encoder.eval().requires_grad_(args.text_lr > 0)
    trained = [(transformer, args.lr)] + ([(text_encoder, args.text_lr)] if args.text_lr > 0 else [])
    averages = [(copy.deepcopy(module).eval().requires_grad_(False), module) for module, _ in trained]
    optimizer = torch.optim.AdamW(
        [{"params": list(module.parameters()), "lr": lr, "base_lr": lr} for module, lr in trained],
        betas=(0.9, 0.99),
        weight_decay=0.01,
    )
    start, step, steady_from = time.perf_counter(), 0, None
    samples = {kind: 0 for kind in kinds}
    losses_of = {kind: [] for kind in kinds}
    losses = losses_of["video"]  # the curve and final loss the logs have always reported
    still_credit = 0.0
    budget = max(1e-6, deadline - start)
    text_len = REFERENCE_CALL_ARGS["max_sequence_length"]
    timer = PhaseTimer(args.time_phases, device)
    # compiled for the training forward only: the EMA copies and the saved modules stay the plain ones
    forward = torch.compile(transformer) if args.compile else transformer
    while step < args.steps and time.perf_counter() < deadline:
        # --still-share of the steps, spread evenly, train on stills (first frames alone), the rest on videos
        still_credit += args.still_share
        kind = "still" if still_credit >= 1 else "video"
        still_credit -= kind == "still"
        render_frames, batch_size, rotary = kinds[kind]
        timer.start_step(step, kind)
        progress = max(step / args.steps, (time.perf_counter() - start) / budget)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(progress)
        if args.foreground_weight > 0:
            video, prompts, coverage = data.sample(batch_size, with_coverage=True, frames=render_frames)
        else:
            video, prompts = data.sample(batch_size, frames=render_frames)
        samples[kind] += batch_size
        # classifier-free guidance: the pipeline's unconditional branch encodes the empty prompt
        prompts = ["" if data.rng.random() < args.cfg_dropout else prompt for prompt in prompts]
        timer.mark("render")
        with torch.no_grad(), _autocast(device):
            latents = vae.encode(video).latent_dist.sample(generator=data.generator).float()
        timer.mark("vae_encode")
        with torch.set_grad_enabled(args.text_lr > 0), _autocast(device):
            text, _ = pipe.encode_prompt(
                prompts, do_classifier_free_guidance=False, max_sequence_length=text_len, device=device
            )
        timer.mark("text_encode")
        # the pipeline's latents are (B, F, C, H, W) and scaled by the VAE's scaling factor
        latents = latents.permute(0, 2, 1, 3, 4) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, device=device, generator=data.generator)
        steps_total = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps_total, (latents.shape[0],), device=device, generator=data.generator)
        if args.high_noise_share > 0:
            # a share of the batch from the noisier half, where layout and motion are decided
            high = torch.rand(latents.shape[0], device=device, generator=data.generator) < args.high_noise_share
            timesteps = torch.where(high, steps_total // 2 + timesteps // 2, timesteps)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps) if prediction == "v_prediction" else noise
        with _autocast(device):
            output = forward(
                hidden_states=noisy,
                encoder_hidden_states=text.float(),
                timestep=timesteps,
                image_rotary_emb=rotary,
                return_dict=False,
            )[0]
        if args.foreground_weight > 0:
            # weight the shapes' latents up, so their form and motion count beside the background
            weight = 1 + args.foreground_weight * latent_coverage(coverage, latents.shape)
            loss = (weight * (output.float() - target) ** 2).mean() / weight.mean()
        else:
            loss = F.mse_loss(output.float(), target)
        timer.mark("noise_and_forward")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        timer.mark("backward")
        for module, _ in trained:
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        timer.mark("clip_and_optimizer")
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, live in averages:  # one fused update per module, not one per tensor
                torch._foreach_lerp_(list(average.parameters()), list(live.parameters()), 1 - decay)
        timer.mark("ema")
        losses_of[kind].append(loss.item())
        timer.mark("loss_readback")
        if step == 20:
            steady_from = time.perf_counter()  # past cuDNN's autotuning and the allocator's growth
        if step % 200 == 0 or step == 1:
            recent = " ".join(
                f"{name} loss {sum(values[-100:]) / len(values[-100:]):.4f}" for name, values in losses_of.items() if values
            )
            print(f"step {step:5d}  {recent}  lr {optimizer.param_groups[0]['lr']:.2e}  {time.perf_counter() - start:6.1f}s", flush=True)
    seconds = time.perf_counter() - start
    for average, live in averages:
        live.load_state_dict(average.state_dict())
    transformer.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    log["transformer"] = {
        "steps": step,
        "seconds": round(seconds, 1),
        "batch_size": args.batch_size,
        "videos": samples["video"],
        "still_share": args.still_share,
        "still_batch_size": args.still_batch_size,
        "stills": samples["still"],
        "still_final_loss": sum(losses_of["still"][-100:]) / len(losses_of["still"][-100:]) if losses_of["still"] else None,
        "samples_per_second": round(samples["video"] / max(seconds, 1e-6), 1),  # videos, as before stills
        "stills_per_second": round(samples["still"] / max(seconds, 1e-6), 1),
        "steady_samples_per_second": (
            round((step - 20) * args.batch_size / max(start + seconds - steady_from, 1e-6), 1)
            if steady_from is not None and step > 20 and args.still_share == 0
            else None
        ),
        "prediction_type": prediction,
        "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "first_loss": losses[0] if losses else None,
        "loss_curve": _curve(losses),  # over the video steps alone
        "lr": args.lr,
        "text_encoder_lr": args.text_lr,
        "ema_decay": args.ema_decay,
        "cfg_dropout": args.cfg_dropout,
        "high_noise_share": args.high_noise_share,
        "foreground_weight": args.foreground_weight,
        "compiled": args.compile,
        "saved": "EMA weights" + (" (transformer and text encoder)" if args.text_lr > 0 else ""),
        "prompt_similarity_before": similarity_before,
        "prompt_similarity_after": prompt_similarity(pipe, device),
    }
    if args.time_phases:
        log["transformer"]["phases"] = timer.report()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "assets" / "reference-cogvideox.safetensors")
    parser.add_argument("--log", type=Path, default=REPO / "benchmarks" / "results" / "reference-training.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=560.0, help="wall-clock cap for the whole run, both phases")
    parser.add_argument("--vae-seconds", type=float, default=100.0, help="wall-clock cap for the VAE phase")
    parser.add_argument("--vae-steps", type=int, default=100_000)
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-kl-weight", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=100_000, help="transformer steps (the time cap usually ends it first)")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--text-lr", type=float, default=1e-3, help="the T5 text encoder's learning rate; 0 keeps it frozen")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--cfg-dropout", type=float, default=0.1)
    parser.add_argument(
        "--high-noise-share", type=float, default=0.0, help="share of samples drawn from the noisier half of the timesteps"
    )
    parser.add_argument(
        "--still-share",
        type=float,
        default=0.0,
        help="share of the transformer steps that train on stills (each video's first frame alone, one latent "
        "frame, as image-video joint training does) instead of videos",
    )
    parser.add_argument("--still-batch-size", type=int, default=192, help="stills in a still step")
    parser.add_argument(
        "--upright-share",
        type=float,
        default=0.0,
        help="share of shapes that start upright (UPRIGHT_ANGLE) rather than turned at random; 0 draws the "
        "shipped model's videos",
    )
    parser.add_argument(
        "--foreground-weight",
        type=float,
        default=0.0,
        help="extra loss weight on latents the shapes cover (0: plain MSE; 5 for 285 s gave oversized blobs, "
        "benchmarks/results/reference-experiments/)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer for training (each step kind compiles once)"
    )
    parser.add_argument(
        "--time-phases",
        action="store_true",
        help="measure where each transformer step's time goes (waits for the GPU at each phase, so a little slower); "
        "recorded in the log under transformer.phases",
    )
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help=f"transformer depth (default {REFERENCE_CONFIG['transformer']['num_layers']}, REFERENCE_CONFIG's; the "
        "weights record it and build_reference_pipeline builds it). A resumed run keeps its file's depth",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue from weights this script wrote: the VAE is kept as is, only the transformer and text encoder train",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.still_share < 1:
        parser.error(f"--still-share must be in [0, 1), got {args.still_share}")
    if not 0 <= args.upright_share <= 1:
        parser.error(f"--upright-share must be in [0, 1], got {args.upright_share}")
    if args.num_layers is not None and args.num_layers < 1:
        parser.error(f"--num-layers must be at least 1, got {args.num_layers}")

    started = time.perf_counter()
    reserve = 15.0  # for measuring the latent scale and saving
    device = torch.device(args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes throughout
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    previous = None
    if args.resume is not None:
        previous = read_training_summary(args.resume)
        if previous is None:
            raise SystemExit(f"--resume {args.resume}: the file holds no training summary; was it written by this script?")
        pipe = build_reference_pipeline(args.resume)
        depth = pipe.transformer.config.num_layers
        if args.num_layers is not None and args.num_layers != depth:
            parser.error(f"--num-layers {args.num_layers}: --resume {args.resume} holds a {depth}-layer transformer")
    else:
        pipe = init_reference_pipeline(seed=args.seed, num_layers=args.num_layers)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, device=device)
    data = ShapeVideos(
        REFERENCE_CALL_ARGS["num_frames"], REFERENCE_CALL_ARGS["height"], device, args.seed, upright_share=args.upright_share
    )

    import diffusers
    import transformers

    log = {
        "what": "vdit_sparse.reference_model trained by scripts/train_reference_model.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
        },
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "example_prompts": data.sample(6)[1],
    }
    if previous is None:
        vae_deadline = started + min(args.vae_seconds, args.max_seconds - reserve)
        train_vae(pipe.vae, data, args, vae_deadline, log)
    else:
        log["resumed_from"] = {"path": str(args.resume), "training": previous}
    train_transformer(pipe, data, args, started + args.max_seconds - reserve, log)

    log["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary = {
        "date": log["date"],
        "device": log["device"],
        "torch": torch.__version__,
        "vae_steps": log["vae"]["steps"] if previous is None else previous["vae_steps"],
        "transformer_steps": log["transformer"]["steps"],
        "final_loss": log["transformer"]["final_loss"],
        "wall_seconds": log["wall_seconds"],
    }
    if previous is not None:
        summary["resumed_from"] = previous
        summary["total_transformer_steps"] = previous.get("total_transformer_steps", previous["transformer_steps"]) + summary["transformer_steps"]
        summary["total_wall_seconds"] = round(previous.get("total_wall_seconds", previous["wall_seconds"]) + log["wall_seconds"], 1)
        log["totals"] = {key: summary[key] for key in ("total_transformer_steps", "total_wall_seconds")}
    path = save_reference_weights(pipe, args.out, training=summary)
    log["weights"] = {"path": str(path), "megabytes": round(path.stat().st_size / 2**20, 2)}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({key: log[key] for key in ("device", "wall_seconds", "weights")}), flush=True)
    print(
        f"done: vae {summary['vae_steps']} steps, transformer "
        f"{log['transformer']['steps']} steps, final loss {log['transformer']['final_loss']:.4f}, "
        f"{log['wall_seconds']} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
