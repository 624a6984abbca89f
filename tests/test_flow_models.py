"""SD3.x and FLUX.1 (flow-matching transformers) in generate, label and eval, on tiny offline pipelines of the real
classes (`prefpipe tiny sd3|flux`), run through the real CLI. Training them is in test_flow_train.py.
About 60 s on an idle 2-core machine."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from prefpipe.cli import main
from prefpipe.core.prompts import prompt_id
from prefpipe.core.tables import parquet_files
from prefpipe.stages.generate import image_seed
from trainer.export import LORA_FILE

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FAMILIES = ["sd3", "flux"]
PROMPTS = ["a red circle on a blue background", "a green square", "a yellow star at night"]
# quick settings for every run: 2 steps, short T5 prompts (the pipelines' defaults are 256 / 512 tokens)
QUICK = ["--steps", "2", "--max-sequence-length", "16", "--device", "cpu", "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def refused(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return result.output


def candidates(folder) -> pl.DataFrame:
    return pl.read_parquet(parquet_files(folder)).sort(["prompt_id", "candidate"])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def model(family, request):
    return request.getfixturevalue(f"tiny_{family}")  # tests/conftest.py: write_tiny_pipeline, session-scoped


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def test_tiny_flow_pipelines_are_the_real_classes_and_load_through_load_pipeline(family, model):
    from transformers import T5TokenizerFast

    from prefpipe.models import load_pipeline, model_family, model_family_of, native_size

    pipe = load_pipeline(str(model), device="cpu")
    assert model_family(pipe) == model_family_of(str(model)) == family
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor is not None
    assert pipe.vae_scale_factor == 8 and native_size(pipe) == (64, 64)
    t5_name = "tokenizer_3" if family == "sd3" else "tokenizer_2"
    t5 = getattr(pipe, t5_name)
    assert isinstance(t5, T5TokenizerFast) and (t5.pad_token_id, t5.eos_token_id) == (0, 1)
    assert (model / t5_name / "spiece.model").is_file()
    t5_encoder = pipe.text_encoder_3 if family == "sd3" else pipe.text_encoder_2
    config = pipe.transformer.config
    assert config.joint_attention_dim == t5_encoder.config.d_model
    if family == "sd3":
        assert type(pipe).__name__ == "StableDiffusion3Pipeline"
        assert config.pooled_projection_dim == pipe.text_encoder.config.projection_dim * 2
        assert config.in_channels == 16
    else:
        assert type(pipe).__name__ == "FluxPipeline"
        assert config.guidance_embeds  # FLUX.1-dev
        assert config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
        assert config.in_channels == 16 * 4  # 2x2 packed latents
    # loaded without its text encoders (as the trainer does), it still says what it is
    bare = load_pipeline(str(model), device="cpu", without=("text_encoder", "text_encoder_2"))
    assert model_family(bare) == family


def test_generate_images_are_a_pure_function_of_seed_prompt_and_candidate(family, model, prompts, tmp_path):
    run = ["generate", "--model", model, "--prompts", prompts, "--per-prompt", 2, "--seed", 3, *QUICK]
    ok(invoke(*run, "--out", tmp_path / "a", "--batch-size", 4))
    ok(invoke(*run, "--out", tmp_path / "b", "--batch-size", 4))
    # another batching and shard layout: the same images up to float rounding in batched matmuls (1 level of 255)
    ok(invoke(*run, "--out", tmp_path / "c", "--batch-size", 1, "--prompts-per-shard", 1))
    ta, tb, tc = (candidates(tmp_path / n) for n in "abc")
    assert ta.height == len(PROMPTS) * 2
    assert ta["image"].to_list() == tb["image"].to_list()  # byte-identical, as a resumed run writes them
    assert ta["seed"].to_list() == tc["seed"].to_list()
    assert max(np.abs(pixels(x) - pixels(y)).max() for x, y in zip(ta["image"], tc["image"])) <= 1
    default_guidance = {"sd3": 7.0, "flux": 3.5}[family]  # the pipelines' own defaults
    for row in ta.iter_rows(named=True):
        assert row["prompt_id"] == prompt_id(row["prompt"])
        assert row["seed"] == image_seed(3, row["prompt_id"], row["candidate"])
        assert (row["width"], row["height"]) == (64, 64)
        assert row["scheduler"] == "FlowMatchEulerDiscreteScheduler"
        assert row["guidance"] == default_guidance and row["steps"] == 2
    for pid in ta["prompt_id"].unique():
        c0, c1 = ta.filter(pl.col("prompt_id") == pid)["image"].to_list()
        assert np.abs(pixels(c0) - pixels(c1)).mean() > 5  # other candidate, other noise, other pixels


def test_guidance_and_t5_length_reach_the_model(family, model, prompts, tmp_path):
    """--guidance is FLUX.1-dev's distilled guidance (its guidance embedding) and SD3's CFG scale; the T5
    length changes the tokens the transformer attends to. Each changes the pixels, at the same seeds."""
    base = ["--model", model, "--prompts", prompts, "--per-prompt", 1, "--steps", "2", "--device", "cpu",
            "--no-progress"]
    ok(invoke("generate", *base, "--out", tmp_path / "g1", "--guidance", 1.5, "--max-sequence-length", 16))
    ok(invoke("generate", *base, "--out", tmp_path / "g6", "--guidance", 6.0, "--max-sequence-length", 16))
    ok(invoke("generate", *base, "--out", tmp_path / "l32", "--guidance", 6.0, "--max-sequence-length", 32))
    g1, g6, l32 = (candidates(tmp_path / n) for n in ("g1", "g6", "l32"))
    assert g1["guidance"].to_list() == [1.5] * len(PROMPTS)
    for other in (g1, l32):
        diff = [np.abs(pixels(x) - pixels(y)).max() for x, y in zip(g6["image"], other["image"])]
        assert max(diff) > 0


def test_what_flow_models_cannot_do_is_refused_with_a_reason(family, model, prompts, tmp_path):
    out = tmp_path / "never"
    run = ["generate", "--model", model, "--prompts", prompts, "--out", out, *QUICK]
    refused(invoke(*run, "--trajectories"), "--trajectories", "flow-matching", "DDIM", "log-probability")
    refused(invoke(*run, "--scheduler", "ddim"), "--scheduler ddim", "FlowMatchEulerDiscreteScheduler")
    refused(invoke(*run, "--eta", 0.5), "--eta", "flow-matching")
    refused(invoke(*run, "--size", 72), "--size 72", "multiples of 16")
    if family == "flux":
        refused(invoke(*run, "--negative-prompt", "blurry"), "--negative-prompt", "guidance-distilled")
        refused(invoke(*run, "--max-sequence-length", 513), "--max-sequence-length 513", "512")
    assert not out.exists()  # each stopped before anything was written
    # --offload is an option of these models too; on this CPU-only run it says what it needs
    refused(invoke(*run, "--offload", "model"), "--offload model needs a CUDA device")
    # `euler` names the flow model's own sampler: accepted
    ok(invoke(*run[:-len(QUICK)], *QUICK, "--scheduler", "euler", "--per-prompt", 1, "--limit", 1))


def test_max_sequence_length_is_refused_for_a_model_without_t5(tiny_sd15, prompts, tmp_path):
    refused(invoke("generate", "--model", tiny_sd15, "--prompts", prompts, "--out", tmp_path / "o",
                   "--max-sequence-length", 16, "--device", "cpu", "--no-progress"),
            "--max-sequence-length", "no T5 text encoder")


def test_label_scores_flow_model_candidates_and_pairs_them(model, prompts, tmp_path):
    cands = tmp_path / "candidates"
    ok(invoke("generate", "--model", model, "--prompts", prompts, "--out", cands, "--per-prompt", 3, *QUICK))
    ok(invoke("label", "--scorer", "compressibility", "--candidates", cands, "--out", tmp_path / "work",
              "--no-progress"))
    scores = pl.read_parquet(parquet_files(tmp_path / "work" / "scores"))
    assert scores.height == len(PROMPTS) * 3 and scores["score"].is_finite().all()
    pairs = pl.read_parquet(parquet_files(tmp_path / "work" / "pairs" / "ai"))
    assert set(pairs["caption"]) == set(PROMPTS)
    images = set(candidates(cands)["image"].to_list())
    assert set(pairs["jpg_0"].to_list()) | set(pairs["jpg_1"].to_list()) <= images


def make_flow_lora(model, out, family: str, seed: int = 0):
    """A LoRA run as `prefpipe train` writes one for these families: peft adapters on the transformer's attention
    (non-zero, so outputs differ), saved with the pipeline class's own `save_lora_weights(transformer_lora_layers=)`
    as in diffusers' train_dreambooth_lora_sd3.py / _flux.py."""
    import peft
    import torch
    from diffusers import (
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    cls, pipeline = {"sd3": (SD3Transformer2DModel, StableDiffusion3Pipeline),
                     "flux": (FluxTransformer2DModel, FluxPipeline)}[family]
    transformer = cls.from_pretrained(model / "transformer")
    transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained adapters are non-zero
    out.mkdir(parents=True)
    pipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer),
                               weight_name=LORA_FILE)
    return out


def make_flow_full_run(model, run, family: str, seed: int = 1):
    """A full fine-tuning run as `prefpipe train --full` writes one for these families: `RUN/transformer`."""
    import torch

    from prefpipe.models import load_denoiser

    torch.manual_seed(seed)
    transformer = load_denoiser(model / "transformer")
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    transformer.save_pretrained(run / "transformer", safe_serialization=True)
    return run


def test_flow_lora_and_full_runs_load_in_generate_and_eval_and_change_the_pixels(family, model, prompts, tmp_path):
    lora = make_flow_lora(model, tmp_path / "lora-run", family)
    full = make_flow_full_run(model, tmp_path / "full-run", family)
    assert (lora / LORA_FILE).is_file()
    gen = ["generate", "--model", model, "--prompts", prompts, "--per-prompt", 2, *QUICK]
    ok(invoke(*gen, "--out", tmp_path / "base"))
    ok(invoke(*gen, "--out", tmp_path / "tuned", "--lora", lora))
    ok(invoke(*gen, "--out", tmp_path / "full", "--unet", full))
    base, tuned, whole = (candidates(tmp_path / n) for n in ("base", "tuned", "full"))
    assert base["seed"].to_list() == tuned["seed"].to_list() == whole["seed"].to_list()
    for other in (tuned, whole):
        assert all(np.abs(pixels(x) - pixels(y)).max() > 0 for x, y in zip(base["image"], other["image"]))

    # eval: the base and both runs on identical seeds, sharing one pipeline (adapters loaded then unloaded,
    # the transformer swapped in then back)
    out = tmp_path / "eval"
    ok(invoke("eval", "--base", model, "--tuned", lora, "--tuned", full, "--prompts", prompts,
              "--scorer", "compressibility", "--per-prompt", 2, "--batch-size", 4, "--out", out, *QUICK))
    report = json.loads((out / "report.json").read_text())
    assert report["generation"]["images_generated"] == {"base": 6, "lora-run": 6, "full-run": 6}
    assert [(t["name"], t["kind"]) for t in report["tuned"]] == [("lora-run", "lora"), ("full-run", "unet")]
    # what eval generated is what generate makes alone: the base clean, each run plugged in
    assert candidates(out / "candidates" / "base")["image"].to_list() == base["image"].to_list()
    assert candidates(out / "candidates" / "lora-run")["image"].to_list() == tuned["image"].to_list()
    assert candidates(out / "candidates" / "full-run")["image"].to_list() == whole["image"].to_list()


def test_a_denoiser_of_the_other_kind_is_refused(tiny_sd15, model, family, prompts, tmp_path):
    full = make_flow_full_run(model, tmp_path / "full-run", family)
    refused(invoke("generate", "--model", tiny_sd15, "--prompts", prompts, "--out", tmp_path / "o", "--unet", full,
                   "--device", "cpu", "--no-progress"), "--unet", "transformer", "does not fit")


def test_d3po_rounds_on_a_flow_model_stop_at_the_first_generate_with_the_reason(tiny_flux, prompts, tmp_path):
    out = refused(invoke("d3po-rounds", "--model", tiny_flux, "--prompts", prompts, "--workdir", tmp_path / "w",
                         "--rounds", 1, "--steps", 2, "--device", "cpu", "--no-progress"),
                  "--trajectories", "flow-matching", "D3PO")
    assert "Diffusion-DPO" in out
    assert not (tmp_path / "w" / "round-1" / "candidates").exists()


def test_prefpipe_tiny_writes_flow_pipelines_that_generate_at_their_native_size(prompts, tmp_path):
    ok(invoke("tiny", "sd3", "--out", tmp_path / "sd3", "--size", 32, "--seed", 1))
    ok(invoke("tiny", "flux", "--out", tmp_path / "flux", "--size", 48))
    refused(invoke("tiny", "flux", "--out", tmp_path / "bad", "--size", 40), "--size 40", "multiple of 16")
    assert not (tmp_path / "bad").exists()
    for name, side in (("sd3", 32), ("flux", 48)):
        ok(invoke("generate", "--model", tmp_path / name, "--prompts", prompts, "--out", tmp_path / f"{name}-c",
                  "--per-prompt", 1, "--limit", 1, *QUICK))
        row = candidates(tmp_path / f"{name}-c").row(0, named=True)
        assert (row["width"], row["height"]) == (side, side)
