"""MaPO and Diffusion-KTO (trainer/losses.py) against numpy transcriptions of the published code, their
signs, and MaPO's promise: no reference forward, no frozen copy with --full, none in the memory plan."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.losses import OBJECTIVES, diffusion_kto_loss, get_objective, kto_image_loss, mapo_loss

SHAPE = (6, 4, 8, 8)


def _preds(seed: int = 0, shape=SHAPE, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("w", "l"):
        target = torch.randn(shape, generator=g, dtype=torch.float64)
        out[f"target_{side}"] = target
        out[f"model_pred_{side}"] = target + scale * torch.randn(shape, generator=g, dtype=torch.float64)
        out[f"ref_pred_{side}"] = target + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return out


def _np(t) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def _np_mse(pred, target) -> np.ndarray:
    d = _np(pred) - _np(target)
    return (d * d).reshape(d.shape[0], -1).mean(axis=1)


def _np_logsigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


# -------------------------------------------------------------------------------------------------------- MaPO


def _np_mapo(b: dict, beta=0.1, c=0.5, T=1000.0, weight=None):
    """mapo-t2i/mapo utils.py compute_loss (lines 286-301), in numpy."""
    mw, ml = _np_mse(b["model_pred_w"], b["target_w"]), _np_mse(b["model_pred_l"], b["target_l"])
    sw, sl = c * mw / (np.exp(c * mw) - 1), c * ml / (np.exp(c * ml) - 1)
    log_odds = sw - sl
    ratio_losses = beta * _np_logsigmoid(log_odds * T)
    per = mw - ratio_losses
    loss = per.mean() if weight is None else (weight * per).sum() / weight.sum()
    metrics = {"loss": loss, "mse_w": mw.mean(), "mse_l": ml.mean(), "score_w": sw.mean(), "score_l": sl.mean(),
               "ratio_loss": -ratio_losses.mean(), "reward_margin": (T * log_odds).mean(),
               "implicit_acc": (log_odds > 0).mean()}
    return loss, metrics


@pytest.mark.parametrize("beta,c,T,seed", [(0.1, 0.5, 1000.0, 0), (2.0, 1.3, 50.0, 1), (0.5, 0.1, 1.0, 2)])
def test_mapo_matches_the_reference_formula_and_metrics(beta, c, T, seed):
    b = _preds(seed)
    args = {k: b[k] for k in ("model_pred_w", "model_pred_l", "target_w", "target_l")}
    loss, metrics = mapo_loss(**args, beta=beta, snr_value=c, num_train_timesteps=T)
    want_loss, want = _np_mapo(b, beta, c, T)
    assert loss.item() == pytest.approx(want_loss, rel=1e-10)
    assert set(metrics) == set(want)
    for k, v in want.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert 0 < metrics["implicit_acc"].item() < 1  # the batch has pairs on both sides of the margin


def test_mapo_weight_is_a_weighted_mean_per_pair():
    b = _preds(3)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    args = {k: b[k] for k in ("model_pred_w", "model_pred_l", "target_w", "target_l")}
    loss, _ = mapo_loss(**args, weight=w)
    assert loss.item() == pytest.approx(_np_mapo(b, weight=_np(w))[0], rel=1e-10)


def test_mapo_score_at_zero_error_is_its_limit_one():
    zero = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    loss, metrics = mapo_loss(zero, zero + 1.0, zero, zero)
    assert metrics["score_w"].item() == 1.0 and np.isfinite(loss.item())
    assert metrics["score_l"].item() == pytest.approx(0.5 / np.expm1(0.5))


def test_mapo_moving_toward_the_winner_lowers_the_loss_and_toward_the_loser_raises_it():
    b = _preds(4)
    args = {k: b[k] for k in ("model_pred_w", "model_pred_l", "target_w", "target_l")}
    base = mapo_loss(**args)[0].item()
    closer_w = {**args, "model_pred_w": args["model_pred_w"] + 0.5 * (args["target_w"] - args["model_pred_w"])}
    closer_l = {**args, "model_pred_l": args["model_pred_l"] + 0.5 * (args["target_l"] - args["model_pred_l"])}
    assert mapo_loss(**closer_w)[0].item() < base < mapo_loss(**closer_l)[0].item()
    # and the gradient says the same: descending it lowers the winner's error relative to the loser's
    pw = args["model_pred_w"].clone().requires_grad_(True)
    pl = args["model_pred_l"].clone().requires_grad_(True)
    mapo_loss(pw, pl, args["target_w"], args["target_l"])[0].backward()
    assert (pw.grad * (pw.detach() - args["target_w"])).sum() > 0  # the gradient points away from the target
    assert (pl.grad * (pl.detach() - args["target_l"])).sum() < 0  # ... and toward the loser's


# ------------------------------------------------------------------------------------------------------ KTO


def _np_kto(pred, ref, target, desirable, beta=1000.0, wd=1.0, wu=1.0, weight=None):
    """jacklishufan/diffusion-kto train_kto_sd_v1.5.py lines 1394-1509 (kto, sigmoid, no offset), in numpy."""
    mse, ref_mse = _np_mse(pred, target), _np_mse(ref, target)
    g = -mse - (-ref_mse)
    kl = max(g.mean(), 0.0)
    g = g - kl
    sgn = 2 * desirable.astype(np.float64) - 1
    z = sgn * beta * g
    h = 1 / (1 + np.exp(-z))
    w_y = np.where(desirable, wd, wu)
    per = w_y * (1 - h)
    loss = per.mean() if weight is None else (weight * per).sum() / weight.sum()
    pos = g[desirable].mean() if desirable.any() else 0.0
    neg = g[~desirable].mean() if (~desirable).any() else 0.0
    return loss, {"loss": loss, "kl": kl, "reward_desirable": pos, "reward_undesirable": neg,
                  "implicit_acc": (z > 0).mean(), "mse": mse.mean(), "ref_mse": ref_mse.mean()}


@pytest.mark.parametrize("beta,wd,wu,seed,towards", [
    (1000.0, 1.0, 1.0, 0, 0.0),   # published defaults; the policy equal to the reference: KL 0
    (300.0, 1.0, 1.5, 1, 0.3),    # the policy nearer the targets than the reference: KL > 0, subtracted
    (50.0, 0.7, 1.0, 2, -0.3),    # the policy further: the KL estimate clamps to 0
])
def test_kto_matches_the_reference_formula_and_metrics(beta, wd, wu, seed, towards):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(8, 4, 8, 8, generator=g, dtype=torch.float64)
    ref = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    pred = ref + towards * (target - ref) + 0.003 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    loss, metrics = kto_image_loss(pred, ref, target, desirable, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    want_loss, want = _np_kto(pred, ref, target, desirable.numpy(), beta, wd, wu)
    assert loss.item() == pytest.approx(want_loss, rel=1e-9)
    assert set(metrics) == set(want)
    for k, v in want.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-9, abs=1e-12), k
    if towards > 0:
        assert metrics["kl"].item() > 0
    if towards < 0:
        assert metrics["kl"].item() == 0.0 and np.mean(_np_mse(ref, target) - _np_mse(pred, target)) < 0


def test_kto_on_pairs_is_winners_desirable_losers_undesirable_with_one_batch_kl():
    b = _preds(5, scale=0.05)
    w = torch.tensor([1.0, 0.5, 0.5, 1.0, 1.0, 2.0], dtype=torch.float64)
    loss, metrics = diffusion_kto_loss(**b, beta=700.0, weight=w)
    cat = {k: torch.cat([b[f"{k}_w"], b[f"{k}_l"]]) for k in ("model_pred", "ref_pred", "target")}
    desirable = np.array([True] * 6 + [False] * 6)
    want_loss, want = _np_kto(cat["model_pred"], cat["ref_pred"], cat["target"], desirable, beta=700.0,
                              weight=np.concatenate([_np(w), _np(w)]))
    assert loss.item() == pytest.approx(want_loss, rel=1e-9)
    for k, v in want.items():
        if k != "loss":
            assert metrics[k].item() == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_kto_with_one_class_only_reports_zero_for_the_absent_one():
    b = _preds(6, scale=0.05)
    _, metrics = kto_image_loss(b["model_pred_w"], b["ref_pred_w"], b["target_w"], torch.ones(6, dtype=torch.bool))
    assert metrics["reward_undesirable"].item() == 0.0 and metrics["reward_desirable"].item() != 0.0
    with pytest.raises(ValueError, match="desirable must have shape"):
        kto_image_loss(b["model_pred_w"], b["ref_pred_w"], b["target_w"], torch.ones(5, dtype=torch.bool))


def test_kto_moving_toward_the_desirable_image_lowers_the_loss():
    b = _preds(7, scale=0.05)
    base = diffusion_kto_loss(**b, beta=200.0)[0].item()
    toward_w = {**b, "model_pred_w": b["model_pred_w"] + 0.3 * (b["target_w"] - b["model_pred_w"])}
    toward_l = {**b, "model_pred_l": b["model_pred_l"] + 0.3 * (b["target_l"] - b["model_pred_l"])}
    assert diffusion_kto_loss(**toward_w, beta=200.0)[0].item() < base < diffusion_kto_loss(**toward_l, beta=200.0)[0].item()
    pw = b["model_pred_w"].clone().requires_grad_(True)
    pl = b["model_pred_l"].clone().requires_grad_(True)
    diffusion_kto_loss(pw, pl, b["ref_pred_w"], b["ref_pred_l"], b["target_w"], b["target_l"], beta=200.0)[0].backward()
    assert (pw.grad * (pw.detach() - b["target_w"])).sum() > 0
    assert (pl.grad * (pl.detach() - b["target_l"])).sum() < 0


# -------------------------------------------------------------------------------- the registry and the recipe


def test_registry_entries_and_published_defaults():
    mapo, kto = get_objective("mapo"), get_objective("kto")
    assert (mapo.needs_loser, mapo.needs_reference) == (True, False)
    assert (kto.needs_loser, kto.needs_reference) == (True, True)
    assert mapo.hyperparameters == {"beta": 0.1, "snr_value": 0.5, "num_train_timesteps": 1000.0}
    assert kto.hyperparameters == {"beta": 1000.0, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert {"mapo", "kto"} <= set(OBJECTIVES)


def test_options_override_the_hyperparameters_and_bad_ones_are_one_message():
    from prefpipe.core.errors import PrefpipeError
    from trainer.config import TrainConfig, hyperparameters

    cfg = TrainConfig(model="m", out="o", objective="mapo", beta=0.5, snr_value=0.2)
    assert hyperparameters(get_objective("mapo"), cfg) == {"beta": 0.5, "snr_value": 0.2, "num_train_timesteps": 1000.0}
    cfg = TrainConfig(model="m", out="o", objective="kto", undesirable_weight=1.33)
    assert hyperparameters(get_objective("kto"), cfg)["undesirable_weight"] == 1.33
    with pytest.raises(PrefpipeError, match="--snr-value: --objective dpo has no snr_value"):
        hyperparameters(get_objective("dpo"), TrainConfig(model="m", out="o", snr_value=0.5))
    with pytest.raises(PrefpipeError, match="--desirable-weight -1"):
        hyperparameters(get_objective("kto"), TrainConfig(model="m", out="o", objective="kto", desirable_weight=-1.0))


class _CountingUNet(torch.nn.Module):
    """Predicts a learnable scale of its input; counts its calls and the samples it saw."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[int] = []

    def forward(self, sample, timestep, **kwargs):
        self.calls.append(sample.shape[0])
        return SimpleNamespace(sample=self.scale * sample)


class _ForbiddenUNet(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the reference was called")


def _step(objective: str, unet, ref_unet, num_train_timesteps=1000):
    from diffusers import DDPMScheduler

    from trainer.conditioning import PromptEmbeds
    from trainer.data.pairs import PairBatch
    from trainer.recipes.dpo import objective_step

    g = torch.Generator().manual_seed(0)
    lat = torch.randn(3, 4, 4, 4, generator=g)
    batch = PairBatch(lat, -lat, PromptEmbeds(torch.zeros(3, 77, 8), None), None, None, torch.ones(3), ["a", "b", "c"])
    obj = get_objective(objective)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    accelerator = SimpleNamespace(autocast=contextlib.nullcontext, unwrap_model=lambda m: m)
    return objective_step(accelerator, unet, ref_unet, obj, dict(obj.hyperparameters), batch, scheduler,
                          [torch.Generator().manual_seed(i) for i in range(3)], "cpu", torch.float32)


def test_mapo_step_runs_one_policy_forward_and_never_the_reference():
    unet = _CountingUNet()
    loss, metrics = _step("mapo", unet, _ForbiddenUNet())
    assert unet.calls == [6]  # winners and losers of 3 pairs in one forward: 2 denoiser passes per pair
    loss.backward()
    assert unet.scale.grad is not None and set(metrics) >= {"mse_w", "mse_l", "ratio_loss", "implicit_acc"}
    # the scale is the scheduler's number of training timesteps, not the function's default
    from trainer.losses import Objective

    seen = {}

    def recorder(model_pred_w, model_pred_l, target_w, target_l, num_train_timesteps=1000.0, weight=None):
        seen["T"] = num_train_timesteps
        return mapo_loss(model_pred_w, model_pred_l, target_w, target_l, num_train_timesteps=num_train_timesteps)

    OBJECTIVES["_recorder"] = Objective(recorder, "denoising", needs_loser=True, needs_reference=False)
    try:
        _step("_recorder", _CountingUNet(), None, num_train_timesteps=50)
    finally:
        del OBJECTIVES["_recorder"]
    assert seen["T"] == 50


def test_kto_step_runs_the_policy_and_the_reference_once_each():
    unet, ref = _CountingUNet(), _CountingUNet()
    _, metrics = _step("kto", unet, ref)
    assert unet.calls == [6] and ref.calls == [6] and "kl" in metrics


def test_full_mapo_keeps_no_frozen_copy_and_full_dpo_does(tiny_sd15):
    from prefpipe.models import load_unet
    from trainer.config import TrainConfig
    from trainer.unet import prepare_unet

    for objective, copied in (("mapo", False), ("dpo", True)):
        unet = load_unet(tiny_sd15 / "unet")
        cfg = TrainConfig(model=str(tiny_sd15), out="x", objective=objective, full=True)
        _, ref_unet, params = prepare_unet(unet, cfg, get_objective(objective), torch.float32, "sd15")
        assert (ref_unet is not None) is copied, objective
        assert sum(p.numel() for p in params) == sum(p.numel() for p in unet.parameters())


def test_plan_of_full_mapo_has_no_reference_component(tmp_path):
    from trainer.config import TrainConfig
    from trainer.plan.configs import write_config_folder
    from trainer.plan.result import plan_training
    from trainer.recipes.dpo import objective_step

    small = {"unet": {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
                      "attention_head_dim": 8},
             "vae": {"block_out_channels": [32, 32, 32, 32]},
             "text_encoder": {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "projection_dim": 32}}
    model = write_config_folder("sd15", tmp_path / "sd15", small)
    plans = {}
    for objective in ("mapo", "dpo"):
        cfg = TrainConfig(model=str(model), out=None, plan=True, resolution=64, full=True, objective=objective)
        plans[objective] = plan_training(cfg, objective_step, granularity=1)
    mapo, dpo = plans["mapo"], plans["dpo"]
    assert mapo.settings["reference"] == "none" and "no reference" in mapo.format()
    assert "reference unet" not in mapo.at_peak["weights"] and not mapo.flops.get("reference forward")
    assert "reference unet" in dpo.at_peak["weights"] and dpo.flops["reference forward"] > 0
    assert dpo.peak - mapo.peak >= dpo.at_peak["weights"]["reference unet"] * 0.9
