"""The demo's base model: a tiny SD 1.5 trained from scratch, here, on images it draws itself.

No hub is reachable, and random weights generate nothing a preference could be learnt from, so the demo
trains its own text-to-image model of the SD 1.5 architecture in a few minutes on CPU:

    draw images ──train VAE──▶ VAE ──encode once──▶ latent cache ──┐
    captions ──tokenize once──▶ ids ──▶ text encoder (trained jointly) ┴─train UNet──▶ pipeline folder + metrics

**The drawn world.** 32 px images of a coloured shape (circle, square, triangle; random size and place)
on a coloured background; the caption names the three ("a red circle on a blue background"). The
background's *texture* (flat, striped, checkered, noisy; random orientation, phase, contrast) is never
named, so at a fixed caption the JPEG size varies from about 0.75 to 1.5 kB: the spread that the
compressibility reward (`labelers/compressibility.py`) ranks and Diffusion-DPO can move. Textures sit on
the 4 px grid of the latent cells, which a small VAE can keep (finer noise came back blurred).

**The model.** The real classes, saved in the real format, loadable by `prefpipe.models.load_pipeline`
and `DiffusionPipeline.from_pretrained`: `AutoencoderKL` with 3 blocks (downsampling x4: 32 px images have
8x8x4 latents; `pipe.vae_scale_factor` 4 and `unet.config.sample_size` 8 make 32 px the default size),
`UNet2DConditionModel` with cross-attention, a 2-layer `CLIPTextModel` on the real CLIP tokenizer, a DDIM
sampler. Departures from SD 1.5's recipe, each because the budget demanded it (measured, see the record):

- noise schedule DDPM's `linear` with `v_prediction` and `trailing` DDIM steps (not `scaled_linear` and
  epsilon): see `noise_scheduler_config`; with SD's, samples took their background colour from the seed.
- the text encoder trains jointly with the UNet (as in LDM's text-to-image model); a frozen random one
  left the prompt ignored for hundreds of steps.

**Speed.** The VAE trains first (log-variance initialised small; gradient and texture-energy terms so that
it keeps texture); the drawn images are then encoded once into latent moments and the captions tokenised
once, so the UNet step touches cached tensors only. Caption dropout (10%) to the empty prompt lets
classifier-free guidance work; Min-SNR loss weights and a short EMA help the few hundred steps.

**The cache.** `OUT/prefpipe_demo.json` records the config, the losses, the timings and the measured
quality (JPEG-size correlation between drawn images and their VAE reconstructions; colour accuracy of
generated images on held-out prompts). A run whose `OUT/model_index.json` exists and whose recorded config
matches does nothing; any other config retrains. The folder is written under a temporary name and renamed
when complete, so a killed run leaves no half model behind.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch

from prefpipe.errors import PrefpipeError

# Bump when drawing, training or measuring changes what a config produces: caches of older formats retrain.
DEMO_FORMAT = 1
RECORD = "prefpipe_demo.json"
SIDE = 32  # image side in pixels

# Six well separated hues (the colour check classifies by hue).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "purple": (140, 50, 185),
}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("flat", "striped", "checkered", "noisy")  # never named in a caption


# ------------------------------------------------------------------------------------------------------
# Captions and prompt files
# ------------------------------------------------------------------------------------------------------


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(fg: str, shape: str, bg: str) -> str:
    """"a red circle on a blue background", "an orange square on a green background"."""
    return f"{_a(fg)} {shape} on {_a(bg)} background"


def combinations() -> list[tuple[str, str, str]]:
    """Every (shape colour, shape, background colour) with two different colours: 6 x 3 x 5 = 90."""
    return [(fg, shape, bg) for fg in COLOURS for shape in SHAPES for bg in COLOURS if bg != fg]


def is_held_out(fg: str, shape: str, bg: str) -> bool:
    """14 of the 90 combinations, one background per (colour, shape): every colour, shape and colour pair
    still appears in the train prompts, only these triples never do."""
    colours = list(COLOURS)
    return (colours.index(fg) + colours.index(bg) + SHAPES.index(shape)) % len(colours) == 0


def demo_prompts() -> tuple[list[str], list[str]]:
    """(train, held_out) captions; no caption is in both."""
    combos = combinations()
    return (
        [caption(*c) for c in combos if not is_held_out(*c)],
        [caption(*c) for c in combos if is_held_out(*c)],
    )


def write_demo_prompts(folder: str | Path) -> tuple[Path, Path]:
    """Write `train.txt` (76 prompts) and `held_out.txt` (14 prompts never in train.txt) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, prompts in zip(("train.txt", "held_out.txt"), demo_prompts()):
        (folder / name).write_text("\n".join(prompts) + "\n")
        paths.append(folder / name)
    return paths[0], paths[1]


# ------------------------------------------------------------------------------------------------------
# The drawn dataset
# ------------------------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) + 0.5


def draw_image(rng: np.random.Generator, fg: str, shape: str, bg: str, texture: str) -> np.ndarray:
    """One (32, 32, 3) uint8 image.

    Textures live on the 4 px grid of the latent cells (8x8 latents), so a small VAE can keep them: stripes
    4 px wide, checks of 4 px, noise of 4x4 px blocks; the second tone is a darker shade of the background
    (same hue, random contrast), so the background keeps the colour its caption names.
    """
    base = np.array(COLOURS[bg], np.float32)
    img = np.empty((SIDE, SIDE, 3), np.float32)
    img[:] = base
    shade = base * rng.uniform(0.5, 0.8)
    cells_y, cells_x = _YY.astype(int) // 4, _XX.astype(int) // 4
    if texture == "striped":
        img[((cells_x if rng.random() < 0.5 else cells_y) + int(rng.integers(0, 2))) % 2 == 0] = shade
    elif texture == "checkered":
        img[(cells_x + cells_y + int(rng.integers(0, 2))) % 2 == 0] = shade
    elif texture == "noisy":
        levels = rng.uniform(rng.uniform(0.45, 0.8), 1.1, (SIDE // 4, SIDE // 4, 1)).astype(np.float32)
        img = base * levels[cells_y, cells_x]
    elif texture != "flat":
        raise ValueError(f"unknown texture {texture!r}")
    r = rng.uniform(6, 10)  # the shape stays >= 3 px from the border: the border shows the background
    cx, cy = rng.uniform(3 + r, SIDE - 3 - r, 2)
    if shape == "circle":
        mask = (_XX - cx) ** 2 + (_YY - cy) ** 2 <= r * r
    elif shape == "square":
        h = r * 0.85
        mask = (np.abs(_XX - cx) <= h) & (np.abs(_YY - cy) <= h)
    elif shape == "triangle":
        top, bottom = cy - r, cy + 0.8 * r
        frac = (_YY - top) / (bottom - top)
        mask = (frac >= 0) & (frac <= 1) & (np.abs(_XX - cx) <= frac * r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    img[mask] = COLOURS[fg]
    return np.clip(img, 0, 255).round().astype(np.uint8)


@dataclass
class DrawnImages:
    pixels: np.ndarray  # (N, 32, 32, 3) uint8
    combos: np.ndarray  # (N,) int64, index into combinations()
    textures: np.ndarray  # (N,) int64, index into TEXTURES

    def captions(self) -> list[str]:
        combos = combinations()
        return [caption(*combos[i]) for i in self.combos]


def draw_dataset(n: int, seed: int) -> DrawnImages:
    """`n` images with uniformly drawn combination and texture; a pure function of (n, seed)."""
    rng = np.random.default_rng(seed)
    combos = combinations()
    which = rng.integers(0, len(combos), n)
    textures = rng.integers(0, len(TEXTURES), n)
    pixels = np.stack([draw_image(rng, *combos[c], TEXTURES[t]) for c, t in zip(which, textures)])
    return DrawnImages(pixels, which, textures)


# ------------------------------------------------------------------------------------------------------
# Measuring: colours of an image, JPEG sizes
# ------------------------------------------------------------------------------------------------------

_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


def pixel_colours(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index into COLOURS by nearest hue; -1 for grey/dark pixels."""
    from PIL import Image

    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), np.float32) / 255
    hues = np.array(list(_HUES.values()), np.float32)
    d = np.abs(hsv[..., :1] - hues)
    d = np.minimum(d, 1 - d)  # hue is circular
    labels = d.argmin(-1)
    labels[(hsv[..., 1] < 0.25) | (hsv[..., 2] < 0.15)] = -1
    return labels


def read_colours(pixels: np.ndarray, border: int = 2, min_pixels: int = 12) -> tuple[str | None, str | None]:
    """(shape colour, background colour) of a (32, 32, 3) uint8 image, by hue votes.

    Background: the majority colour of the `border`-pixel frame (drawn shapes never reach it). Shape: the
    majority colour among inner pixels of any other colour, if at least `min_pixels` of them; else None.
    """
    labels = pixel_colours(pixels)
    frame = np.ones(labels.shape, bool)
    frame[border:-border, border:-border] = False
    names = list(COLOURS)
    votes = np.bincount(labels[frame & (labels >= 0)], minlength=len(names))
    if votes.sum() == 0:
        return None, None
    bg = int(votes.argmax())
    inner = labels[~frame]
    inner = inner[(inner >= 0) & (inner != bg)]
    votes = np.bincount(inner, minlength=len(names))
    fg = names[int(votes.argmax())] if votes.max(initial=0) >= min_pixels else None
    return fg, names[bg]


def colour_accuracy(images: list, prompts: list[str]) -> dict[str, float]:
    """Fraction of images whose background / shape / both colours are those their prompt names."""
    wanted = {caption(*c): c for c in combinations()}
    bg_ok = fg_ok = both = 0
    for image, prompt in zip(images, prompts):
        fg, _, bg = wanted[prompt]
        got_fg, got_bg = read_colours(np.asarray(image.convert("RGB")))
        bg_ok += got_bg == bg
        fg_ok += got_fg == fg
        both += got_bg == bg and got_fg == fg
    n = max(1, len(images))
    return {"background": bg_ok / n, "shape": fg_ok / n, "both": both / n}


def jpeg_sizes(pixels: np.ndarray) -> np.ndarray:
    """JPEG size in kB (the compressibility reward's own measure) of each (N, H, W, 3) uint8 image."""
    from PIL import Image

    from labelers.compressibility import jpeg_kilobytes

    return np.array([jpeg_kilobytes(Image.fromarray(p)) for p in pixels], np.float64)


# ------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Everything the trained model depends on (the cache key). Defaults: the full demo model."""

    seed: int = 0
    images: int = 4096  # drawn training images (the VAE's data and the UNet's latent cache)
    batch_size: int = 64
    # VAE: 3 blocks -> x4 downsampling, 32 px -> 8x8x4 latents
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_groups: int = 8
    steps_vae: int = 350
    vae_crop_steps: int = 0  # the first steps train on 16 px crops, 4x as many per batch (same cost)
    lr_vae: float = 2e-3
    vae_grad_weight: float = 1.0  # L1 on image gradients: sharp edges
    vae_texture_weight: float = 1.0  # L1 on texture energy: keeps stripes, checks and noise (the JPEG size)
    vae_kl_weight: float = 1e-6
    vae_logvar_init: float = -6.0  # posterior std exp(-3) at the start: texture survives sampling
    # CLIP text encoder, random at the start
    text_hidden: int = 64
    text_layers: int = 2
    train_text_encoder: bool = True  # jointly, as LDM did; frozen random: prompts are learnt far slower
    # UNet: 8x8 -> 4x4 -> 2x2
    unet_channels: tuple[int, ...] = (32, 64, 128)  # (64, 128, 128) measured no better at 350 steps, 1.7x slower
    unet_heads: int = 2
    unet_pooled_text: bool = False
    steps_unet: int = 400
    lr_unet: float = 1e-3
    warmup: int = 40
    caption_dropout: float = 0.1  # empty prompt instead: classifier-free guidance works at sampling
    min_snr_gamma: float = 5.0
    schedule: str = "linear"  # noise schedule, see noise_scheduler_config
    prediction_type: str = "v_prediction"  # or "epsilon"; see train_unet
    ema_decay: float = 0.95  # short: an EMA over ~20 steps smooths without lagging a 400-step run
    # measuring (recorded in prefpipe_demo.json)
    eval_images_per_prompt: int = 4
    eval_steps: int = 20
    eval_guidance: float = 3.0  # 3: colours as good as at 5-7.5, more texture spread within a prompt
    eval_reconstructions: int = 256

    def __post_init__(self) -> None:
        self.vae_channels = tuple(self.vae_channels)
        self.unet_channels = tuple(self.unet_channels)


QUICK = DemoConfig(
    images=256, batch_size=16, vae_channels=(8, 16, 16), steps_vae=40, text_hidden=32,
    unet_channels=(32, 32, 64), steps_unet=40, warmup=5, ema_decay=0.0,
    eval_images_per_prompt=1, eval_steps=4, eval_reconstructions=32,
)


# ------------------------------------------------------------------------------------------------------
# Models and training
# ------------------------------------------------------------------------------------------------------


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _lr_lambda(warmup: int, total: int, floor: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class _LossLog:
    """Mean loss over windows of `every` steps: the logged curve (`first` vs `last` says it went down)."""

    def __init__(self, total: int, points: int = 20) -> None:
        self.every = max(1, total // points)
        self.curve: list[float] = []
        self._window: list[float] = []

    def add(self, loss: float) -> float:
        self._window.append(loss)
        if len(self._window) == self.every:
            self.curve.append(float(np.mean(self._window)))
            self._window = []
        return self.curve[-1] if self.curve else loss

    def close(self) -> list[float]:
        if self._window:
            self.curve.append(float(np.mean(self._window)))
            self._window = []
        return self.curve


def build_vae(cfg: DemoConfig):
    from prefpipe.tiny import _vae

    vae = _vae(cfg.vae_channels, groups=cfg.vae_groups, scaling_factor=1.0, force_upcast=True)
    # The encoder's last conv gives (mean, logvar): start with a small, input-independent log-variance
    # so that sampled latents carry the texture from the first step.
    conv = vae.encoder.conv_out
    with torch.no_grad():
        conv.weight[4:].zero_()
        conv.bias[4:].fill_(cfg.vae_logvar_init)
    return vae


def _image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def texture_energy(x: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H/cell, W/cell): RMS of the image minus its 3x3 local mean, per cell.

    Phase-free: noise, stripes and checks of any offset have the same energy, so matching it asks the
    decoder for texture of the right strength where MSE alone would settle for the blur (the mean).
    """
    f = torch.nn.functional
    high = x - f.avg_pool2d(f.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return f.avg_pool2d(high.pow(2).sum(1, keepdim=True), cell).add(1e-6).sqrt()


def vae_loss(vae, x: torch.Tensor, cfg: DemoConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE + `vae_grad_weight` x L1 of the x/y image gradients (sharp edges) + `vae_texture_weight` x L1 of
    the texture energy (the JPEG size follows it) + `vae_kl_weight` x KL, on sampled latents."""
    dist = vae.encode(x).latent_dist
    y = vae.decode(dist.sample(generator=generator)).sample
    loss = torch.nn.functional.mse_loss(y, x)
    if cfg.vae_grad_weight:
        for gy, gx in zip(_image_gradients(y), _image_gradients(x)):
            loss = loss + cfg.vae_grad_weight * 0.5 * (gy - gx).abs().mean()
    if cfg.vae_texture_weight:
        loss = loss + cfg.vae_texture_weight * (texture_energy(y) - texture_energy(x)).abs().mean()
    return loss + cfg.vae_kl_weight * dist.kl().mean()


def train_vae(vae, pixels: torch.Tensor, cfg: DemoConfig, progress: bool = True, callback=None) -> list[float]:
    """Train on random batches of `pixels` ((N, 3, 32, 32) in [-1, 1]); returns the logged loss curve.

    `callback(step, vae)`, if given, is called after every step (experiments measure with it).
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr_vae, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps_vae))
    log = _LossLog(cfg.steps_vae)
    vae.train()
    bar = tqdm(range(cfg.steps_vae), desc="demo-model: VAE", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if step < cfg.vae_crop_steps:  # cheap early steps: the VAE is convolutional, crops teach it locally
            n, (oy, ox) = cfg.batch_size * 4, (4 * torch.randint(0, 5, (2,), generator=gen)).tolist()
            x = pixels[torch.randint(0, len(pixels), (n,), generator=gen), :, oy : oy + 16, ox : ox + 16]
        else:
            x = pixels[torch.randint(0, len(pixels), (cfg.batch_size,), generator=gen)]
        loss = vae_loss(vae, x, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{log.add(loss.item()):.4f}")
        if callback is not None:
            callback(step + 1, vae)
            vae.train()
    vae.eval()
    return log.close()


@torch.no_grad()
def encode_moments(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std, each (N, 4, 8, 8), before the scaling factor."""
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(pixels[i : i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = [vae.decode(vae.encode(pixels[i : i + batch]).latent_dist.mode()).sample for i in range(0, len(pixels), batch)]
    return torch.cat(out)


def build_text_encoder(cfg: DemoConfig):
    from transformers import CLIPTextModel

    from prefpipe.tiny import _text_config

    return CLIPTextModel(_text_config(cfg.text_hidden, cfg.text_layers, cfg.text_hidden)).eval().requires_grad_(False)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(P, 77) token ids, padded as StableDiffusionPipeline.encode_prompt pads them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def build_unet(cfg: DemoConfig):
    """SD 1.5's UNet at small widths. Cross-attention on every level but the first (8x8; as SDXL skips its
    top level) and in the mid block: the prompt's colours bind there, and attention over 64 tokens
    costs more on CPU than it helps."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    attn = [level > 0 and level < n - 1 for level in range(n)]
    return UNet2DConditionModel(
        sample_size=SIDE // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=min(32, *cfg.unet_channels),
        addition_embed_type="text" if cfg.unet_pooled_text else None,
    )


def noise_scheduler_config(cfg: DemoConfig) -> dict:
    """The noise schedule (a scheduler_config.json), epsilon prediction, 1000 steps.

    `linear` (DDPM's, betas 1e-4 to 0.02) by default, not SD's `scaled_linear` (0.00085 to 0.012): SD's
    leaves a signal-to-noise ratio of 0.0047 at t=999, which its 64x64x4 latents can afford; on 8x8x4
    latents the image's mean colour (an average over 256 numbers) is still readable at t=999 (SNR about
    1.2), so the model learns to take the background colour from the starting noise instead of the prompt.
    DDPM's linear schedule ends at SNR 4e-5. DDIM samples with `trailing` spacing (the first step is t=999).
    """
    from prefpipe.tiny import _SD_SCHEDULE

    schedule = dict(_SD_SCHEDULE)
    if cfg.schedule == "linear":
        schedule.update(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    elif cfg.schedule == "cosine":
        schedule.update(beta_schedule="squaredcos_cap_v2")
    elif cfg.schedule != "scaled_linear":
        raise PrefpipeError(f"schedule {cfg.schedule!r}: choose linear, cosine or scaled_linear")
    return dict(schedule, prediction_type=cfg.prediction_type, clip_sample=False, timestep_spacing="trailing")


def train_unet(unet, text_encoder, latents: tuple[torch.Tensor, torch.Tensor], combos: torch.Tensor,
               prompt_ids: torch.Tensor, cfg: DemoConfig, progress: bool = True, callback=None):
    """Train on cached latents; returns (unet, text_encoder, the logged loss curve), the EMA weights if on.

    latents: (mean, std) of shape (N, 4, 8, 8), already multiplied by the scaling factor; combos: (N,)
    index into `prompt_ids` (P + 1, 77), the token ids of every caption with the empty prompt last (the
    caption-dropout target). With `train_text_encoder` the encoder trains jointly, as in LDM's
    text-to-image model, and the P + 1 embeddings are recomputed each step (cheap: 2 layers); otherwise
    they are computed once. `callback(step, unet, text_encoder)` is called after every step.
    """
    import copy

    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    scheduler = DDPMScheduler(**noise_scheduler_config(cfg))
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    v_pred = cfg.prediction_type == "v_prediction"
    # Min-SNR-gamma weights (Hang et al. 2023), in the form for each target
    if cfg.min_snr_gamma:
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1 if v_pred else snr)
    else:
        weight = torch.ones_like(snr)
    model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    text_encoder.requires_grad_(cfg.train_text_encoder)
    groups = [{"params": list(unet.parameters()), "weight_decay": 1e-2}]
    if cfg.train_text_encoder:  # no decay: it would shrink every token the captions never use
        groups.append({"params": list(text_encoder.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr_unet)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps_unet))
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay else None
    fixed = None
    if not cfg.train_text_encoder:
        with torch.no_grad():
            fixed = text_encoder(prompt_ids)[0]
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    log = _LossLog(cfg.steps_unet)
    mean, std = latents
    model.train()
    bar = tqdm(range(cfg.steps_unet), desc="demo-model: UNet", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        embeds = fixed if fixed is not None else text_encoder(prompt_ids)[0]
        cond = embeds[torch.where(drop, len(prompt_ids) - 1, combos[idx])]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(z, noise, t), t, cond).sample
        target = scheduler.get_velocity(z, noise, t) if v_pred else noise
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        bar.set_postfix(loss=f"{log.add(loss.item()):.4f}")
        if callback is not None:
            done = (ema if ema is not None else model).eval()
            callback(step + 1, done["unet"], done["text_encoder"])
            model.train()
    done = (ema if ema is not None else model).eval().requires_grad_(False)
    return done["unet"], done["text_encoder"], log.close()


def assemble_pipeline(vae, text_encoder, unet, cfg: DemoConfig):
    """A StableDiffusionPipeline of the trained parts, the real CLIP tokenizer and a DDIM sampler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from prefpipe.tiny import _tmpdir, _tokenizer

    tmp = Path(_tmpdir())
    try:
        tokenizer = _tokenizer(tmp, "tokenizer")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**noise_scheduler_config(cfg), set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------------
# Measuring the trained model
# ------------------------------------------------------------------------------------------------------


def sample_grid(images: list, columns: int, scale: int = 4):
    """A PIL grid of equally sized images, `columns` wide, upscaled (nearest) `scale` times."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


@torch.no_grad()
def generate_samples(pipe, prompts: list[str], per_prompt: int, steps: int, guidance: float, seed: int,
                     batch: int = 64) -> tuple[list, list[str]]:
    """`per_prompt` images of each prompt (prompt-major order), with seeded CPU generators."""
    jobs = [(p, seed + k) for p in prompts for k in range(per_prompt)]
    images = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        images += pipe(
            prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk], output_type="pil",
        ).images
    return images, [p for p, _ in jobs]


def measure(pipe, cfg: DemoConfig, out: Path | None = None) -> dict:
    """Quality numbers of a trained pipeline; with `out`, also writes `samples.png` there.

    - reconstruction: Pearson correlation of JPEG sizes, drawn images vs their VAE reconstructions
      (fresh images, not the training ones), and the mean sizes of both.
    - colour accuracy: generated images of every held-out prompt, read by `read_colours`.
    - the spread of the generated images' JPEG sizes within a prompt (what the reward ranks).
    """
    drawn = draw_dataset(cfg.eval_reconstructions, cfg.seed + 1_000_003)
    recon = _to_uint8(reconstruct(pipe.vae, _to_tensor(drawn.pixels)))
    orig_kb, recon_kb = jpeg_sizes(drawn.pixels), jpeg_sizes(recon)
    mse = float(np.mean((drawn.pixels.astype(np.float32) - recon.astype(np.float32)) ** 2))
    metrics: dict = {
        "reconstruction": {
            "images": len(drawn.pixels),
            "jpeg_kb_correlation": float(np.corrcoef(orig_kb, recon_kb)[0, 1]),
            "jpeg_kb_original_mean": float(orig_kb.mean()),
            "jpeg_kb_reconstruction_mean": float(recon_kb.mean()),
            "psnr_db": float(10 * np.log10(255**2 / max(mse, 1e-9))),
        }
    }
    _, held_out = demo_prompts()
    images, prompts = generate_samples(pipe, held_out, cfg.eval_images_per_prompt, cfg.eval_steps,
                                       cfg.eval_guidance, cfg.seed)
    kb = jpeg_sizes(np.stack([np.asarray(im.convert("RGB")) for im in images])).reshape(len(held_out), -1)
    metrics["generation"] = {
        "prompts": "held_out",
        "images": len(images),
        "steps": cfg.eval_steps,
        "guidance": cfg.eval_guidance,
        "colour_accuracy": colour_accuracy(images, prompts),
        "jpeg_kb_mean": float(kb.mean()),
        "jpeg_kb_std_within_prompt": float(kb.std(axis=1).mean()),
    }
    if out is not None:
        columns = cfg.eval_images_per_prompt if cfg.eval_images_per_prompt > 1 else 7
        sample_grid(images, columns).save(out / "samples.png")
    return metrics


# ------------------------------------------------------------------------------------------------------
# Build (or reuse) the demo model
# ------------------------------------------------------------------------------------------------------


def read_record(out: str | Path) -> dict | None:
    path = Path(out) / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _identity(cfg: DemoConfig) -> dict:
    return json.loads(json.dumps({"format": DEMO_FORMAT, **asdict(cfg)}))  # tuples -> lists, as in the file


def is_cached(out: str | Path, cfg: DemoConfig) -> bool:
    """The folder holds a finished model trained with exactly this config."""
    record = read_record(out)
    return (Path(out) / "model_index.json").exists() and record is not None and record.get("config") == _identity(cfg)


def build_demo_model(cfg: DemoConfig, out: str | Path, *, progress: bool = True, force: bool = False) -> dict:
    """Train the demo's base model into `out` unless it is already there with this config.

    Returns the record (what `prefpipe_demo.json` holds) plus `cached`: whether nothing had to be done.
    """
    out = Path(out)
    if not force and is_cached(out, cfg):
        record = read_record(out)
        click.echo(f"demo-model: {out} already holds this config (trained in {record['timings_s']['total']:.0f} s); "
                   "nothing to do", err=True)
        return {**record, "cached": True}
    from prefpipe.models import quiet_libraries

    quiet_libraries()
    times: dict[str, float] = {}
    t_all = t = time.perf_counter()
    cpu_all = time.process_time()
    torch.manual_seed(cfg.seed)

    drawn = draw_dataset(cfg.images, cfg.seed)
    pixels = _to_tensor(drawn.pixels)
    times["draw"] = time.perf_counter() - t

    t = time.perf_counter()
    vae = build_vae(cfg)
    vae_curve = train_vae(vae, pixels, cfg, progress)
    times["vae"] = time.perf_counter() - t

    t = time.perf_counter()
    mean, std = encode_moments(vae, pixels)
    scaling = float(1 / mean.std())  # unit-variance latents, as SD's 0.18215 was chosen
    vae.register_to_config(scaling_factor=scaling)
    text_encoder = build_text_encoder(cfg)
    pipe = assemble_pipeline(vae, text_encoder, build_unet(cfg), cfg)
    prompt_ids = tokenize(pipe.tokenizer, [caption(*c) for c in combinations()] + [""])
    times["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    pipe.unet, pipe.text_encoder, unet_curve = train_unet(
        pipe.unet, text_encoder, (mean * scaling, std * scaling), torch.from_numpy(drawn.combos), prompt_ids, cfg, progress
    )
    times["unet"] = time.perf_counter() - t

    t = time.perf_counter()
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    from prefpipe.tiny import save_pipeline

    save_pipeline(pipe, tmp)
    times["save"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = measure(pipe, cfg, tmp)
    times["measure"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    times["total_cpu"] = time.process_time() - cpu_all  # CPU seconds of all threads: less noisy than wall time

    import diffusers
    import transformers

    record = {
        "config": _identity(cfg),
        "losses": {"vae": vae_curve, "unet": unet_curve},
        "latent_scaling_factor": scaling,
        "parameters": {"vae": sum(p.numel() for p in vae.parameters()),
                       "unet": sum(p.numel() for p in pipe.unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
        "metrics": metrics,
        "timings_s": {k: round(v, 2) for k, v in times.items()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()},
    }
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    acc = metrics["generation"]["colour_accuracy"]
    click.echo(
        f"demo-model: VAE {cfg.steps_vae} steps (loss {vae_curve[0]:.4f} -> {vae_curve[-1]:.4f}), "
        f"UNet {cfg.steps_unet} steps (loss {unet_curve[0]:.4f} -> {unet_curve[-1]:.4f}) at batch {cfg.batch_size} "
        f"in {times['total']:.0f} s; JPEG-size correlation original/reconstruction "
        f"{metrics['reconstruction']['jpeg_kb_correlation']:.2f}; held-out colour accuracy "
        f"{acc['both']:.0%} (background {acc['background']:.0%}, shape {acc['shape']:.0%}) -> {out}",
        err=True,
    )
    return {**record, "cached": False}


@click.command("demo-model")
@click.option("--out", default="work/demo/models/base", show_default=True, type=click.Path(),
              help="Pipeline folder to write (reused when it already holds this config).")
@click.option("--quick", is_flag=True, help="A reduced config (seconds, for tests): a model that barely draws.")
@click.option("--steps-vae", type=click.IntRange(min=1), default=None, help="VAE training steps [default: 350; quick 40].")
@click.option("--steps-unet", type=click.IntRange(min=1), default=None, help="UNet training steps [default: 400; quick 40].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per step [default: 64; quick 16].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the drawn images, the weights and the training.")
@click.option("--prompts-out", type=click.Path(), default=None,
              help="Also write the demo's prompt files here: train.txt and held_out.txt (combinations never in train.txt).")
@click.option("--force", is_flag=True, help="Retrain even if OUT already holds this config.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo_model(out, quick, steps_vae, steps_unet, batch_size, seed, prompts_out, force, no_progress):
    """Train the demo's base model: a tiny SD 1.5 learnt from scratch on drawn 32 px shapes (a few minutes on CPU).

    The captions name the shape, its colour and the background colour; the background's texture is never
    named, so JPEG size varies at a fixed caption. Writes a diffusers pipeline folder that `--model`
    accepts, with `prefpipe_demo.json` (config, losses, timings, measured quality) and `samples.png`.
    """
    cfg = QUICK if quick else DemoConfig()
    overrides = {"steps_vae": steps_vae, "steps_unet": steps_unet, "batch_size": batch_size}
    cfg = replace(cfg, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    if prompts_out is not None:
        train, held_out = write_demo_prompts(prompts_out)
        click.echo(f"demo-model: prompts -> {train} and {held_out}", err=True)
    try:
        build_demo_model(cfg, out, progress=not no_progress, force=force)
    except OSError as e:
        raise PrefpipeError(f"--out {out}: {e}") from e

