"""The demo's base model: a tiny SD 1.5 trained from scratch, here, on images it draws itself.

No hub is reachable, and random weights generate nothing a preference could be learnt from, so the demo
trains its own text-to-image model of the SD 1.5 architecture in a few minutes on CPU:

    draw images ──train VAE──▶ VAE ──encode once──▶ latent cache ──┐
    captions ──tokenize once──▶ ids ──▶ text encoder (trained jointly) ┴─train UNet──▶ pipeline folder + metrics

This is pretraining from scratch (a denoising loss on drawn images, a VAE, a text encoder trained jointly),
not preference training, which is why it is not one of `trainer`'s recipes. The world it draws is in
`prefpipe/demo/world.py`; building, measuring and caching the model in `prefpipe/demo/build.py`.

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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from prefpipe.core.errors import PrefpipeError
from prefpipe.demo.world import SIDE

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
# Reproducibility
# ------------------------------------------------------------------------------------------------------

# The build's intra-op threads, whatever the machine has. A float sum's order depends on how it is split
# over threads, so a build on 2 threads and one on 16 learn different weights (every tensor differs, the
# UNet's last loss in the 5th digit); and with more than one thread, index_put_(accumulate=True) (the
# backward of `embeds[idx]`, the caption lookup) adds with atomics, so even two builds on one machine
# differed. One thread: the tiny model's tensors gain little from a second one, and it never stalls a
# busy machine.
TRAIN_THREADS = 1


@contextmanager
def reproducible(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Run the body on `threads` intra-op threads with `torch.use_deterministic_algorithms(True)` (every op
    takes its deterministic kernel or raises), then restore both settings.

    With the seeds of the config, two builds of one config with the same library versions (constraints.txt)
    on CPUs of the same instruction set give bit-identical weights. CPUs of another instruction set compute
    other bits (AVX2 and AVX-512 vectorise sums differently: `ATEN_CPU_CAPABILITY=avx2` on an AVX-512 machine
    changes every tensor); the demo's seeds table (README) bounds what such a difference does to its result.
    """
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only_before)
        torch.set_num_threads(threads_before)


# ------------------------------------------------------------------------------------------------------
# Models and training
# ------------------------------------------------------------------------------------------------------


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
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
    from prefpipe.testing.tiny import tiny_vae

    vae = tiny_vae(cfg.vae_channels, groups=cfg.vae_groups, scaling_factor=1.0, force_upcast=True)
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
    from prefpipe.core.progress import progress as progress_of

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr_vae, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps_vae))
    log = _LossLog(cfg.steps_vae)
    vae.train()
    bar = progress_of(range(cfg.steps_vae), desc="demo-model: VAE", unit="step", enabled=progress)
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

    from prefpipe.testing.tiny import clip_text_config

    return CLIPTextModel(clip_text_config(cfg.text_hidden, cfg.text_layers, cfg.text_hidden)).eval().requires_grad_(False)


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
    from prefpipe.testing.tiny import SD_SCHEDULE

    schedule = dict(SD_SCHEDULE)
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

    from prefpipe.core.progress import progress as progress_of

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
    bar = progress_of(range(cfg.steps_unet), desc="demo-model: UNet", unit="step", enabled=progress)
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

    from prefpipe.testing.tiny import clip_tokenizer

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**noise_scheduler_config(cfg), set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
