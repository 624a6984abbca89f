"""Flow-DPO on flow-matching models (SD3.x, FLUX.1): the step against numpy, and `prefpipe train` on tiny pipelines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prefpipe.core.errors import PrefpipeError
from tests.conftest import ACCELERATE_LAUNCH, REPO, run_cli
from tests.test_train import _metrics, _pairs
from trainer.config import TrainConfig
from trainer.flow import (
    FlowMatching,
    add_noise,
    latent_image_ids,
    pack_latents,
    sigma_of,
    unpack_latents,
    velocity,
)
from trainer.losses import get_objective

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------------
# The step, on tensors
# ------------------------------------------------------------------------------------------------------


def _np_logsigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _np_flow_dpo(x_w, x_l, eps, sigma, pred_w, pred_l, ref_w, ref_l, beta, weight=None):
    """The published Flow-DPO loss in numpy (float64): noising, velocity target, Diffusion-DPO on the errors
    (each squared error times `weight` (B,) when given, as diffusers' weighting schemes)."""
    s = sigma.reshape(-1, 1, 1, 1)
    w = np.ones(len(sigma)) if weight is None else weight
    noisy_w, noisy_l = (1 - s) * x_w + s * eps, (1 - s) * x_l + s * eps
    v_w, v_l = eps - x_w, eps - x_l
    mse = lambda p, t: w * ((p - t) ** 2).reshape(len(p), -1).mean(axis=1)  # noqa: E731
    inside = -0.5 * beta * ((mse(pred_w, v_w) - mse(ref_w, v_w)) - (mse(pred_l, v_l) - mse(ref_l, v_l)))
    return noisy_w, noisy_l, float(np.mean(-_np_logsigmoid(inside)))


def test_flow_dpo_loss_matches_an_independent_numpy_computation():
    rng = np.random.default_rng(0)
    b, shape = 3, (16, 4, 6)
    x_w, x_l, eps = (rng.standard_normal((b, *shape)) for _ in range(3))
    sigma = rng.uniform(0.05, 0.95, b)
    pred_w, pred_l, ref_w, ref_l = (rng.standard_normal((b, *shape)) for _ in range(4))
    beta = 7.0
    noisy_w, noisy_l, expected = _np_flow_dpo(x_w, x_l, eps, sigma, pred_w, pred_l, ref_w, ref_l, beta)

    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    np.testing.assert_allclose(add_noise(t(x_w), t(eps), t(sigma)).numpy(), noisy_w, rtol=1e-12)
    np.testing.assert_allclose(add_noise(t(x_l), t(eps), t(sigma)).numpy(), noisy_l, rtol=1e-12)
    loss, metrics = get_objective("dpo")(
        model_pred_w=t(pred_w), model_pred_l=t(pred_l), ref_pred_w=t(ref_w), ref_pred_l=t(ref_l),
        target_w=velocity(t(x_w), t(eps)), target_l=velocity(t(x_l), t(eps)), beta=beta)
    assert float(loss) == pytest.approx(expected, rel=1e-10)


def test_moving_the_policy_toward_the_winners_velocity_lowers_the_loss():
    gen = torch.Generator().manual_seed(1)
    x_w, x_l, eps = (torch.randn(2, 16, 4, 4, generator=gen) for _ in range(3))
    v_w, v_l = velocity(x_w, eps), velocity(x_l, eps)
    ref_w, ref_l = v_w + torch.randn(v_w.shape, generator=gen), v_l + torch.randn(v_l.shape, generator=gen)
    dpo = get_objective("dpo")
    at_ref, _ = dpo(model_pred_w=ref_w, model_pred_l=ref_l, ref_pred_w=ref_w, ref_pred_l=ref_l, target_w=v_w,
                    target_l=v_l, beta=10.0)
    assert float(at_ref) == pytest.approx(math.log(2), abs=1e-6)
    toward, _ = dpo(model_pred_w=ref_w + 0.3 * (v_w - ref_w), model_pred_l=ref_l, ref_pred_w=ref_w, ref_pred_l=ref_l,
                    target_w=v_w, target_l=v_l, beta=10.0)
    away, _ = dpo(model_pred_w=ref_w, model_pred_l=ref_l + 0.3 * (v_l - ref_l), ref_pred_w=ref_w, ref_pred_l=ref_l,
                  target_w=v_w, target_l=v_l, beta=10.0)
    assert float(toward) < math.log(2) < float(away)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_sigmas_are_the_schedulers_shifted_table_at_the_logit_normal_draw(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    flow = FlowMatching("sd3", shift=FlowMatching.default_shift(dict(scheduler.config)))
    seeds = list(range(40))
    sigmas = flow.draw_sigmas([torch.Generator().manual_seed(s) for s in seeds])
    # independently: u = sigmoid(z) of each pair's first normal draw; the examples index the scheduler's table
    z = np.array([torch.randn(1, generator=torch.Generator().manual_seed(s)).item() for s in seeds], dtype=np.float64)
    index = np.floor(1 / (1 + np.exp(-z)) * 1000).astype(int)
    np.testing.assert_allclose(sigmas.numpy(), scheduler.sigmas[index].numpy(), rtol=1e-6)
    assert FlowMatching.default_shift({"shift": 3.0, "use_dynamic_shifting": True}) == 1.0  # FLUX.1's config
    assert float(sigma_of(torch.tensor([0.0]), 3.0)) == pytest.approx(1.0)


def test_flux_packing_and_position_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 4)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 4))  # noqa: SLF001 - the reference
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 32, 8), x)  # noqa: SLF001
    assert torch.equal(latent_image_ids(6, 4, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32))  # noqa: SLF001


class _LinearSD3(torch.nn.Module):
    """A stand-in with SD3Transformer2DModel's call: pred = a * x + c * timestep / 1000 + mean(text) + mean(pooled)."""

    def __init__(self, a: float, c: float):
        super().__init__()
        self.a, self.c = torch.nn.Parameter(torch.tensor(a)), torch.nn.Parameter(torch.tensor(c))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=True):
        extra = encoder_hidden_states.mean(dim=(1, 2)) + pooled_projections.mean(dim=1)
        out = self.a * hidden_states + (self.c * timestep / 1000 + extra).reshape(-1, 1, 1, 1)
        return (out,)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_objective_step_on_a_flow_model_is_the_numpy_computation(scheme):
    """The recipe's one objective_step with a FlowMatching: each pair's draws (u, then noise) from its generator,
    shared by winner and loser, x_t, the velocity target, policy and reference calls, the weighting scheme's
    density or error weight, the DPO loss."""
    from trainer.conditioning import PromptEmbeds
    from trainer.data.pairs import PairBatch
    from trainer.plan.step import PlanAccelerator
    from trainer.recipes.dpo import objective_step

    b, shape = 2, (16, 4, 4)
    gen = torch.Generator().manual_seed(3)
    x_w, x_l = torch.randn(b, *shape, generator=gen), torch.randn(b, *shape, generator=gen)
    text, pooled = torch.randn(b, 5, 8, generator=gen), torch.randn(b, 6, generator=gen)
    batch = PairBatch(x_w, x_l, PromptEmbeds(text, pooled), None, None, torch.ones(b), ["a", "b"])
    policy, reference = _LinearSD3(0.9, 0.2), _LinearSD3(0.7, -0.1)
    flow = FlowMatching("sd3", scheme=scheme, shift=3.0)
    seeds = [11, 12]
    loss, metrics = objective_step(PlanAccelerator(torch.float32), policy, reference, get_objective("dpo"),
                                   {"beta": 50.0}, batch, flow, [torch.Generator().manual_seed(s) for s in seeds],
                                   "cpu", torch.float32)

    sigma, eps = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        if scheme == "logit_normal":
            u = 1 / (1 + math.exp(-torch.randn(1, generator=g).double().item()))
        else:
            u = torch.rand(1, generator=g).double().item()
            if scheme == "mode":
                u = 1 - u - 1.29 * (math.cos(math.pi * u / 2) ** 2 - 1 + u)
        t = (1000 - math.floor(u * 1000)) / 1000
        sigma.append(3 * t / (1 + 2 * t))
        eps.append(torch.randn(shape, generator=g).double().numpy())
    sigma, eps = np.array(sigma), np.stack(eps)
    weight = {"sigma_sqrt": sigma ** -2.0, "cosmap": 2 / (np.pi * (1 - 2 * sigma + 2 * sigma**2))}.get(scheme)
    xw, xl = x_w.double().numpy(), x_l.double().numpy()
    extra = (text.double().numpy().mean(axis=(1, 2)) + pooled.double().numpy().mean(axis=1)).reshape(-1, 1, 1, 1)
    s = sigma.reshape(-1, 1, 1, 1)
    noisy_w, noisy_l = (1 - s) * xw + s * eps, (1 - s) * xl + s * eps

    def model(a, c, x):
        return a * x + c * s * 1000 / 1000 + extra

    _, _, expected = _np_flow_dpo(xw, xl, eps, sigma, model(0.9, 0.2, noisy_w), model(0.9, 0.2, noisy_l),
                                  model(0.7, -0.1, noisy_w), model(0.7, -0.1, noisy_l), 50.0, weight)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert policy.a.grad is not None and reference.a.grad is None


# ------------------------------------------------------------------------------------------------------
# `prefpipe train` on tiny SD3 and FLUX pipelines (prefpipe.testing.tiny, trained at 32 px)
# ------------------------------------------------------------------------------------------------------

FAMILIES = ["sd3", "flux"]
T5_TOKENS = "16"  # --max-sequence-length: short T5 captions keep the tiny runs quick


@pytest.fixture(scope="module")
def flow_models(tiny_sd3, tiny_flux) -> dict[str, Path]:
    """The session's tiny pipelines (tests/conftest.py, 64 px native); the tests train and sample them at 32 px."""
    return {"sd3": tiny_sd3, "flux": tiny_flux}


@pytest.fixture(scope="module")
def flow_pairs(tmp_path_factory) -> Path:
    return _pairs(tmp_path_factory.mktemp("flow-pairs") / "pairs")


def _train_args(model, pairs, out, cache, steps: int) -> list[str]:
    """One pair per micro-batch, two micro-batches per step: the layout 2 processes x 1 pair reproduce."""
    return ["train", "--model", str(model), "--pairs", str(pairs), "--out", str(out), "--cache-dir", str(cache),
            "--resolution", "32", "--batch-size", "1", "--gradient-accumulation", "2", "--max-steps", str(steps),
            "--learning-rate", "1e-3", "--max-sequence-length", T5_TOKENS, "--checkpoint-every", "2", "--no-progress"]


def _images(model, lora=None) -> np.ndarray:
    """Two images from the pipeline's own class, with `load_lora_weights` when `lora` is given."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    out = pipe(["a red box", "a blue box"], num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0), max_sequence_length=int(T5_TOKENS))
    return out.images


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_flow_dpo_starts_at_log_2_exports_a_lora_the_pipeline_loads_resumes_and_runs_on_two_processes(
        family, flow_models, flow_pairs, tmp_path):
    import subprocess

    from safetensors.torch import load_file

    from trainer.recipes import train

    model = flow_models[family]
    straight = tmp_path / "straight"
    proc = run_cli(*_train_args(model, flow_pairs, straight, tmp_path / "cache", 4))
    assert f"| {family}, 32 px, flow-matching velocity target" in proc.stderr
    assert "MiB" in proc.stderr  # the cache reports its size
    metrics = _metrics(straight)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # LoRA B starts at zero: the policy is the reference, so the first Flow-DPO loss is log 2
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[0]["mse_w"] == metrics[0]["ref_mse_w"] and metrics[0]["implicit_acc"] == 0.5
    assert all(math.isfinite(m[k]) for m in metrics for k in ("loss", "mse_w", "mse_l", "grad_norm"))
    assert metrics[-1]["loss"] != pytest.approx(math.log(2))  # the adapters moved

    # the exported file: the transformer's adapters, joint attention's text projections included, which the
    # pipeline class's own load_lora_weights loads; they change the pixels
    keys = list(load_file(str(straight / "pytorch_lora_weights.safetensors")))
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".add_q_proj.lora_A" in k for k in keys) and any(".to_q.lora_B" in k for k in keys)
    base, tuned = _images(model), _images(model, straight)
    assert np.isfinite(tuned).all() and np.abs(tuned - base).max() > 1e-4

    # resume: 2 steps, then --resume latest to 4 = 4 steps straight
    args = dict(model=str(model), pairs=(str(flow_pairs),), out=str(tmp_path / "resumed"),
                cache_dir=str(tmp_path / "cache"), resolution=32, batch_size=1, gradient_accumulation=2,
                learning_rate=1e-3, max_sequence_length=int(T5_TOKENS), checkpoint_every=2, no_progress=True)
    train(TrainConfig(max_steps=2, **args))
    summary = train(TrainConfig(max_steps=4, resume="latest", **args))
    assert summary["steps_run"] == 2
    for a, b in zip(metrics, _metrics(tmp_path / "resumed"), strict=True):
        for key in ("loss", "mse_w", "mse_l", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)

    # 2 processes x 1 pair = 1 process x 1 pair x 2 accumulation: the same pairs and per-pair draws, the same losses
    args = _train_args(model, flow_pairs, tmp_path / "two", tmp_path / "cache-two", 4)
    args[args.index("--gradient-accumulation") + 1] = "1"
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "-m", "prefpipe", *args]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 pairs/process x 2 process(es)" in proc.stderr
    # The errors agree to float32 rounding (the gradients are summed in another order); the loss multiplies their
    # differences by beta / 2 = 2500, so it agrees to 1e-3 (its value moves by 0.1 to 1 between steps).
    for a, b in zip(metrics, _metrics(tmp_path / "two"), strict=True):
        for key in ("mse_w", "mse_l", "ref_mse_w", "ref_mse_l"):
            assert a[key] == pytest.approx(b[key], rel=2e-6), (a["step"], key)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3), a["step"]


@pytest.mark.parametrize("family", FAMILIES)
def test_conditioning_is_the_pipelines_encode_prompt_and_is_cached_in_the_training_dtype(family, flow_models):
    from diffusers import DiffusionPipeline

    from trainer.conditioning import TextConditioner
    from trainer.data.cache import Encoders

    pipe = DiffusionPipeline.from_pretrained(str(flow_models[family]))
    captions = ["a red box", "a blue circle on a long striped background"]
    ours = TextConditioner(pipe, max_sequence_length=int(T5_TOKENS)).encode(captions)
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                                  max_sequence_length=int(T5_TOKENS))
    else:
        embeds, pooled, _ = pipe.encode_prompt(captions, captions, max_sequence_length=int(T5_TOKENS))
    torch.testing.assert_close(ours.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    # what the cache stores: T5's embeddings in the training dtype (bf16 here), not the UNet families' float16
    stored = Encoders(None, TextConditioner(pipe, dtype=torch.bfloat16, max_sequence_length=int(T5_TOKENS))).captions(
        captions)
    assert stored.prompt_embeds.dtype == torch.bfloat16 and stored.pooled.dtype == torch.bfloat16
    assert stored.prompt_embeds.shape == embeds.shape


def test_full_fine_tuning_writes_the_transformer_folder_and_d3po_is_refused(flow_models, flow_pairs, tmp_path):
    from diffusers import SD3Transformer2DModel

    from trainer.recipes import train

    model = flow_models["sd3"]
    run = tmp_path / "full"
    train(TrainConfig(model=str(model), pairs=(str(flow_pairs),), out=str(run), cache_dir=str(tmp_path / "cache"),
                      resolution=32, batch_size=2, max_steps=1, learning_rate=1e-3, full=True, objective="sft",
                      gradient_checkpointing=True, max_sequence_length=int(T5_TOKENS), checkpoint_every=0,
                      no_progress=True))
    # the cache keeps T5's embeddings in the training dtype (float32 here), the latents in float16
    from safetensors import safe_open

    (unit,) = (tmp_path / "cache").glob("pairs-*/unit-00000.safetensors")
    with safe_open(str(unit), framework="pt") as f:
        assert f.get_tensor("prompt_embeds").dtype == torch.float32 and f.get_tensor("mean").dtype == torch.float16
        assert f.get_tensor("prompt_embeds").shape[1:] == (77 + int(T5_TOKENS), 64)  # CLIPs then T5, T5's width
        assert f.get_tensor("mean").shape[1:] == (2, 16, 4, 4)  # winner and loser: 16 channels at 32 px
    tuned = SD3Transformer2DModel.from_pretrained(run / "transformer")
    base = SD3Transformer2DModel.from_pretrained(model / "transformer")
    changed = [n for (n, a), b in zip(tuned.state_dict().items(), base.state_dict().values()) if not torch.equal(a, b)]
    assert changed  # one SFT step moved the weights
    assert json.loads((run / "train_config.json").read_text())["resolved"]["family"] == "sd3"
    card = (run / "README.md").read_text()
    assert 'SD3Transformer2DModel.from_pretrained("USER/REPO", subfolder="transformer")' in card
    assert "stable-diffusion-3" in card

    with pytest.raises(PrefpipeError, match="flow-matching model .*Flow-GRPO"):
        train(TrainConfig(model=str(model), out=str(tmp_path / "d3po"), objective="d3po", candidates=str(tmp_path),
                          pairs=(str(flow_pairs),)))
    with pytest.raises(PrefpipeError, match="multiple of 16"):
        train(TrainConfig(model=str(model), pairs=(str(flow_pairs),), out=str(tmp_path / "odd"), resolution=40,
                          cache_dir=str(tmp_path / "cache")))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_label_train_eval_chain(family, flow_models, tmp_path):
    """The whole loop on each flow model, each stage through the `prefpipe` command as a user runs it."""
    import polars as pl

    from prefpipe.core.tables import parquet_files

    model, work = flow_models[family], tmp_path / "work"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red box\na blue circle\na green star\n")
    common = ["--steps", "2", "--size", "32", "--max-sequence-length", T5_TOKENS, "--device", "cpu", "--no-progress"]
    run_cli("generate", "--model", model, "--prompts", prompts, "--per-prompt", "3", "--out", work / "candidates",
            *common)
    run_cli("label", "--scorer", "compressibility", "--candidates", work / "candidates", "--out", work,
            "--strategy", "all", "--no-progress")
    pairs = pl.read_parquet(parquet_files(work / "pairs" / "ai"))
    assert pairs.height > 0
    run = tmp_path / "run"
    run_cli("train", "--model", model, "--source", "ai", "--workdir", work, "--out", run, "--resolution", "32",
            "--batch-size", "2", "--max-steps", "2", "--learning-rate", "1e-3", "--max-sequence-length", T5_TOKENS,
            "--checkpoint-every", "0", "--no-progress")
    assert _metrics(run)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    run_cli("eval", "--base", model, "--tuned", run, "--prompts", prompts, "--scorer", "compressibility",
            "--per-prompt", "2", "--out", tmp_path / "eval", *common)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["generation"]["images_generated"] == {"base": 6, "run": 6}
    base = pl.read_parquet(parquet_files(tmp_path / "eval" / "candidates" / "base")).sort(["prompt_id", "candidate"])
    tuned = pl.read_parquet(parquet_files(tmp_path / "eval" / "candidates" / "run")).sort(["prompt_id", "candidate"])
    assert tuned["seed"].to_list() == base["seed"].to_list()
    assert tuned["image"].to_list() != base["image"].to_list()  # the LoRA, loaded by eval, changed the images


# ------------------------------------------------------------------------------------------------------
# The memory plan of flow transformers
# ------------------------------------------------------------------------------------------------------


def test_published_flow_configs_have_the_published_parameter_counts(tmp_path):
    from trainer.plan.configs import write_config_folder
    from trainer.plan.models import batch_shapes, build_text_encoders, build_unet, plan_family

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    expected = {"sd35-medium": (2_243_171_520, "sd3"), "sd35-large": (8_056_627_520, "sd3"),
                "flux-dev": (11_901_408_320, "flux")}
    for kind, (params, family) in expected.items():
        model = write_config_folder(kind, tmp_path / kind)
        assert plan_family(str(model)) == family
        assert count(build_unet(str(model))) == params, kind
        assert round(count(build_text_encoders(str(model))[-1]) / 1e9, 2) == 4.76  # the T5-XXL encoder
        shapes = batch_shapes(str(model), None, 1024)
        assert shapes.latent == (16, 128, 128)
        assert shapes.text == ((77 + 256, 4096) if family == "sd3" else (512, 4096))


@pytest.mark.parametrize(("family", "quantize"), [*((f, "none") for f in FAMILIES), ("flux", "nf4")])
def test_the_plan_of_a_flow_step_matches_the_step_measured_on_cpu(family, quantize, flow_models):
    """The planner's fake-tensor trace of one Flow-DPO step against the same step run for real, measured by the
    CPU allocator's own records (the method of tests/test_plan.py); FLUX also over an nf4 base (QLoRA)."""
    from tests.test_plan import measured_peak
    from trainer.plan.result import plan_training
    from trainer.recipes.dpo import objective_step

    if quantize != "none":
        pytest.importorskip("bitsandbytes")
    cfg = TrainConfig(model=str(flow_models[family]), out=None, plan=True, resolution=32,
                      max_sequence_length=int(T5_TOKENS), no_cache=True, lora_rank=4, quantize=quantize)
    plan = plan_training(cfg, objective_step, granularity=1)
    assert plan.settings["family"] == family and plan.category("weights") > 0 and plan.total_flops > 0
    assert plan.peak == pytest.approx(measured_peak(cfg), rel=0.03)


@pytest.mark.parametrize(("family", "objective"), [("sd3", "mapo"), ("flux", "kto")])
def test_the_new_objectives_train_flow_models_through_the_same_registry(family, objective, flow_models, tmp_path):
    """MaPO and KTO (trainer/losses.py) on velocity errors, through the real command: at step 0 the LoRA is
    zero, so KTO's per-image reward and KL are 0 and its loss is 1 - sigmoid(0) = 0.5; MaPO has no reference and
    its loss is the winner's error plus its margin term (`ratio_loss`), which the metrics give back; both finite."""
    import polars as pl

    from prefpipe.core.tables import parquet_files

    work = tmp_path / "work"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red box\na blue circle\n")
    run_cli("generate", "--model", flow_models[family], "--prompts", prompts, "--per-prompt", "3", "--out",
            work / "candidates", "--steps", "2", "--size", "32", "--max-sequence-length", T5_TOKENS, "--device", "cpu",
            "--no-progress")
    run_cli("label", "--scorer", "compressibility", "--candidates", work / "candidates", "--out", work,
            "--strategy", "all", "--no-progress")
    assert pl.read_parquet(parquet_files(work / "pairs" / "ai")).height > 0
    run = tmp_path / "run"
    run_cli("train", "--model", flow_models[family], "--source", "ai", "--workdir", work, "--out", run,
            "--objective", objective, "--resolution", "32", "--batch-size", "2", "--max-steps", "2",
            "--learning-rate", "1e-3", "--max-sequence-length", T5_TOKENS, "--checkpoint-every", "0", "--no-progress")
    metrics = _metrics(run)
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    first = metrics[0]
    if objective == "kto":
        assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-9)
    else:
        assert "ref_mse_w" not in first and first["mse_w"] > 0
        assert first["loss"] == pytest.approx(first["mse_w"] + first["ratio_loss"], rel=1e-5)
