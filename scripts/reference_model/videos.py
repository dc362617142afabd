"""Procedural videos of coloured shapes, with prompts that describe them: what the reference model
(vdit_sparse.reference_model) is trained on and what its diagnostics render.

Data (DESIGN.md section 6: attention only becomes spatial or temporal when the
data has local spatial correlation and motion everywhere): each video is a
smooth multi-octave noise canvas seen through a window that pans 0.5-1.5
pixels a frame, with one to three coloured shapes (circle, square, rectangle,
triangle, ring, star; some striped or spotted) moving left, right, up or down
at 1.5-3 pixels a frame, some spinning, growing or shrinking, drawn in order so
they occlude one another. The prompt describes them: "striped red circle moving
left spinning and blue square moving up", "yellow star moving right, camera
pans left". The scene statistics are the constants below ``CHANGES``.
"""

from __future__ import annotations

import math
import random
import re

import torch
import torch.nn.functional as F


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
# the chromatic colours, and the prompts of one untextured, rigid, chromatic shape
CHROMATIC = ("red", "orange", "yellow", "green", "blue", "purple", "pink")
SINGLE_SHAPE = re.compile(rf"^({'|'.join(CHROMATIC)}) ({'|'.join(SHAPES)}) moving ({'|'.join(DIRECTIONS)})(, camera pans \w+)?$")


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


