"""Every preference-training objective, as a pure function of tensors.

Each objective returns ``(loss, metrics)``: ``loss`` is a 0-dim tensor to backpropagate, ``metrics`` maps
a name to a detached 0-dim tensor (no ``.item()`` here, so no device sync; the loop converts when it logs).
The loop looks an objective up by name in :data:`OBJECTIVES` and learns from its :class:`Objective`
entry which tensors to compute, so adding an objective never changes the loop.

Two families:

- **Offline, on denoising errors** (``dpo``, ``hinge``, ``ipo``, ``sft``, ``mapo``, ``kto``): the loop noises
  the winner and loser latents with the *same* noise and timestep, runs the policy (and, except for ``sft``
  and ``mapo``, the frozen reference) and passes predictions and the regression target. The target is whatever the scheduler's
  ``prediction_type`` regresses: the noise for ``epsilon``, ``scheduler.get_velocity(latents, noise, t)``
  for ``v_prediction``; these functions only see ``prediction - target``, so both work unchanged.
- **Online, on sampler log-probabilities** (``d3po``): the loop replays recorded DDIM trajectories and
  passes per-step log-probabilities from :func:`ddim_step_log_prob`.

Formulas follow the reference implementations: Diffusion-DPO (Wallace et al. 2023,
SalesforceAIResearch/DiffusionDPO ``train.py``; diffusers ``train_diffusion_dpo.py``), D3PO (Yang et al.
2023, arXiv 2311.13231, yk7333/d3po ``scripts/train.py``), DDPO's ``ddim_step_with_logprob``, MaPO (Hong et
al. 2024, mapo-t2i/mapo ``utils.py``: no reference) and Diffusion-KTO (Li et al. 2024, jacklishufan/diffusion-kto
``train_kto_sd_v1.5.py``: per-image labels; on pairs, winners desirable and losers undesirable).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]
LossOutput = tuple[Tensor, Metrics]


# --------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Losses run in at least float32 (the references cast with `.float()`); float64 stays float64.
    return torch.promote_types(x.dtype, torch.float32)


def denoising_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error of a denoiser.

    pred, target: ``(B, C, H, W)`` (any ``(B, ...)``), same shape, in the units of the prediction target.
    Returns ``(B,)``: the squared error averaged over every dimension but the batch, computed in at
    least float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    dtype = _compute_dtype(pred)
    err = (pred.to(dtype) - target.to(dtype)).pow(2)
    return err.mean(dim=tuple(range(1, err.ndim)))


def _weighted_mean(per_pair: Tensor, weight: Tensor | None) -> Tensor:
    """Mean over pairs, or ``sum(w * l) / sum(w)`` with a ``(B,)`` weight (broadcast over trailing dims)."""
    if weight is None:
        return per_pair.mean()
    if weight.ndim != 1 or weight.shape[0] != per_pair.shape[0]:
        raise ValueError(f"weight must have shape ({per_pair.shape[0]},), got {tuple(weight.shape)}")
    w = weight.to(per_pair.dtype).reshape(-1, *([1] * (per_pair.ndim - 1))).expand_as(per_pair)
    return (w * per_pair).sum() / w.sum()


def _implicit_accuracy(logits: Tensor) -> Tensor:
    """Fraction of pairs the implicit reward orders correctly; an exact tie (logit 0) counts half."""
    return ((logits > 0).to(logits.dtype) + 0.5 * (logits == 0).to(logits.dtype)).mean()


# --------------------------------------------------------------------------------------------------------
# Offline objectives on denoising errors: Diffusion-DPO and its hinge / IPO variants, SFT
# --------------------------------------------------------------------------------------------------------


class _PairTerms(NamedTuple):
    mse_w: Tensor  # (B,) policy error on the winner
    mse_l: Tensor  # (B,) policy error on the loser
    ref_mse_w: Tensor  # (B,) reference error on the winner (no gradient)
    ref_mse_l: Tensor  # (B,) reference error on the loser (no gradient)
    inside: Tensor  # (B,) beta/2 * ((ref_w - mse_w) - (ref_l - mse_l)), the argument of the sigmoid


def _pair_terms(
    model_pred_w: Tensor,
    model_pred_l: Tensor,
    ref_pred_w: Tensor,
    ref_pred_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    beta: float,
) -> _PairTerms:
    mse_w = denoising_mse(model_pred_w, target_w)
    mse_l = denoising_mse(model_pred_l, target_l)
    # The reference is frozen: whatever the caller passes, no gradient flows into it.
    ref_mse_w = denoising_mse(ref_pred_w.detach(), target_w)
    ref_mse_l = denoising_mse(ref_pred_l.detach(), target_l)
    model_diff = mse_w - mse_l
    ref_diff = ref_mse_w - ref_mse_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    return _PairTerms(mse_w, mse_l, ref_mse_w, ref_mse_l, inside)


def _pair_metrics(loss: Tensor, terms: _PairTerms, beta: float) -> Metrics:
    metrics = {
        "loss": loss,
        "implicit_acc": _implicit_accuracy(terms.inside),
        # Implicit rewards (trl's rewards/chosen, rewards/rejected): beta/2 * (ref error - policy error).
        "reward_w": (0.5 * beta * (terms.ref_mse_w - terms.mse_w)).mean(),
        "reward_l": (0.5 * beta * (terms.ref_mse_l - terms.mse_l)).mean(),
        "reward_margin": terms.inside.mean(),
        "mse_w": terms.mse_w.mean(),
        "mse_l": terms.mse_l.mean(),
        "ref_mse_w": terms.ref_mse_w.mean(),
        "ref_mse_l": terms.ref_mse_l.mean(),
    }
    return {k: v.detach() for k, v in metrics.items()}


def diffusion_dpo_loss(
    model_pred_w: Tensor,
    model_pred_l: Tensor,
    ref_pred_w: Tensor,
    ref_pred_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    beta: float = 5000.0,
    weight: Tensor | None = None,
) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023), as in the paper's reference ``train.py``.

    Shapes: every prediction and target is ``(B, C, H, W)`` latents (any ``(B, ...)``); pair ``i`` is
    winner ``*_w[i]`` against loser ``*_l[i]``, noised with the same noise and timestep (the caller's job).
    Targets are the noise (epsilon prediction) or the velocity (v-prediction): both work.

    With per-sample errors ``mse = mean over C, H, W of (pred - target)^2``::

        model_diff = mse_w - mse_l            ref_diff = ref_mse_w - ref_mse_l
        inside     = -0.5 * beta * (model_diff - ref_diff)
        loss       = mean_i  -logsigmoid(inside_i)

    ``beta`` is the paper's (5000 for SD 1.5, their default); diffusers' script writes the same loss as
    ``beta_dpo * (ref_diff - model_diff)`` with ``beta_dpo = beta / 2`` (its default 2500).

    weight: optional ``(B,)`` non-negative per-pair weight (e.g. 0.5 for a tie kept at half weight); the
        loss is then ``sum(w * l) / sum(w)``, so weights are relative within a batch.
    ref_pred_*: detached here; the reference never receives gradient.

    Metrics (batch means, unweighted, detached 0-dim tensors):
        ``loss``; ``implicit_acc``: fraction with ``inside > 0``, exact ties counting 0.5;
        ``reward_w``/``reward_l``: implicit rewards ``beta/2 * (ref_mse - mse)`` of winner and loser;
        ``reward_margin``: mean of ``inside = reward_w - reward_l`` per pair
        ``= beta/2 * ((ref_mse_w - mse_w) - (ref_mse_l - mse_l))``, in nats of the sigmoid's argument;
        ``mse_w``, ``mse_l``, ``ref_mse_w``, ``ref_mse_l``: denoising errors in target units squared.
    """
    terms = _pair_terms(model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l, beta)
    loss = _weighted_mean(-F.logsigmoid(terms.inside), weight)
    return loss, _pair_metrics(loss, terms, beta)


def diffusion_hinge_loss(
    model_pred_w: Tensor,
    model_pred_l: Tensor,
    ref_pred_w: Tensor,
    ref_pred_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    beta: float = 5000.0,
    weight: Tensor | None = None,
) -> LossOutput:
    """SLiC-style hinge variant of :func:`diffusion_dpo_loss`: ``mean_i relu(1 - inside_i)``.

    Same inputs, ``inside`` and metrics as Diffusion-DPO; equals diffusers' ``loss_type="hinge"``
    (``relu(1 - beta_dpo * (ref_diff - model_diff))`` with ``beta_dpo = beta / 2``). Pairs already
    separated by a margin of 1 stop contributing gradient.
    """
    terms = _pair_terms(model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l, beta)
    loss = _weighted_mean(torch.relu(1.0 - terms.inside), weight)
    return loss, _pair_metrics(loss, terms, beta)


def diffusion_ipo_loss(
    model_pred_w: Tensor,
    model_pred_l: Tensor,
    ref_pred_w: Tensor,
    ref_pred_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    beta: float = 5000.0,
    weight: Tensor | None = None,
) -> LossOutput:
    """IPO variant (Azar et al. 2023) of :func:`diffusion_dpo_loss`: ``mean_i (h_i - 1/(2 beta))^2``.

    ``h = inside / beta = ((ref_mse_w - mse_w) - (ref_mse_l - mse_l)) / 2`` is the log-likelihood-ratio
    difference whose ``beta`` multiple Diffusion-DPO feeds to the sigmoid, so ``beta`` plays IPO's
    ``tau`` exactly as in trl's ``loss_type="ipo"``. The squared loss pulls every pair's margin to
    ``1/(2 beta)`` instead of pushing it without bound. (diffusers' script has an ``ipo`` branch that reads
    an undefined ``args.beta``; this is the paper's form.) Same inputs and metrics as Diffusion-DPO.
    """
    terms = _pair_terms(model_pred_w, model_pred_l, ref_pred_w, ref_pred_l, target_w, target_l, beta)
    h = terms.inside / beta
    loss = _weighted_mean((h - 1.0 / (2.0 * beta)).pow(2), weight)
    return loss, _pair_metrics(loss, terms, beta)


def sft_loss(model_pred_w: Tensor, target_w: Tensor, weight: Tensor | None = None) -> LossOutput:
    """Supervised fine-tuning on the preferred image only (the Diffusion-DPO paper's SFT baseline).

    model_pred_w, target_w: ``(B, C, H, W)``; the target is the noise or the velocity, as for DPO.
    Loss: the plain denoising MSE, ``mean_i mse_w_i`` (equal to ``F.mse_loss(pred, target)``), or the
    ``weight``-ed mean over samples. Metrics: ``loss``, ``mse_w`` (unweighted batch mean).
    """
    mse_w = denoising_mse(model_pred_w, target_w)
    loss = _weighted_mean(mse_w, weight)
    return loss, {"loss": loss.detach(), "mse_w": mse_w.mean().detach()}


# --------------------------------------------------------------------------------------------------------
# MaPO (no reference model) and Diffusion-KTO (per-image labels)
# --------------------------------------------------------------------------------------------------------


def mapo_score(mse: Tensor, snr_value: float) -> Tensor:
    """MaPO's transform of a denoising error: ``s(m) = c m / (exp(c m) - 1)`` with ``c = snr_value``.

    Decreasing in ``m`` (1 at ``m = 0``, where the quotient's limit is taken); the reference logs it as
    "Win Score" / "Lose Score".
    """
    x = snr_value * mse
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.ones_like(x), safe / torch.expm1(safe))


def mapo_loss(
    model_pred_w: Tensor,
    model_pred_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    beta: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: float = 1000.0,
    weight: Tensor | None = None,
) -> LossOutput:
    """MaPO, margin-aware preference optimization (Hong et al. 2024): no reference model.

    From mapo-t2i/mapo ``utils.py`` ``compute_loss`` (lines 286-301 at commit 374b3d3), defaults from its
    ``args.py`` (``--beta_mapo 0.1``, ``--snr_value 0.5``); the scale is the scheduler's
    ``config.num_train_timesteps`` (the recipe passes it). Shapes as :func:`diffusion_dpo_loss`. With
    ``s(m) = c m / (exp(c m) - 1)`` (:func:`mapo_score`, ``c = snr_value``)::

        log_odds = s(mse_w) - s(mse_l)
        ratio    = logsigmoid(num_train_timesteps * log_odds)
        loss     = mean_i mse_w_i  -  beta * mean_i ratio_i

    The winner's plain denoising loss plus a margin that pushes the winner's error below the loser's.
    ``weight``: optional ``(B,)``; the loss is then the weighted mean of ``mse_w_i - beta * ratio_i``
    (equal to the above with no weight).

    Metrics (unweighted means, detached): ``loss``; ``mse_w``, ``mse_l`` (the reference's
    ``model_losses_w/l``); ``score_w``, ``score_l`` ("Win/Lose Score"); ``ratio_loss``: ``-beta * mean
    ratio`` (the reference's "OR loss"); ``reward_margin``: mean ``num_train_timesteps * log_odds``;
    ``implicit_acc``: the margin accuracy, the fraction of pairs with ``log_odds > 0`` (exact ties 0.5).
    """
    mse_w = denoising_mse(model_pred_w, target_w)
    mse_l = denoising_mse(model_pred_l, target_l)
    score_w, score_l = mapo_score(mse_w, snr_value), mapo_score(mse_l, snr_value)
    margin = num_train_timesteps * (score_w - score_l)
    ratio_losses = beta * F.logsigmoid(margin)
    loss = _weighted_mean(mse_w - ratio_losses, weight)
    metrics = {
        "loss": loss,
        "mse_w": mse_w.mean(),
        "mse_l": mse_l.mean(),
        "score_w": score_w.mean(),
        "score_l": score_l.mean(),
        "ratio_loss": -ratio_losses.mean(),
        "reward_margin": margin.mean(),
        "implicit_acc": _implicit_accuracy(margin),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def kto_image_loss(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    desirable: Tensor,
    beta: float = 1000.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weight: Tensor | None = None,
    kl_reduce: Callable[[Tensor], Tensor] | None = None,
) -> LossOutput:
    """Diffusion-KTO (Li et al. 2024) on single images, each labelled desirable or undesirable.

    From jacklishufan/diffusion-kto ``train_kto_sd_v1.5.py`` (lines 1394-1509 at commit 226bbd0), its
    defaults: ``--loss kto --halo sigmoid --bce_offset none``, ``--beta_dpo 1000``, ``--lambda_d_kto 1``,
    ``--lambda_u_kto 1``. model_pred, ref_pred, target: ``(N, C, H, W)``; desirable: ``(N,)`` bool or 0/1.
    With per-image errors ``mse`` (policy) and ``ref_mse`` (reference, detached)::

        g    = ref_mse - mse                          (policy minus reference log-likelihood, logp = -mse)
        kl   = clamp(reduce(mean_n g_n), min=0), detached   (the batch's reference-KL estimate)
        z    = sign * beta * (g - kl)                  sign = +1 desirable, -1 undesirable
        loss = mean_n  w_n * (1 - sigmoid(z_n))        w = desirable_weight or undesirable_weight

    ``reduce``: `kl_reduce`, the mean over processes as the reference's ``accelerator.reduce(kl_gpu,
    reduction='mean')`` (the training loop passes it when there are several processes; None: this batch's).
    ``weight``: optional ``(N,)`` per-image weight (weighted mean).

    Metrics (detached): ``loss``; ``kl``; ``reward_desirable`` / ``reward_undesirable``: mean ``g - kl`` of
    the desirable / undesirable images (the reference's ``diff_pos`` / ``diff_neg``; 0 when a class is
    absent); ``implicit_acc``: fraction with ``z > 0`` (exact ties 0.5); ``mse``, ``ref_mse`` (means).
    """
    if desirable.ndim != 1 or desirable.shape[0] != model_pred.shape[0]:
        raise ValueError(f"desirable must have shape ({model_pred.shape[0]},), got {tuple(desirable.shape)}")
    mse = denoising_mse(model_pred, target)
    ref_mse = denoising_mse(ref_pred.detach(), target)
    good = desirable.to(device=mse.device).bool()
    g = ref_mse - mse
    kl = g.mean().detach()
    kl = (kl if kl_reduce is None else kl_reduce(kl)).clamp(min=0)
    centred = g - kl
    sign = good.to(mse.dtype) * 2 - 1
    z = sign * beta * centred
    w_y = torch.where(good, torch.full_like(mse, desirable_weight), torch.full_like(mse, undesirable_weight))
    loss = _weighted_mean(w_y * (1 - torch.sigmoid(z)), weight)

    def class_mean(mask: Tensor) -> Tensor:
        return (centred * mask).sum() / mask.sum().clamp(min=1)

    metrics = {
        "loss": loss,
        "kl": kl,
        "reward_desirable": class_mean(good.to(mse.dtype)),
        "reward_undesirable": class_mean((~good).to(mse.dtype)),
        "implicit_acc": _implicit_accuracy(z),
        "mse": mse.mean(),
        "ref_mse": ref_mse.mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def diffusion_kto_loss(
    model_pred_w: Tensor,
    model_pred_l: Tensor,
    ref_pred_w: Tensor,
    ref_pred_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    beta: float = 1000.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weight: Tensor | None = None,
    kl_reduce: Callable[[Tensor], Tensor] | None = None,
) -> LossOutput:
    """Diffusion-KTO on the per-image view of pairs: each winner one desirable image, each loser one
    undesirable image (:func:`kto_image_loss` on the ``2B`` images, winners first; one batch-wide KL).

    This is how the pairs recipe trains KTO without a data path of its own: the images of a pair share
    noise and timestep as in DPO, but the loss never compares them. ``weight``: ``(B,)`` per pair, given
    to both of its images. Metrics as :func:`kto_image_loss`.
    """
    desirable = torch.cat([torch.ones(len(model_pred_w), dtype=torch.bool), torch.zeros(len(model_pred_l), dtype=torch.bool)])
    return kto_image_loss(
        torch.cat([model_pred_w, model_pred_l]), torch.cat([ref_pred_w, ref_pred_l]), torch.cat([target_w, target_l]),
        desirable.to(model_pred_w.device), beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, weight=None if weight is None else torch.cat([weight, weight]),
        kl_reduce=kl_reduce,
    )


def kto_feedback_loss(
    model_pred_w: Tensor,
    ref_pred_w: Tensor,
    target_w: Tensor,
    desirable: Tensor,
    beta: float = 1000.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weight: Tensor | None = None,
    kl_reduce: Callable[[Tensor], Tensor] | None = None,
) -> LossOutput:
    """Diffusion-KTO on per-image feedback (`prefpipe train --objective kto --feedback`): :func:`kto_image_loss`
    under the names the training loop passes (each item one image in the ``_w`` slot, its label in
    ``desirable``). Same defaults and metrics."""
    return kto_image_loss(model_pred_w, ref_pred_w, target_w, desirable, beta=beta, desirable_weight=desirable_weight,
                          undesirable_weight=undesirable_weight, weight=weight, kl_reduce=kl_reduce)


# --------------------------------------------------------------------------------------------------------
# D3PO: one DDIM step's log-probability, and the loss on trajectories
# --------------------------------------------------------------------------------------------------------


class DDIMStep(NamedTuple):
    """One stochastic DDIM step ``x_t -> x_prev ~ Normal(mean, std^2)``."""

    log_prob: Tensor  # (B,) mean over all non-batch dims of the Gaussian log-density of prev_sample
    mean: Tensor  # (B, C, H, W) DDIM mean of x_prev
    std: Tensor  # (B, 1, 1, 1) sigma_t = eta * sqrt(variance), broadcastable to the sample


def _per_sample_index(t: Tensor | int, batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, device=device).long()
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
    return t


def ddim_prev_timestep(timestep: Tensor | int, num_train_timesteps: int, num_inference_steps: int) -> Tensor:
    """The timestep a DDIM step lands on, as ``DDIMScheduler.step`` computes it (negative after the last)."""
    return torch.as_tensor(timestep).long() - num_train_timesteps // num_inference_steps


def ddim_scheduler_args(scheduler: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`ddim_step_mean_std` / :func:`ddim_step_log_prob` for a diffusers
    ``DDIMScheduler`` (read duck-typed: ``alphas_cumprod``, ``final_alpha_cumprod``, ``config``).

    ``final_alpha_cumprod`` is 1 with ``set_alpha_to_one=True`` (then the last step is deterministic and
    has no log-probability) and ``alphas_cumprod[0]`` otherwise, as the scheduler sets it.
    """
    config = scheduler.config
    if getattr(config, "thresholding", False):
        raise ValueError(
            "dynamic thresholding is not supported: build the DDIMScheduler with thresholding=False"
        )
    return {
        "alphas_cumprod": scheduler.alphas_cumprod,
        "final_alpha_cumprod": scheduler.final_alpha_cumprod,
        "prediction_type": config.prediction_type,
        "clip_sample_range": config.clip_sample_range if config.clip_sample else None,
    }


def ddim_step_mean_std(
    model_output: Tensor,
    timestep: Tensor | int,
    sample: Tensor,
    *,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: Tensor | float,
    prev_timestep: Tensor | int,
    eta: float = 1.0,
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
    clip_sample_range: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the DDIM transition ``x_t -> x_prev`` (DDIM eqs. 12 and 16), as diffusers computes them.

    model_output: ``(B, C, H, W)`` the (guided) model prediction at ``x_t``, of kind ``prediction_type``.
    timestep, prev_timestep: scalar or ``(B,)`` integer timesteps; ``prev_timestep < 0`` (after the last
        step) uses ``final_alpha_cumprod``, like ``DDIMScheduler`` (DDPO instead clamps it to 0).
    sample: ``(B, C, H, W)`` the current latents ``x_t``.
    alphas_cumprod: ``(num_train_timesteps,)``, e.g. ``scheduler.alphas_cumprod``.
    clip_sample_range: clamp the predicted ``x_0`` to ``[-r, r]`` (the scheduler's ``clip_sample``); None: no clip.

    ``std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))`` and
    ``mean = sqrt(a_prev) * x0_pred + sqrt(1 - a_prev - std^2) * eps_pred``.
    Returns ``(mean (B, C, H, W), std (B, 1, 1, 1))`` in at least float32; a sampler draws
    ``mean + std * noise``, which is ``scheduler.step(..., eta=eta)`` for the same noise.
    """
    dtype = _compute_dtype(model_output)
    device = sample.device
    batch = sample.shape[0]
    t = _per_sample_index(timestep, batch, device)
    t_prev = _per_sample_index(prev_timestep, batch, device)
    alphas = alphas_cumprod.to(device=device, dtype=dtype)
    final = torch.as_tensor(final_alpha_cumprod, device=device, dtype=dtype)

    bshape = (batch,) + (1,) * (sample.ndim - 1)
    alpha_t = alphas[t].reshape(bshape)
    alpha_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)], final).reshape(bshape)
    beta_t = 1 - alpha_t

    x_t = sample.to(dtype)
    out = model_output.to(dtype)
    if prediction_type == "epsilon":
        pred_x0 = (x_t - beta_t.sqrt() * out) / alpha_t.sqrt()
        pred_eps = out
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * x_t - beta_t.sqrt() * out
        pred_eps = alpha_t.sqrt() * out + beta_t.sqrt() * x_t
    elif prediction_type == "sample":
        pred_x0 = out
        pred_eps = (x_t - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    else:
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    if clip_sample_range is not None:
        # As the scheduler (use_clipped_model_output=False): x0 is clipped, eps is not re-derived.
        pred_x0 = pred_x0.clamp(-clip_sample_range, clip_sample_range)

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).sqrt() * pred_eps
    return mean, std


def ddim_step_log_prob(
    model_output: Tensor,
    timestep: Tensor | int,
    sample: Tensor,
    prev_sample: Tensor,
    *,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: Tensor | float,
    prev_timestep: Tensor | int,
    eta: float = 1.0,
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
    clip_sample_range: float | None = None,
) -> DDIMStep:
    """Log-probability of a recorded DDIM step ``sample -> prev_sample`` under ``model_output``.

    Arguments as :func:`ddim_step_mean_std`; ``prev_sample`` ``(B, C, H, W)`` is the recorded ``x_prev``
    (treated as data: detached, gradient flows through the mean only). The Gaussian log-density
    ``-(x - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi))`` is averaged over every non-batch dimension,
    as DDPO and D3PO do, so ``log_prob`` is in nats per latent element, shape ``(B,)``.

    Raises ValueError when a step is deterministic (``eta == 0``, or the last step of a scheduler with
    ``set_alpha_to_one=True``): such a step has no density to differentiate.
    """
    if eta <= 0:
        raise ValueError(
            f"eta must be > 0 for a step with a log-probability (D3PO samples with eta=1.0), got {eta}"
        )
    mean, std = ddim_step_mean_std(
        model_output,
        timestep,
        sample,
        alphas_cumprod=alphas_cumprod,
        final_alpha_cumprod=final_alpha_cumprod,
        prev_timestep=prev_timestep,
        eta=eta,
        prediction_type=prediction_type,
        clip_sample_range=clip_sample_range,
    )
    if bool((std == 0).any()):
        raise ValueError(
            "a DDIM step has std 0 (the last step with set_alpha_to_one=True is deterministic): "
            "skip that step or build the scheduler with set_alpha_to_one=False"
        )
    x_prev = prev_sample.detach().to(mean.dtype)
    log_density = -((x_prev - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    log_prob = log_density.mean(dim=tuple(range(1, log_density.ndim)))
    return DDIMStep(log_prob=log_prob, mean=mean, std=std)


def d3po_loss(
    logp_w: Tensor,
    logp_l: Tensor,
    ref_logp_w: Tensor,
    ref_logp_l: Tensor,
    beta: float = 0.1,
    eps: float = 0.1,
    weight: Tensor | None = None,
) -> LossOutput:
    """D3PO (Yang et al. 2023), as in yk7333/d3po ``scripts/train.py``.

    logp_*: ``(B,)`` per-step log-probabilities from :func:`ddim_step_log_prob` of the policy on the
        winner's and loser's recorded trajectories at the same step index, or ``(B, K)`` for K steps;
        ref_logp_*: the same under the frozen reference (detached here).
    The reference clips each step's probability ratio, then applies DPO::

        r    = clamp(exp(logp - ref_logp), 1 - eps, 1 + eps)
        loss = mean  -logsigmoid(beta * (log r_w - log r_l))

    computed as ``log r = clamp(logp - ref_logp, log(1 - eps), log(1 + eps))``: the same values and
    gradients (zero outside the clip), without ``exp`` overflowing to a NaN gradient. The defaults are
    the reference config's (``train.beta = 0.1``, ``train.eps = 0.1``). The reference keeps ties in the
    mean as a constant ``log 2``; here give them ``weight`` 0 instead. ``weight``: ``(B,)``, as in DPO.

    Metrics (unweighted means, detached): ``loss``; ``implicit_acc`` (``beta * (log r_w - log r_l) > 0``,
    exact ties 0.5); ``reward_margin`` (mean of that clipped logit); ``ratio_w``/``ratio_l`` (mean
    unclipped ratio ``exp(logp - ref_logp)``); ``clip_frac`` (fraction of winner and loser ratios outside
    ``[1 - eps, 1 + eps]``, i.e. without gradient).
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    dtype = _compute_dtype(logp_w)
    log_ratio_w = logp_w.to(dtype) - ref_logp_w.detach().to(dtype)
    log_ratio_l = logp_l.to(dtype) - ref_logp_l.detach().to(dtype)
    lo, hi = math.log1p(-eps), math.log1p(eps)
    logits = beta * (log_ratio_w.clamp(lo, hi) - log_ratio_l.clamp(lo, hi))
    loss = _weighted_mean(-F.logsigmoid(logits), weight)

    clipped = torch.cat([(log_ratio_w < lo) | (log_ratio_w > hi), (log_ratio_l < lo) | (log_ratio_l > hi)])
    metrics = {
        "loss": loss,
        "implicit_acc": _implicit_accuracy(logits),
        "reward_margin": logits.mean(),
        "ratio_w": log_ratio_w.exp().mean(),
        "ratio_l": log_ratio_l.exp().mean(),
        "clip_frac": clipped.to(dtype).mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """What the training loop must compute for one objective, and the function that turns it into a loss.

    kind: ``"denoising"``: the loop passes ``model_pred_w``, ``target_w`` and, when ``needs_loser``,
        ``model_pred_l``, ``target_l``, and, when ``needs_reference``, ``ref_pred_w``, ``ref_pred_l``;
        ``"log_prob"``: the loop passes ``logp_w``, ``logp_l``, ``ref_logp_w``, ``ref_logp_l``.
        Every objective also takes ``weight`` and its :attr:`hyperparameters` as keywords; one whose signature
        has ``kl_reduce`` (KTO) also takes the loop's mean over processes of its batch KL estimate.
    per_image: the items are single images with a label: the loop passes ``desirable`` ``(B,)`` (bool) too.
    """

    fn: Callable[..., LossOutput]
    kind: Literal["denoising", "log_prob"]
    needs_loser: bool
    needs_reference: bool
    per_image: bool = False

    @property
    def hyperparameters(self) -> dict[str, float]:
        """Tunable keyword arguments of ``fn`` and their defaults, e.g. ``{"beta": 5000.0}``."""
        params = inspect.signature(self.fn).parameters.values()
        return {
            p.name: p.default
            for p in params
            if p.default is not inspect.Parameter.empty and p.name not in ("weight", "kl_reduce")
        }

    @property
    def reduces_kl(self) -> bool:
        """Whether the loss takes ``kl_reduce`` (a batch-wide estimate averaged over processes: KTO)."""
        return "kl_reduce" in inspect.signature(self.fn).parameters

    def __call__(self, **inputs: Any) -> LossOutput:
        return self.fn(**inputs)


OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(diffusion_dpo_loss, "denoising", needs_loser=True, needs_reference=True),
    "hinge": Objective(diffusion_hinge_loss, "denoising", needs_loser=True, needs_reference=True),
    "ipo": Objective(diffusion_ipo_loss, "denoising", needs_loser=True, needs_reference=True),
    "sft": Objective(sft_loss, "denoising", needs_loser=False, needs_reference=False),
    "mapo": Objective(mapo_loss, "denoising", needs_loser=True, needs_reference=False),
    "kto": Objective(diffusion_kto_loss, "denoising", needs_loser=True, needs_reference=True),
    "d3po": Objective(d3po_loss, "log_prob", needs_loser=True, needs_reference=True),
}
# The objectives that also learn from per-image feedback (`--feedback`), under the same name.
PER_IMAGE_OBJECTIVES: dict[str, Objective] = {
    "kto": Objective(kto_feedback_loss, "denoising", needs_loser=False, needs_reference=True, per_image=True),
}


def get_objective(name: str, per_image: bool = False) -> Objective:
    """The objective registered as ``name`` (its per-image form with `per_image`); a ValueError lists the
    valid names."""
    table = PER_IMAGE_OBJECTIVES if per_image else OBJECTIVES
    try:
        return table[name]
    except KeyError:
        what = "objective on per-image feedback" if per_image else "objective"
        raise ValueError(f"unknown {what} {name!r}: choose one of {', '.join(table)}") from None
