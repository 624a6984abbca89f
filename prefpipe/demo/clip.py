"""The demo's learned scorer: a small CLIP (open_clip's architecture) trained contrastively on the drawn world.

`make demo-feedback` needs AI feedback that *reads the prompt*, as PickScore or HPSv2 do, and no hub is
reachable; so, as the base model is, the scorer is learnt here, on the drawn images and their captions
(`prefpipe/demo/world.py`), and saved in open_clip's hub format (`open_clip_config.json` +
`open_clip_model.safetensors`, what `prefpipe/testing/scorers.py` writes), which the real `clip` scorer
loads: `prefpipe label --scorer clip --weights clip=DIR`.

**The model.** open_clip's own `CLIP` built from a config (a ViT on 32 px images with 4 px patches, a
causal text transformer on the real CLIP BPE tokenizer and vocabulary), so the score is the real one:
`100 * max(cos(image, text), 0)` after open_clip's eval transform (at 32 px a resize to 32 and a centre
crop: the image unchanged, then OpenAI's mean and std).

**The loss.** CLIP's symmetric InfoNCE with two departures, both because the world is small: the
image-to-text side ranks each image's caption against *every* caption of the world (90: in a batch of
random captions, "a red circle on a blue background" rarely meets its hard negative "a blue circle on a
red background"), and the text-to-image side counts every image of the batch drawn with the same caption
as a positive (90 captions repeat within a batch). Images are drawn afresh at every step (with mild
blur, colour jitter and noise: the diffusion model's samples are softer than the drawings), so the scorer
sees no image twice and never any image the base model generated.

**Independence from the oracle.** The oracle (`prefpipe/demo/oracle.py`) reads colours and shapes from
pixels by rule; this scorer learns from captions alone, never sees the oracle, and is judged by it.

**The cache.** `OUT/prefpipe_demo_clip.json` records the config, the loss curve, timings and a measured
accuracy (which of the 90 captions scores highest, on fresh drawn images); a folder whose record holds
the same config is reused, any other config retrains (as `prefpipe demo-model` does for the base).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click
import numpy as np

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import atomic_output
from prefpipe.demo.cache import ConfigCache
from prefpipe.demo.model import reproducible
from prefpipe.demo.world import SIDE, caption, combinations, draw_dataset

CLIP_FORMAT = 1  # bump when drawing, training or measuring changes what a config produces
CACHE = ConfigCache("demo-clip", record="prefpipe_demo_clip.json", marker="open_clip_model.safetensors",
                    version=CLIP_FORMAT)


@dataclass
class ClipConfig:
    """Everything the trained scorer depends on (the cache key). Defaults: the demo's scorer."""

    seed: int = 0
    steps: int = 500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.05
    embed_dim: int = 64
    vision_width: int = 64
    vision_layers: int = 3
    patch_size: int = 8
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 16  # the longest caption is 10 tokens with its start and end tokens
    blur: float = 1.0  # largest Gaussian blur sigma (px) of the augmentation; 0: none
    jitter: float = 0.08  # brightness / saturation jitter (fraction); 0: none
    noise: float = 6.0  # largest pixel noise std (of 255); 0: none
    eval_images: int = 512  # fresh drawn images for the recorded accuracy

    def model_cfg(self) -> dict:
        """open_clip's `model_cfg` (what open_clip_config.json holds)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": SIDE, "layers": self.vision_layers, "width": self.vision_width,
                           "head_width": 32, "patch_size": self.patch_size},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                         "heads": max(1, self.text_width // 32), "layers": self.text_layers},
        }


QUICK = ClipConfig(steps=30, batch_size=32, eval_images=64)


# ------------------------------------------------------------------------------------------------------
# Data: drawn images, augmented
# ------------------------------------------------------------------------------------------------------


def augment(pixels: np.ndarray, rng: np.random.Generator, cfg: ClipConfig) -> np.ndarray:
    """(N, 32, 32, 3) uint8 -> float32 in [0, 1]: per image a random blur, brightness/saturation jitter, noise."""
    import torch

    x = torch.from_numpy(pixels).float().div(255).permute(0, 3, 1, 2)
    n = len(x)
    if cfg.blur > 0:
        sigma = torch.from_numpy(rng.uniform(0, cfg.blur, n)).float().clamp(min=1e-3)
        k = torch.arange(-2, 3).float()
        kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2))
        kern = kern / kern.sum(1, keepdim=True)  # (n, 5)
        f = torch.nn.functional
        x = x.reshape(1, n * 3, SIDE, SIDE)
        kx = kern.repeat_interleave(3, 0)[:, None, None, :]
        x = f.conv2d(f.pad(x, (2, 2, 0, 0), mode="replicate"), kx, groups=n * 3)
        x = f.conv2d(f.pad(x, (0, 0, 2, 2), mode="replicate"), kx.transpose(2, 3), groups=n * 3)
        x = x.reshape(n, 3, SIDE, SIDE)
    if cfg.jitter > 0:
        bright = torch.from_numpy(rng.uniform(1 - cfg.jitter, 1 + cfg.jitter, (n, 1, 1, 1))).float()
        sat = torch.from_numpy(rng.uniform(1 - cfg.jitter, 1 + cfg.jitter, (n, 1, 1, 1))).float()
        grey = x.mean(1, keepdim=True)
        x = (grey + (x - grey) * sat) * bright
    if cfg.noise > 0:
        std = torch.from_numpy(rng.uniform(0, cfg.noise / 255, (n, 1, 1, 1))).float()
        x = x + std * torch.from_numpy(rng.standard_normal(x.shape)).float()
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------


def build_clip(cfg: ClipConfig):
    """(model, tokenizer): open_clip's CLIP of `cfg.model_cfg()` with open_clip's own initialisation."""
    import torch

    from labelers.hpsv2 import build_open_clip

    torch.manual_seed(cfg.seed)
    return build_open_clip(cfg.model_cfg())


def normalise(x):
    """[0, 1] images -> open_clip's input (OpenAI mean and std, as the eval transform applies them)."""
    import torch

    from prefpipe.testing.scorers import OPENAI_MEAN, OPENAI_STD

    return (x - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]


def clip_loss(model, images, combos, text_ids):
    """Symmetric InfoNCE: each image against every caption of the world; each caption of the batch against
    the batch's images, every image drawn with that caption a positive."""
    import torch.nn.functional as F

    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(text_ids), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.T  # (B, 90)
    loss_i = F.cross_entropy(logits, combos)
    same = (combos[:, None] == combos[None, :]).float()  # (B, B): image j has image i's caption
    logits_t = scale * txt[combos] @ img.T  # (B captions, B images)
    loss_t = -(same * logits_t.log_softmax(-1)).sum(-1).div(same.sum(-1)).mean()
    return (loss_i + loss_t) / 2, (logits.argmax(-1) == combos).float().mean()


def train_clip(cfg: ClipConfig, progress: bool = True) -> tuple[object, object, dict]:
    """Train a CLIP on freshly drawn images; returns (model, tokenizer, {"loss": curve, "accuracy": curve})."""
    import torch

    from prefpipe.core.progress import progress as progress_of

    model, tokenizer = build_clip(cfg)
    captions = [caption(*c) for c in combinations()]
    text_ids = tokenizer(captions)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(cfg.seed + 7)
    curve: dict[str, list[float]] = {"loss": [], "accuracy": []}
    window: list[tuple[float, float]] = []
    every = max(1, cfg.steps // 20)
    model.train()
    bar = progress_of(range(cfg.steps), desc="demo-clip", unit="step", enabled=progress)
    for step in bar:
        drawn = draw_dataset(cfg.batch_size, int(rng.integers(2**31)))
        x = normalise(augment(drawn.pixels, rng, cfg))
        loss, acc = clip_loss(model, x, torch.from_numpy(drawn.combos), text_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append((loss.item(), acc.item()))
        if len(window) == every or step == cfg.steps - 1:
            curve["loss"].append(float(np.mean([w[0] for w in window])))
            curve["accuracy"].append(float(np.mean([w[1] for w in window])))
            window = []
            bar.set_postfix(loss=f"{curve['loss'][-1]:.3f}", acc=f"{curve['accuracy'][-1]:.2f}")
    return model.eval().requires_grad_(False), tokenizer, curve


def measure_clip(model, tokenizer, cfg: ClipConfig) -> dict:
    """On fresh drawn images (not augmented): how often the image's caption scores highest of the 90, and
    the mean CLIP score of the right caption and of the best wrong one."""
    import torch
    import torch.nn.functional as F

    drawn = draw_dataset(cfg.eval_images, cfg.seed + 1_000_003)
    captions = [caption(*c) for c in combinations()]
    with torch.no_grad():
        img = F.normalize(model.encode_image(normalise(torch.from_numpy(drawn.pixels).float().div(255).permute(0, 3, 1, 2))), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    scores = (100 * img @ txt.T).clamp(min=0)
    right = scores[torch.arange(len(scores)), torch.from_numpy(drawn.combos)]
    wrong = scores.clone()
    wrong[torch.arange(len(scores)), torch.from_numpy(drawn.combos)] = -1
    return {
        "images": len(drawn.pixels),
        "caption_accuracy": float((scores.argmax(-1).numpy() == drawn.combos).mean()),
        "score_right_mean": float(right.mean()),
        "score_best_wrong_mean": float(wrong.max(-1).values.mean()),
    }


# ------------------------------------------------------------------------------------------------------
# Build (or reuse)
# ------------------------------------------------------------------------------------------------------


def build_demo_clip(cfg: ClipConfig, out: str | Path, *, progress: bool = True, force: bool = False) -> dict:
    """Train the demo's CLIP into `out` (open_clip hub format) unless it already holds this config."""
    import open_clip
    import torch

    from prefpipe.testing.scorers import save_open_clip

    out = Path(out)
    if (cached := CACHE.reuse(out, cfg, force)) is not None:
        return cached
    t0 = time.perf_counter()
    with reproducible():  # one thread, deterministic kernels, as the base model: a config gives the same weights
        model, tokenizer, curve = train_clip(cfg, progress)
    t_train = time.perf_counter() - t0
    metrics = measure_clip(model, tokenizer, cfg)
    with atomic_output(out) as tmp:
        save_open_clip(model, cfg.model_cfg(), tmp)
        record = {
            "config": CACHE.identity(cfg),
            "curve": curve,
            "metrics": metrics,
            "parameters": sum(p.numel() for p in model.parameters()),
            "timings_s": {"train": round(t_train, 2), "total": round(time.perf_counter() - t0, 2)},
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        }
        CACHE.write(tmp, record)
    click.echo(
        f"demo-clip: {cfg.steps} steps of {cfg.batch_size} drawn images (loss {curve['loss'][0]:.3f} -> "
        f"{curve['loss'][-1]:.3f}) in {t_train:.0f} s; on fresh drawings the right caption scores highest of "
        f"90 for {metrics['caption_accuracy']:.0%} (CLIP score {metrics['score_right_mean']:.1f} vs best wrong "
        f"{metrics['score_best_wrong_mean']:.1f}) -> {out}",
        err=True,
    )
    return {**record, "cached": False}


@click.command("demo-clip")
@click.option("--out", default="work/demo/models/clip", show_default=True, type=click.Path(),
              help="Folder to write in open_clip's hub format (reused when it already holds this config).")
@click.option("--quick", is_flag=True, help="A reduced config (seconds, for tests): a scorer that barely reads.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps [default: 500; quick 30].")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="Drawn images per step [default: 128; quick 32].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the drawings, the weights and the training.")
@click.option("--force", is_flag=True, help="Retrain even if OUT already holds this config.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def demo_clip(out, quick, steps, batch_size, seed, force, no_progress):
    """Train the demo's CLIP scorer on drawn images and their captions (open_clip format, for `--scorer clip`)."""
    cfg = QUICK if quick else ClipConfig()
    overrides = {"steps": steps, "batch_size": batch_size}
    cfg = replace(cfg, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    try:
        build_demo_clip(cfg, out, progress=not no_progress, force=force)
    except OSError as e:
        raise PrefpipeError(f"--out {out}: {e}") from e
