"""The memory planner (`prefpipe train --plan`, `--max-memory`; trainer/plan/).

The validation: the planner's prediction (fake tensors, its own dispatch-level tracer) against a measurement
that shares none of its bookkeeping: the same step run for real on random CPU tensors under
`torch.profiler` with `profile_memory=True`, which records every allocation and free of PyTorch's CPU
allocator (c10's memory reporting). Measured peak = the models' parameter and buffer storages (allocated
before the profile) + the largest running sum of the allocator's events during the step. Both are unrounded
(granularity 1: the CPU allocator does not round to CUDA's 512-byte blocks).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli

TEXT = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "projection_dim": 32}
VAE = {"block_out_channels": [32, 32, 32, 32]}  # 8x down, as the real VAE, with few channels
SMALL = {  # the real architectures' block types, narrower and shallower
    "sd15": {"unet": {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
                      "attention_head_dim": 8},
             "vae": VAE, "text_encoder": TEXT},
    "sdxl": {"unet": {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                      "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
                      "transformer_layers_per_block": [1, 2], "cross_attention_dim": 64,
                      "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8},
             "vae": VAE, "text_encoder": TEXT, "text_encoder_2": TEXT},
}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """Config-only folders (no weights) of narrow SD 1.5 and SDXL variants."""
    from trainer.plan.configs import write_config_folder

    root = tmp_path_factory.mktemp("plan-models")
    return {kind: write_config_folder(kind, root / kind, SMALL[kind]) for kind in SMALL}


@pytest.fixture(scope="module", autouse=True)
def threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(model: Path, **changes):
    from trainer.config import TrainConfig

    return TrainConfig(model=str(model), out=None, plan=True, resolution=256, **changes)


def measured_peak(cfg) -> int:
    """Peak bytes of the step run for real, from the CPU allocator's own records (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    from trainer.plan.step import build_models, run_step
    from trainer.plan.trace import StepTracer
    from trainer.recipes.dpo import objective_step

    tracer = StepTracer(memory=False)  # names phases only: it counts nothing here
    m = build_models(cfg, tracer, None)
    resident = {}
    for module in (m.unet, m.ref_unet, m.vae, *m.text_encoders):
        for t in [*module.parameters(), *module.buffers()] if module is not None else []:
            resident[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(cfg, m, objective_step, tracer, None)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocation"
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return sum(resident.values()) + peak


CASES = {  # each covers options the others do not
    "sd15 LoRA fp32 AdamW, cache": ("sd15", {}),
    "sdxl LoRA bf16, checkpointing, no cache, accumulation": (
        "sdxl", {"mixed_precision": "bf16", "gradient_checkpointing": True, "no_cache": True, "lora_rank": 16,
                 "gradient_accumulation": 2}),
    "sd15 full bf16 Adafactor, batch 4, accumulation": (
        "sd15", {"full": True, "mixed_precision": "bf16", "optimizer": "adafactor", "batch_size": 4,
                 "gradient_accumulation": 2}),
    "sdxl LoRA over an nf4 base, bf16": ("sdxl", {"mixed_precision": "bf16", "quantize": "nf4"}),
}
PLANS: dict[str, object] = {}


def planned(cfg):
    """The plan of `cfg` (unrounded), traced once per test session: tracing costs seconds even when small."""
    from trainer.plan.result import plan_training
    from trainer.recipes.dpo import objective_step

    if repr(cfg) not in PLANS:
        PLANS[repr(cfg)] = plan_training(cfg, objective_step, granularity=1)
    return PLANS[repr(cfg)]


@pytest.mark.parametrize("case", list(CASES))
def test_planned_peak_matches_the_measured_allocation_within_10_percent(small, case):
    kind, changes = CASES[case]
    cfg = config(small[kind], **changes)
    plan = planned(cfg)
    measured = measured_peak(cfg)
    assert abs(plan.peak / measured - 1) <= 0.10, f"{case}: planned {plan.peak}, measured {measured}"
    # the components the options put on the accelerator
    weights = plan.at_peak["weights"]
    if cfg.no_cache:
        assert {"vae", "text encoders"} <= set(weights) and plan.flops["vae"] > 0 and plan.flops["text encoders"] > 0
    if cfg.full:
        assert "reference unet" in weights and plan.at_peak["gradients"]["unet"] == weights["unet"]  # accumulating
        assert weights["reference unet"] == pytest.approx(weights["unet"] / 2, rel=0.01)  # bf16 copy of fp32
    else:
        assert "reference unet" not in weights and weights["lora"] > 0
    if cfg.gradient_checkpointing:
        assert plan.flops["recompute"] > 0
    if cfg.optimizer == "adamw" and not cfg.full:  # two fp32 moments per fp32 LoRA weight (and a 4-byte step count)
        assert plan.category("optimizer states") == pytest.approx(2 * weights["lora"], rel=0.01)
    if cfg.quantize == "nf4":
        assert weights["unet"] == nf4_unet_bytes(cfg.model)
        # the 4-bit matmuls count the FLOPs of the layers they replace (bitsandbytes' op is not in torch's registry)
        assert plan.total_flops == planned(dataclasses.replace(cfg, quantize="none")).total_flops


def nf4_unet_bytes(model) -> int:
    """The frozen UNet's bytes with its linear weights in bitsandbytes' QLoRA layout, counted from the architecture:
    per linear weight of n values, n/2 bytes of 4-bit codes, one uint8 scale code per block of 64, one float32
    scale per 256 blocks, the 256-entry float32 code and a float32 offset; everything else in bf16."""
    import torch

    from trainer.plan.models import build_unet

    unet = build_unet(str(model)).to(torch.bfloat16)
    total = 0
    for module in unet.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if isinstance(module, torch.nn.Linear) and name == "weight":
                n = t.numel()
                blocks = math.ceil(n / 64)
                total += math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
            else:
                total += t.numel() * t.element_size()
    return total


def test_plan_flops_match_torch_flop_counter_on_a_real_step(small):
    """FLOPs from the fake trace against `FlopCounterMode` around the same step computed for real."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.plan.step import build_models, run_step
    from trainer.plan.trace import StepTracer, cpu_attention_formulas
    from trainer.recipes.dpo import objective_step

    cfg = config(small["sdxl"], **CASES["sdxl LoRA bf16, checkpointing, no cache, accumulation"][1])
    plan = planned(cfg)
    tracer = StepTracer(memory=False)
    m = build_models(cfg, tracer, None)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as counter:
        run_step(cfg, m, objective_step, tracer, None)
    assert plan.total_flops == pytest.approx(counter.get_total_flops(), rel=0.01)
    assert 0 < plan.flops["reference forward"] < plan.flops["policy forward"]  # the same UNet, less the adapters


def test_kto_on_per_image_feedback_plans_half_the_pairs_forwards(small):
    """An item of --feedback is one image: policy and reference see B images, not 2B (the loop's k = 1)."""
    pairs = planned(config(small["sd15"], objective="kto"))
    images = planned(config(small["sd15"], objective="kto", feedback=("fb",), images="candidates"))
    for part in ("policy forward", "reference forward", "policy backward"):
        assert images.flops[part] == pytest.approx(pairs.flops[part] / 2, rel=0.01), part


def test_gradient_checkpointing_and_bf16_shrink_the_plan(small):
    base = planned(config(small["sd15"]))
    lean = planned(config(small["sd15"], gradient_checkpointing=True, mixed_precision="bf16"))
    assert lean.category("activations") < base.category("activations") / 2
    assert lean.at_peak["weights"]["unet"] == pytest.approx(base.at_peak["weights"]["unet"] / 2, rel=0.01)
    assert lean.at_peak["weights"]["lora"] == base.at_peak["weights"]["lora"]  # adapters stay fp32


def test_max_memory_picks_settings_that_fit_or_says_why_none_does(small):
    from prefpipe.core.errors import PrefpipeError
    from trainer.plan.fit import Search, budget_rows, fit, format_budget_rows
    from trainer.plan.result import GIB
    from trainer.recipes.dpo import objective_step

    cfg = config(small["sd15"], batch_size=4)
    search = Search(cfg, objective_step)
    configured = search.plan(search.options[0])
    tight = configured.needed() - 0.5 * (configured.needed() - GIB)  # the configured step's activations cannot fit
    roomy, tiny = configured.needed() + 2**20, GIB + 2**20  # tiny: only the models' weights would fit
    rows = budget_rows(search, [roomy, tight, tiny])
    assert rows[0]["fits"] and rows[0]["change"] == ""
    assert rows[1]["fits"] and rows[1]["change"] and rows[1]["needed"] <= tight
    chosen = rows[1]["settings"]
    assert chosen["batch_size"] * chosen["gradient_accumulation"] == 4  # the effective batch is kept
    assert not rows[2]["fits"] and rows[2]["why"].startswith("the leanest settings (--batch-size 1")
    table = format_budget_rows(rows)
    assert table.count("\n") == 4 and "does not fit" in table and "as configured" in table
    with pytest.raises(PrefpipeError, match=r"--max-memory .*nothing fits"):
        fit(dataclasses.replace(cfg, max_memory=f"{tiny}B"), objective_step, search=search)
    chosen_cfg, plan = fit(dataclasses.replace(cfg, max_memory=f"{tight}B"), objective_step, search=search)
    assert plan.fits(tight) and chosen_cfg.batch_size == chosen["batch_size"]


def test_max_memory_quantizes_the_base_when_nothing_else_fits(small):
    """The leanest bf16 settings do not fit a budget the same settings fit over an nf4 base: --max-memory picks
    --quantize nf4 (last: it changes the model) and keeps everything else it can."""
    pytest.importorskip("bitsandbytes")
    from trainer.plan.fit import Search
    from trainer.recipes.dpo import objective_step

    cfg = config(small["sdxl"], mixed_precision="bf16")
    search = Search(cfg, objective_step)
    lean = [c for c in search.options if c.quantize == "none"][-1]
    lean_nf4 = dataclasses.replace(lean, quantize="nf4")
    assert search.options[-1] == lean_nf4 and all(c.quantize == "none" for c in search.options[: len(search.options) // 2])
    bf16, nf4 = search.plan(lean), search.plan(lean_nf4)
    assert nf4.at_peak["weights"]["unet"] < bf16.at_peak["weights"]["unet"] and nf4.needed() < bf16.needed()
    budget = (nf4.needed() + bf16.needed()) / 2
    chosen, plan = search.first_fit(budget)
    assert chosen.quantize == "nf4" and plan.fits(budget) and not bf16.fits(budget)
    assert chosen.batch_size * chosen.gradient_accumulation == cfg.batch_size * cfg.gradient_accumulation
    full = Search(dataclasses.replace(cfg, full=True), objective_step)
    assert all(c.quantize == "none" for c in full.options)  # a trained base is never quantized


def test_max_memory_bad_input_is_one_message(small):
    proc = run_cli("train", "--plan", "--model", small["sd15"], "--max-memory", "12 potatoes", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--max-memory '12 potatoes'" in proc.stderr
    proc = run_cli("train", "--plan", "--model", small["sd15"], "--max-memory", "0.5GiB", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "nothing fits" in proc.stderr and "CUDA context" in proc.stderr


def test_plan_of_full_size_sdxl_from_a_config_only_folder(tmp_path):
    """The published SDXL configs, no weights, offline: `prefpipe train --plan` prints the per-component table."""
    from trainer.plan.configs import write_config_folder

    model = write_config_folder("sdxl", tmp_path / "sdxl")
    assert not list(model.rglob("*.safetensors")) and not list(model.rglob("*.bin"))
    proc = run_cli("train", "--plan", "--model", model, "--resolution", "1024", "--lora-rank", "64",
                   "--mixed-precision", "bf16", "--gradient-checkpointing", "--batch-size", "1",
                   env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    out = proc.stdout
    assert "sdxl at 1024 px" in out and "LoRA rank 64" in out and "(92.9 M trainable)" in out
    for line in ("weights", "optimizer states", "activations", "FLOPs per step"):
        assert line in out
    peak = float(out.split("peak accelerator memory of one step: ")[1].split(" GiB")[0])
    assert 5.5 < peak < 9.0  # 2.57 B bf16 weights = 4.8 GiB, adapters and AdamW 1.1 GiB, activations
    flops = float(out.split("FLOPs per step: ")[1].split(" ")[0])
    assert 4e13 < flops < 7e13


def test_sdxl_config_has_the_published_parameter_counts(tmp_path):
    import torch

    from trainer.plan.configs import write_config_folder
    from trainer.plan.models import build_text_encoders, build_unet, build_vae

    model = write_config_folder("sdxl", tmp_path / "sdxl")
    with torch.device("meta"):
        unet = build_unet(str(model))
        vae = build_vae(str(model), None)
        encoders = build_text_encoders(str(model))
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(unet) == 2_567_463_684
    assert round(count(vae) / 1e6, 1) == 83.7
    assert [round(count(e) / 1e6, 1) for e in encoders] == [123.1, 694.7]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
