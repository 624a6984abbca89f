"""Flow matching in a training step (SD3.x, FLUX.1): training sigmas, noising, the velocity target, the call.

Rectified flow (Esser et al. 2024, arXiv 2403.03206) as the diffusers training examples write it
(`examples/dreambooth/train_dreambooth_lora_sd3.py` and `train_dreambooth_lora_flux.py`, 0.3x-0.42):

- **Training sigmas.** ``u`` is drawn per pair from a density on (0, 1) chosen by the examples'
  ``--weighting_scheme`` (`compute_density_for_timestep_sampling` in `diffusers/training_utils.py`):
  ``logit_normal`` (the default, ``sigmoid(N(mean, std))`` with mean 0, std 1, what the SD3 paper found best and
  both examples default to), ``mode`` (``1 - u - s (cos^2(pi u / 2) - 1 + u)``, s = ``mode_scale``, 1.29), or
  uniform for ``none``, ``sigma_sqrt`` and ``cosmap``; the last two weight each squared error instead
  (`compute_loss_weighting_for_sd3`): ``sigma^-2`` and ``2 / (pi (1 - 2 sigma + 2 sigma^2))``. Then, as the examples do with the scheduler's table
  (``indices = (u * N).long(); timesteps = scheduler.timesteps[indices]``), ``i = floor(u N)`` picks
  ``t = (N - i) / N`` from the N = 1000 training timesteps and the shift maps it to
  ``sigma = shift t / (1 + (shift - 1) t)``. The shift is the scheduler config's ``shift`` (SD3.5: 3.0), or 1
  when the config uses dynamic shifting (FLUX.1: its table is built unshifted, so its training examples train on
  unshifted sigmas); `--flow-shift` overrides it.
- **Noising and target.** ``x_t = (1 - sigma) x_0 + sigma eps``; the transformer predicts the velocity
  ``v = eps - x_0`` (the examples' ``target = noise - model_input``, without SD3's optional preconditioning).
- **The call.** SD3: ``transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states,
  pooled_projections)``. FLUX: latents packed into 2 x 2 patches (``FluxPipeline._pack_latents``), image ids
  (0, row, column) per patch and zero text ids, ``timestep = sigma``, and when the transformer has a guidance
  embedding (FLUX.1-dev) ``guidance = full(B, --guidance)`` (the examples' ``--guidance_scale``, 3.5; the
  transformer multiplies by 1000 itself); the prediction is unpacked back to ``(B, C, h, w)``.

**Flow-DPO.** Winner and loser share sigma and noise; the Diffusion-DPO, hinge, IPO and SFT losses of
`trainer/losses.py` see only ``prediction - target``, so they apply unchanged to velocity errors, with the policy
with its adapters disabled as the reference. This is the formula of flow_grpo's offline DPO
(github.com/zhtmike/flow_grpo, `scripts/train_sd3_dpo.py` lines 882-929 at 9745241: logit-normal u, shared noise
for winner and loser, ``noisy = (1 - sigma) x + sigma noise``, ``target = noise - model_input``,
``inside = -0.5 beta ((mse_w - ref_w) - (mse_l - ref_l))``, ``loss = -logsigmoid(inside)``).

Each pair draws from its own generator (`trainer.data.pairs.PairOrder.generators`) in the order the UNet path
does: its timestep (here: one number for ``u``), then its noise, so the recipe's determinism, resume and
multi-process guarantees carry over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FLOW_FAMILIES = ("sd3", "flux")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")


def density_sample(scheme: str, generator: torch.Generator, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29) -> Tensor:
    """One ``u`` in (0, 1) of the scheme's density, shape ``(1,)`` float32, from `generator` (one draw)."""
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting scheme {scheme!r}: one of {', '.join(WEIGHTING_SCHEMES)}")
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(1, generator=generator) * logit_std + logit_mean)
    u = torch.rand(1, generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weight(scheme: str, sigmas: Tensor) -> Tensor:
    """The weight of each sample's squared error, ``(B,)``: ``sigma^-2`` (sigma_sqrt), ``2 / (pi (1 - 2 sigma +
    2 sigma^2))`` (cosmap), else 1 (as `compute_loss_weighting_for_sd3`)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def sigma_of(u: Tensor, shift: float, num_train_timesteps: int = 1000) -> Tensor:
    """The training sigma for density samples ``u`` (see the module docstring): the shifted entry
    ``floor(u N)`` of the N training timesteps, as the diffusers examples index the scheduler's table."""
    n = num_train_timesteps
    index = (u * n).long().clamp(0, n - 1)
    t = (n - index).float() / n
    return shift * t / (1 + (shift - 1) * t)


def add_noise(latents: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """``(1 - sigma) x_0 + sigma eps``; sigmas ``(B,)`` broadcast over ``(B, C, h, w)``."""
    s = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def velocity(latents: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching target ``eps - x_0``."""
    return noise - latents


def pack_latents(x: Tensor) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``: 2 x 2 patches, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` for latents of height `h`, width `w`."""
    b, _, c4 = x.shape
    c = c4 // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> Tensor:
    """FLUX's position ids of the packed patches, ``(h/2 * w/2, 3)``: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


@dataclass(frozen=True)
class FlowMatching:
    """What a step of a flow model needs: the sigma sampling and the family's transformer call.

    family: ``sd3`` or ``flux``; guidance: the value fed to FLUX's guidance embedding, None when the
    transformer has none (SD3, FLUX.1-schnell)."""

    family: str
    scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    num_train_timesteps: int = 1000
    guidance: float | None = None

    @staticmethod
    def default_shift(scheduler_config: dict) -> float:
        """The scheduler config's shift (its training table is shifted), 1 with dynamic shifting (FLUX.1)."""
        if scheduler_config.get("use_dynamic_shifting"):
            return 1.0
        return float(scheduler_config.get("shift", 1.0))

    def draw_sigmas(self, generators: list[torch.Generator]) -> Tensor:
        """One sigma per pair, ``(B,)`` float32, one draw from each pair's generator."""
        u = torch.cat([density_sample(self.scheme, g, logit_mean=self.logit_mean, logit_std=self.logit_std,
                                      mode_scale=self.mode_scale) for g in generators])
        return sigma_of(u, self.shift, self.num_train_timesteps)

    def loss_weight(self, sigmas: Tensor) -> Tensor:
        """Each sample's error weight at `sigmas`, ``(B,)`` (see :func:`loss_weight`)."""
        return loss_weight(self.scheme, sigmas)

    def predict(self, model, noisy: Tensor, sigmas: Tensor, prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
        """The transformer's velocity prediction for `noisy` ``(B, C, h, w)`` at `sigmas` ``(B,)``, the same
        shape as `noisy` (see the module docstring for each family's call)."""
        if self.family == "sd3":
            return model(hidden_states=noisy, timestep=sigmas * self.num_train_timesteps,
                         encoder_hidden_states=prompt_embeds, pooled_projections=pooled, return_dict=False)[0]
        b, _, h, w = noisy.shape
        guidance = None if self.guidance is None else torch.full((b,), float(self.guidance), device=noisy.device)
        out = model(hidden_states=pack_latents(noisy), timestep=sigmas.to(noisy.dtype), guidance=guidance,
                    pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                    txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                    img_ids=latent_image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)
