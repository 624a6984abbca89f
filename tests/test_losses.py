"""Objectives in trainer/losses.py against independent computations (numpy, explicit loops, torch.distributions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from trainer.losses import (
    OBJECTIVES,
    d3po_loss,
    ddim_prev_timestep,
    ddim_scheduler_args,
    ddim_step_log_prob,
    ddim_step_mean_std,
    diffusion_dpo_loss,
    diffusion_hinge_loss,
    diffusion_ipo_loss,
    get_objective,
    sft_loss,
)

SHAPE = (4, 4, 8, 8)  # (B, C, H, W) latents


def _pair_batch(seed: int = 0, shape=SHAPE, scale: float = 0.05, requires_grad: bool = True):
    """Float64 winner/loser predictions near their targets, so beta=5000 leaves the sigmoid unsaturated."""
    g = torch.Generator().manual_seed(seed)
    target_w = torch.randn(shape, generator=g, dtype=torch.float64)
    target_l = torch.randn(shape, generator=g, dtype=torch.float64)

    def near(t):
        return t + scale * torch.randn(shape, generator=g, dtype=torch.float64)

    batch = {
        "model_pred_w": near(target_w).requires_grad_(requires_grad),
        "model_pred_l": near(target_l).requires_grad_(requires_grad),
        "ref_pred_w": near(target_w),
        "ref_pred_l": near(target_l),
        "target_w": target_w,
        "target_l": target_l,
    }
    return batch


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def _np_mse_loop(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-sample MSE by explicit loops over C, H, W."""
    out = np.zeros(pred.shape[0])
    for i in range(pred.shape[0]):
        total, count = 0.0, 0
        for c in range(pred.shape[1]):
            for h in range(pred.shape[2]):
                for w in range(pred.shape[3]):
                    total += (pred[i, c, h, w] - target[i, c, h, w]) ** 2
                    count += 1
        out[i] = total / count
    return out


def _np_inside(b: dict, beta: float) -> tuple[np.ndarray, dict]:
    mse = {
        "mse_w": _np_mse_loop(_np(b["model_pred_w"]), _np(b["target_w"])),
        "mse_l": _np_mse_loop(_np(b["model_pred_l"]), _np(b["target_l"])),
        "ref_mse_w": _np_mse_loop(_np(b["ref_pred_w"]), _np(b["target_w"])),
        "ref_mse_l": _np_mse_loop(_np(b["ref_pred_l"]), _np(b["target_l"])),
    }
    inside = 0.5 * beta * ((mse["ref_mse_w"] - mse["mse_w"]) - (mse["ref_mse_l"] - mse["mse_l"]))
    return inside, mse


# ---------------------------------------------------------------------------------------------- Diffusion-DPO


def test_dpo_loss_and_metrics_match_explicit_loop_computation():
    beta = 5000.0
    b = _pair_batch()
    loss, metrics = diffusion_dpo_loss(**b, beta=beta)
    inside, mse = _np_inside(b, beta)
    expected = np.mean(np.log1p(np.exp(-inside)))  # -log sigmoid(x) = log(1 + e^-x)

    assert 0.05 < np.abs(inside).mean() < 20  # the test exercises the unsaturated sigmoid
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert metrics["loss"].item() == pytest.approx(expected, rel=1e-10)
    for key, values in mse.items():
        assert metrics[key].item() == pytest.approx(values.mean(), rel=1e-10)
    assert metrics["reward_margin"].item() == pytest.approx(inside.mean(), rel=1e-10)
    assert metrics["reward_w"].item() == pytest.approx((beta / 2 * (mse["ref_mse_w"] - mse["mse_w"])).mean())
    assert metrics["reward_l"].item() == pytest.approx((beta / 2 * (mse["ref_mse_l"] - mse["mse_l"])).mean())
    assert metrics["implicit_acc"].item() == pytest.approx(np.mean(inside > 0))
    assert all(not v.requires_grad and v.ndim == 0 for v in metrics.values())


def test_dpo_gradients_match_closed_form():
    # d/dpred_w of -logsigmoid(inside_i) / B = beta * sigmoid(-inside_i) * (pred_w - target_w) / (B * D),
    # and the negative of that form for the loser; nothing reaches the reference.
    beta = 5000.0
    b = _pair_batch(seed=1)
    b["ref_pred_w"].requires_grad_(True)
    loss, _ = diffusion_dpo_loss(**b, beta=beta)
    loss.backward()

    inside, _ = _np_inside(b, beta)
    n, d = SHAPE[0], int(np.prod(SHAPE[1:]))
    coeff = (beta / (1 + np.exp(inside)) / (n * d))[:, None, None, None]
    grad_w = coeff * (_np(b["model_pred_w"]) - _np(b["target_w"]))
    grad_l = -coeff * (_np(b["model_pred_l"]) - _np(b["target_l"]))
    np.testing.assert_allclose(b["model_pred_w"].grad.numpy(), grad_w, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(b["model_pred_l"].grad.numpy(), grad_l, rtol=1e-9, atol=1e-15)
    assert b["ref_pred_w"].grad is None


@pytest.mark.parametrize("fn", [diffusion_dpo_loss, diffusion_hinge_loss, diffusion_ipo_loss])
def test_pair_losses_pass_finite_difference_gradcheck(fn):
    b = _pair_batch(seed=2, shape=(2, 1, 2, 2), scale=0.3)

    def f(pred_w, pred_l):
        return fn(pred_w, pred_l, b["ref_pred_w"], b["ref_pred_l"], b["target_w"], b["target_l"], beta=3.0)[0]

    assert torch.autograd.gradcheck(f, (b["model_pred_w"], b["model_pred_l"]))


def test_dpo_loss_is_log2_with_half_accuracy_when_policy_equals_reference():
    b = _pair_batch(seed=3, requires_grad=False)
    b["model_pred_w"] = b["ref_pred_w"].clone()
    b["model_pred_l"] = b["ref_pred_l"].clone()
    loss, metrics = diffusion_dpo_loss(**b)
    assert loss.item() == math.log(2)
    assert metrics["implicit_acc"].item() == 0.5
    assert metrics["reward_margin"].item() == 0.0

    loss32, _ = diffusion_dpo_loss(*(t.float() for t in b.values()))
    assert loss32.item() == pytest.approx(math.log(2), rel=1e-7)


def test_dpo_loss_falls_when_policy_winner_error_falls_and_its_gradient_reduces_that_error():
    b = _pair_batch(seed=4)
    loss, metrics = diffusion_dpo_loss(**b)
    loss.backward()

    closer = dict(b)
    closer["model_pred_w"] = b["target_w"] + 0.5 * (b["model_pred_w"].detach() - b["target_w"])
    loss_closer, metrics_closer = diffusion_dpo_loss(**closer)
    assert metrics_closer["mse_w"] < metrics["mse_w"]
    assert loss_closer < loss

    # Descent direction -grad lowers every winner's error and raises every loser's.
    err_w = b["model_pred_w"].detach() - b["target_w"]
    err_l = b["model_pred_l"].detach() - b["target_l"]
    assert ((b["model_pred_w"].grad * err_w).sum(dim=(1, 2, 3)) > 0).all()
    assert ((b["model_pred_l"].grad * err_l).sum(dim=(1, 2, 3)) < 0).all()


def test_dpo_implicit_accuracy_counts_exact_ties_as_half():
    # Pair 0 right (winner improves on the reference), pair 1 an exact tie (policy == reference),
    # pair 2 wrong (winner worse than the reference): accuracy (1 + 0.5 + 0) / 3.
    target = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    ref = torch.ones_like(target)
    pred_w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).view(3, 1, 1, 1).expand_as(target)
    _, metrics = diffusion_dpo_loss(pred_w, ref, ref, ref, target, target, beta=1.0)
    assert metrics["implicit_acc"].item() == pytest.approx(0.5)


def test_weighted_dpo_equals_hand_computed_weighted_mean():
    beta = 5000.0
    b = _pair_batch(seed=5, shape=(2, 4, 8, 8))
    weight = torch.tensor([1.0, 0.5], dtype=torch.float64)
    loss, _ = diffusion_dpo_loss(**b, beta=beta, weight=weight)
    inside, _ = _np_inside(b, beta)
    per_pair = np.log1p(np.exp(-inside))
    assert loss.item() == pytest.approx((1.0 * per_pair[0] + 0.5 * per_pair[1]) / 1.5, rel=1e-10)

    unweighted, _ = diffusion_dpo_loss(**b, beta=beta)
    ones, _ = diffusion_dpo_loss(**b, beta=beta, weight=torch.ones(2, dtype=torch.float64))
    assert ones.item() == pytest.approx(unweighted.item(), rel=1e-12)


def test_dpo_rejects_a_weight_of_the_wrong_shape():
    with pytest.raises(ValueError, match="weight must have shape"):
        diffusion_dpo_loss(**_pair_batch(), weight=torch.ones(3))


def test_hinge_loss_matches_numpy_and_ignores_pairs_beyond_the_margin():
    beta = 5000.0
    b = _pair_batch(seed=6, requires_grad=False)
    # Pairs 0 and 1: the policy's winner error is a tenth of the reference's, far beyond the margin.
    b["model_pred_w"][:2] = b["target_w"][:2] + 0.1 * (b["ref_pred_w"][:2] - b["target_w"][:2])
    b["model_pred_w"].requires_grad_(True)
    loss, metrics = diffusion_hinge_loss(**b, beta=beta)
    inside, _ = _np_inside(b, beta)
    assert loss.item() == pytest.approx(np.maximum(0.0, 1.0 - inside).mean(), rel=1e-10)
    assert metrics["reward_margin"].item() == pytest.approx(inside.mean(), rel=1e-10)

    loss.backward()
    beyond = torch.from_numpy(inside >= 1.0)
    assert beyond.any() and (~beyond).any()  # the seed covers both cases
    assert (b["model_pred_w"].grad[beyond] == 0).all()
    assert (b["model_pred_w"].grad[~beyond].abs().sum(dim=(1, 2, 3)) > 0).all()


def test_ipo_loss_matches_numpy_and_is_zero_at_the_target_margin():
    beta = 5000.0
    b = _pair_batch(seed=7)
    loss, _ = diffusion_ipo_loss(**b, beta=beta)
    inside, _ = _np_inside(b, beta)
    h = inside / beta  # log-ratio difference
    assert loss.item() == pytest.approx(np.mean((h - 1 / (2 * beta)) ** 2), rel=1e-10)

    # A single pair whose inside term is exactly 1/2 (h = 1/(2 beta)) has zero loss.
    target = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    ref = torch.ones_like(target)
    pred_w = torch.full_like(target, math.sqrt(1 - 1 / beta))  # mse_w = 1 - 1/beta; inside = beta/2 * 1/beta
    loss_at_margin, _ = diffusion_ipo_loss(pred_w, ref, ref, ref, target, target, beta=beta)
    assert loss_at_margin.item() == pytest.approx(0.0, abs=1e-20)


def test_dpo_upcasts_half_precision_inputs_to_float32():
    b = {k: v.detach().half() for k, v in _pair_batch(seed=8).items()}
    loss, metrics = diffusion_dpo_loss(**b)
    assert loss.dtype == torch.float32
    assert metrics["mse_w"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------------ SFT


def test_sft_loss_is_winner_mse_with_closed_form_gradient():
    b = _pair_batch(seed=9)
    loss, metrics = sft_loss(b["model_pred_w"], b["target_w"])
    expected = _np_mse_loop(_np(b["model_pred_w"]), _np(b["target_w"])).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert metrics == {"loss": pytest.approx(expected), "mse_w": pytest.approx(expected)}

    loss.backward()
    n_elements = int(np.prod(SHAPE))
    np.testing.assert_allclose(
        b["model_pred_w"].grad.numpy(),
        2 * (_np(b["model_pred_w"]) - _np(b["target_w"])) / n_elements,
        rtol=1e-10,
    )


# ----------------------------------------------------------------------------------------------------- D3PO


def _np_d3po_reference(logp_w, logp_l, ref_w, ref_l, beta, eps):
    """The reference script's formula, literally: clamp(exp(.)), then log, then -log(sigmoid(.))."""
    ratio_w = np.clip(np.exp(logp_w - ref_w), 1 - eps, 1 + eps)
    ratio_l = np.clip(np.exp(logp_l - ref_l), 1 - eps, 1 + eps)
    z = beta * np.log(ratio_w) - beta * np.log(ratio_l)
    return -np.log(1 / (1 + np.exp(-z))), z


def _logps(seed: int, n: int = 64, spread: float = 0.15):
    g = torch.Generator().manual_seed(seed)
    ref_w, ref_l = (-1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
    logp_w = (ref_w + spread * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    logp_l = (ref_l + spread * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    return logp_w, logp_l, ref_w, ref_l


def test_d3po_loss_and_gradients_match_the_reference_formula_with_clipping():
    beta, eps = 2.0, 0.1
    logp_w, logp_l, ref_w, ref_l = _logps(seed=10)
    loss, metrics = d3po_loss(logp_w, logp_l, ref_w, ref_l, beta=beta, eps=eps)
    per_pair, z = _np_d3po_reference(_np(logp_w), _np(logp_l), _np(ref_w), _np(ref_l), beta, eps)
    assert loss.item() == pytest.approx(per_pair.mean(), rel=1e-10)
    assert metrics["reward_margin"].item() == pytest.approx(z.mean(), rel=1e-10)
    assert (z == 0).any()  # both ratios clipped on the same side: a tie
    assert metrics["implicit_acc"].item() == pytest.approx(np.mean(z > 0) + 0.5 * np.mean(z == 0))

    # Closed form: inside the clip, dloss/dlogp_w = -beta * sigmoid(-z) / n (loser: the opposite); outside, 0.
    loss.backward()
    lw, ll = _np(logp_w) - _np(ref_w), _np(logp_l) - _np(ref_l)
    inside_w = (lw > math.log1p(-eps)) & (lw < math.log1p(eps))
    inside_l = (ll > math.log1p(-eps)) & (ll < math.log1p(eps))
    assert inside_w.any() and (~inside_w).any()  # the seed covers both cases
    s = 1 / (1 + np.exp(z)) / len(z)
    np.testing.assert_allclose(
        logp_w.grad.numpy(), np.where(inside_w, -beta * s, 0.0), rtol=1e-10, atol=1e-15
    )
    np.testing.assert_allclose(logp_l.grad.numpy(), np.where(inside_l, beta * s, 0.0), rtol=1e-10, atol=1e-15)

    ratios = np.exp(np.concatenate([lw, ll]))
    assert metrics["clip_frac"].item() == pytest.approx(np.mean((ratios < 1 - eps) | (ratios > 1 + eps)))
    assert metrics["ratio_w"].item() == pytest.approx(np.exp(lw).mean(), rel=1e-10)
    assert metrics["ratio_l"].item() == pytest.approx(np.exp(ll).mean(), rel=1e-10)


def test_d3po_passes_finite_difference_gradcheck_inside_the_clip():
    logp_w, logp_l, ref_w, ref_l = _logps(seed=11, n=6, spread=0.02)

    def f(lw, ll):
        return d3po_loss(lw, ll, ref_w, ref_l, beta=5.0, eps=0.1)[0]

    assert torch.autograd.gradcheck(f, (logp_w, logp_l))


def test_d3po_loss_is_log2_with_half_accuracy_when_policy_equals_reference():
    _, _, ref_w, ref_l = _logps(seed=12)
    loss, metrics = d3po_loss(ref_w.clone(), ref_l.clone(), ref_w, ref_l)
    assert loss.item() == math.log(2)
    assert metrics["implicit_acc"].item() == 0.5
    assert metrics["ratio_w"].item() == 1.0
    assert metrics["clip_frac"].item() == 0.0


def test_d3po_loss_falls_when_winner_log_prob_rises_and_its_gradient_raises_it():
    logp_w, logp_l, ref_w, ref_l = _logps(seed=13, spread=0.02)
    loss, _ = d3po_loss(logp_w, logp_l, ref_w, ref_l)
    loss.backward()
    higher, _ = d3po_loss(logp_w.detach() + 0.01, logp_l, ref_w, ref_l)
    assert higher < loss
    assert (logp_w.grad <= 0).all() and (logp_w.grad < 0).any()
    assert (logp_l.grad >= 0).all() and (logp_l.grad > 0).any()


def test_d3po_gradient_stays_finite_for_log_ratios_that_would_overflow_exp():
    logp_w = torch.tensor([800.0, 0.0], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(2, dtype=torch.float64)
    loss, metrics = d3po_loss(logp_w, zeros, zeros, zeros)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp_w.grad).all()
    assert logp_w.grad[0] == 0  # clipped: no gradient
    assert metrics["clip_frac"].item() == pytest.approx(0.25)


def test_d3po_accepts_per_step_log_probs_and_weights_pairs():
    logp_w, logp_l, ref_w, ref_l = (t.detach().reshape(4, 16) for t in _logps(seed=14))
    weight = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    loss, _ = d3po_loss(logp_w, logp_l, ref_w, ref_l, beta=2.0, weight=weight)
    per, _ = _np_d3po_reference(_np(logp_w), _np(logp_l), _np(ref_w), _np(ref_l), 2.0, 0.1)
    expected = (per.mean(axis=1) * weight.numpy()).sum() / weight.numpy().sum()
    assert loss.item() == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------------- DDIM step log-probability


def _scheduler(**config) -> DDIMScheduler:
    # SD 1.5's scheduler settings, with the knobs the tests vary.
    base = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }
    scheduler = DDIMScheduler(**{**base, **config})
    scheduler.set_timesteps(4)
    return scheduler


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"prediction_type": "v_prediction"},
        {"set_alpha_to_one": True},
    ],
    ids=["sd15", "clip_sample", "v_prediction", "alpha_to_one"],
)
def test_ddim_log_prob_reproduces_normal_log_prob_around_the_scheduler_mean(config):
    scheduler = _scheduler(**config)
    g = torch.Generator().manual_seed(15)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    n_train, n_steps = scheduler.config.num_train_timesteps, scheduler.num_inference_steps
    checked = 0
    for t in scheduler.timesteps:
        prev_t = int(t) - n_train // n_steps
        if prev_t < 0 and scheduler.config.set_alpha_to_one:
            continue  # deterministic final step: covered by the next test
        model_output = 2 * torch.randn(sample.shape, generator=g)  # big enough to hit the x0 clip
        prev_sample = scheduler.step(model_output, t, sample, eta=1.0, generator=g).prev_sample
        mean = scheduler.step(
            model_output, t, sample, eta=1.0, variance_noise=torch.zeros_like(sample)
        ).prev_sample
        std = scheduler._get_variance(int(t), prev_t) ** 0.5  # noqa: SLF001 - diffusers' own variance as the reference
        expected = torch.distributions.Normal(mean.double(), std.double()).log_prob(prev_sample.double())
        expected = expected.mean(dim=(1, 2, 3))

        step = ddim_step_log_prob(
            model_output,
            t,
            sample,
            prev_sample,
            prev_timestep=ddim_prev_timestep(t, n_train, n_steps),
            eta=1.0,
            **ddim_scheduler_args(scheduler),
        )
        torch.testing.assert_close(step.log_prob.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step.std.flatten(), std.expand(2), rtol=1e-6, atol=0)
        sample = prev_sample
        checked += 1
    assert checked >= 3


def test_ddim_log_prob_takes_a_different_timestep_per_sample():
    scheduler = _scheduler()
    args = ddim_scheduler_args(scheduler)
    g = torch.Generator().manual_seed(16)
    sample, model_output, prev_sample = (
        torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)
    )
    timesteps = scheduler.timesteps[[0, 2, 3]]
    prev = ddim_prev_timestep(timesteps, scheduler.config.num_train_timesteps, scheduler.num_inference_steps)
    batched = ddim_step_log_prob(model_output, timesteps, sample, prev_sample, prev_timestep=prev, **args)
    for i in range(3):
        one = ddim_step_log_prob(
            model_output[i : i + 1],
            timesteps[i],
            sample[i : i + 1],
            prev_sample[i : i + 1],
            prev_timestep=prev[i],
            **args,
        )
        torch.testing.assert_close(batched.log_prob[i : i + 1], one.log_prob)


def test_ddim_log_prob_is_maximal_at_the_mean():
    scheduler = _scheduler()
    args = ddim_scheduler_args(scheduler)
    g = torch.Generator().manual_seed(17)
    sample, model_output = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = scheduler.timesteps[1]
    prev_t = ddim_prev_timestep(t, scheduler.config.num_train_timesteps, scheduler.num_inference_steps)
    mean, std = ddim_step_mean_std(model_output, t, sample, prev_timestep=prev_t, **args)

    at_mean = ddim_step_log_prob(model_output, t, sample, mean, prev_timestep=prev_t, **args).log_prob
    peak = -torch.log(std.flatten()) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(at_mean, peak)
    for _ in range(5):
        moved = mean + std * torch.randn(mean.shape, generator=g, dtype=torch.float64)
        assert (
            ddim_step_log_prob(model_output, t, sample, moved, prev_timestep=prev_t, **args).log_prob
            < at_mean
        ).all()


def test_ddim_log_prob_gradient_flows_to_the_model_output_only():
    scheduler = _scheduler()
    args = ddim_scheduler_args(scheduler)
    g = torch.Generator().manual_seed(18)
    sample, prev_sample = (torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    model_output = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = scheduler.timesteps[1]
    prev_t = ddim_prev_timestep(t, scheduler.config.num_train_timesteps, scheduler.num_inference_steps)

    def f(out):
        return ddim_step_log_prob(out, t, sample, prev_sample, prev_timestep=prev_t, **args).log_prob

    assert torch.autograd.gradcheck(f, (model_output,))
    recorded = prev_sample.clone().requires_grad_(True)
    ddim_step_log_prob(
        model_output, t, sample, recorded, prev_timestep=prev_t, **args
    ).log_prob.sum().backward()
    assert recorded.grad is None


def test_ddim_log_prob_refuses_deterministic_steps():
    scheduler = _scheduler(set_alpha_to_one=True)
    args = ddim_scheduler_args(scheduler)
    x = torch.randn(1, 4, 8, 8)
    last = scheduler.timesteps[-1]
    prev = ddim_prev_timestep(last, scheduler.config.num_train_timesteps, scheduler.num_inference_steps)
    assert prev < 0
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        ddim_step_log_prob(x, last, x, x, prev_timestep=prev, **args)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_log_prob(x, scheduler.timesteps[0], x, x, prev_timestep=0, eta=0.0, **args)


def test_ddim_scheduler_args_refuse_dynamic_thresholding():
    with pytest.raises(ValueError, match="thresholding"):
        ddim_scheduler_args(_scheduler(thresholding=True))


# -------------------------------------------------------------------------------------------------- dispatch


def test_every_objective_runs_from_the_inputs_its_entry_declares():
    b = _pair_batch(seed=19, requires_grad=False)
    logp_w, logp_l, ref_w, ref_l = (t.detach() for t in _logps(seed=19, n=4))
    for name, objective in OBJECTIVES.items():
        if objective.kind == "denoising":
            inputs = {"model_pred_w": b["model_pred_w"], "target_w": b["target_w"]}
            if objective.needs_loser:
                inputs |= {"model_pred_l": b["model_pred_l"], "target_l": b["target_l"]}
            if objective.needs_reference:
                inputs |= {"ref_pred_w": b["ref_pred_w"], "ref_pred_l": b["ref_pred_l"]}
        else:
            inputs = {"logp_w": logp_w, "logp_l": logp_l, "ref_logp_w": ref_w, "ref_logp_l": ref_l}
        loss, metrics = objective(
            **inputs, **objective.hyperparameters, weight=torch.ones(4, dtype=torch.float64)
        )
        assert loss.ndim == 0 and torch.isfinite(loss), name
        assert metrics["loss"].item() == loss.item(), name


def test_objective_hyperparameters_are_the_reference_defaults():
    assert get_objective("dpo").hyperparameters == {"beta": 5000.0}
    assert get_objective("d3po").hyperparameters == {"beta": 0.1, "eps": 0.1}
    assert get_objective("sft").hyperparameters == {}
    assert not get_objective("sft").needs_reference


def test_unknown_objective_names_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of dpo, hinge, ipo, sft, .*mapo, kto"):
        get_objective("orpo")
