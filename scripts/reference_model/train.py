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

Data: procedural videos of coloured shapes and prompts that describe them
(:mod:`.videos`, ``ShapeVideos``).

Text: the tokenizer and the small T5 of the embedded CogVideoX pipeline. A
frozen random T5 gives nearly the same embedding to prompts one word apart
(cosine 0.95), so the T5 trains together with the transformer (its own
learning rate, ``--text-lr``); both are saved as EMA weights.

The shipped weights (assets/reference-cogvideox.safetensors) came from two
runs on one H200, 880 s in all (the cap is 15 minutes; one device command may
run 10)::

    python -m scripts.reference_model.train --max-seconds 510 --high-noise-share 0.3 --still-share 0.35 \
        --out stage1.safetensors
    python -m scripts.reference_model.train --resume stage1.safetensors --seed 1 --max-seconds 400 \
        --lr 3e-4 --text-lr 6e-4 --high-noise-share 0.3 --still-share 0.35

Their logs are benchmarks/results/reference-training.json and
reference-training-stage2.json; both summaries are stored in the weights
file's metadata too (``scripts.reference_model.weights.read_training_summary()``).
Runs that were measured but not shipped: benchmarks/results/reference-experiments/.

A quick CPU check of the whole path::

    python -m scripts.reference_model.train --device cpu --steps 2 --vae-steps 2 \
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vdit_sparse.reference_model import (
    REFERENCE_CALL_ARGS,
    REFERENCE_CONFIG,
    build_reference_pipeline,
    init_reference_pipeline,
)

from .videos import ShapeVideos, latent_coverage
from .weights import read_training_summary, save_reference_weights

REPO = Path(__file__).resolve().parents[2]


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
    (prompts one word apart). :mod:`.text_embeddings` looks closer.
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
        "what": "vdit_sparse.reference_model trained by scripts/reference_model/train.py",
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
