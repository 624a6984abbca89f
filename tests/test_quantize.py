"""`--quantize nf4` (trainer/quantize.py): the frozen base in 4 bits under LoRA adapters (QLoRA)."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch

from tests.conftest import ACCELERATE_LAUNCH, REPO, run_cli
from tests.test_flow_train import T5_TOKENS, _images
from tests.test_train import _metrics, _pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
bnb = pytest.importorskip("bitsandbytes")


def _bitsandbytes_layer(linear: torch.nn.Linear) -> torch.nn.Module:
    """bitsandbytes' own QLoRA layer over the same weights: `Linear4bit` with `Params4bit` (NF4, blocks of 64,
    double-quantized scales), quantized by its own `.to()`."""
    ref = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True, compute_dtype=torch.bfloat16,
                            compress_statistics=True, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                   compress_statistics=True)
    ref.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return ref.to("cpu").train()


def test_nf4_linear_computes_what_bitsandbytes_linear4bit_computes_and_holds_its_bytes():
    from trainer.quantize import NF4Linear, parameter_count, quantize_linears

    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(192, 80).to(torch.bfloat16)  # 15,360 weights: 240 blocks of 64, one nested block
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.05)
    # the planner quantizes on the meta device first: nothing of it may stick to a later real quantization
    meta = NF4Linear.from_linear(torch.nn.Linear(192, 80, device="meta"), torch.bfloat16)
    assert meta.weight.is_meta and meta.absmax_code.is_meta
    ours, ref = NF4Linear.from_linear(linear, torch.bfloat16), _bitsandbytes_layer(linear)

    x = torch.randn(6, 192, generator=gen, dtype=torch.bfloat16)
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    assert torch.equal(y_ours, y_ref)
    (y_ours.float() ** 2).sum().backward()
    (y_ref.float() ** 2).sum().backward()
    assert torch.equal(x_ours.grad, x_ref.grad)

    # every byte bitsandbytes keeps for the weight is a parameter or buffer of ours, and nothing more
    state = ref.weight.quant_state
    theirs = [ref.weight.data, state.absmax, state.state2.absmax, state.state2.code, state.offset]
    mine = [ours.weight, ours.absmax, ours.absmax_scale, ours.absmax_code, ours.absmax_offset]
    assert [t.numel() * t.element_size() for t in mine] == [t.numel() * t.element_size() for t in theirs]
    assert ours.weight.numel() == 192 * 80 // 2 and ours.weight.dtype == torch.uint8
    # NF4 rounds each weight to one of 16 levels of its block's absmax: a few percent of the weight's norm
    weight = linear.weight.detach().float()
    error = (ours.dequantized().float() - weight).norm() / weight.norm()
    assert 0.01 < float(error) < 0.15
    # under autocast a linear answers in the autocast dtype, as the unquantized layer does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x.float()).dtype == linear(x.float()).dtype == torch.bfloat16
    assert ours(x.float()).dtype == torch.float32

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8, bias=False))
    before = sum(p.numel() for p in model.parameters())
    assert quantize_linears(model, torch.float32) == 2
    assert all(isinstance(model[i], NF4Linear) for i in (0, 2)) and parameter_count(model) == before


def _train(model, pairs, out, cache, steps, *extra, check=True):
    return run_cli("train", "--model", str(model), "--pairs", str(pairs), "--out", str(out), "--cache-dir", str(cache),
                   "--resolution", "32", "--batch-size", "1", "--gradient-accumulation", "2", "--max-steps", str(steps),
                   "--learning-rate", "1e-3", "--max-sequence-length", T5_TOKENS, "--checkpoint-every", "2",
                   "--mixed-precision", "bf16", "--no-progress", *extra, check=check,
                   env={"OMP_NUM_THREADS": "1"})  # one thread, as accelerate gives each of its CPU processes: bf16
                                                  # sums round by how they are split over threads


def test_qlora_trains_flux_exports_a_lora_the_unquantized_pipeline_loads_and_resumes_exactly(tiny_flux, tmp_path):
    pairs = _pairs(tmp_path / "pairs")
    cache = tmp_path / "cache"
    proc = _train(tiny_flux, pairs, tmp_path / "nf4", cache, 4, "--quantize", "nf4")
    assert "with its linear weights in nf4 (4-bit)" in proc.stderr and "over an nf4 base" in proc.stderr
    assert "dequantized weights" in proc.stderr  # the start-up plan counts the layer dequantized inside the matmul
    nf4 = _metrics(tmp_path / "nf4")
    assert nf4[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: the policy is the quantized base
    assert all(math.isfinite(m[k]) for m in nf4 for k in ("loss", "mse_w", "grad_norm"))

    # the same run on the bf16 base: same pairs, noise and sigmas, so the errors differ by the rounding only
    _train(tiny_flux, pairs, tmp_path / "bf16", cache, 1)
    bf16 = _metrics(tmp_path / "bf16")[0]
    assert nf4[0]["ref_mse_w"] != bf16["ref_mse_w"]
    assert nf4[0]["ref_mse_w"] == pytest.approx(bf16["ref_mse_w"], rel=0.05)

    # the adapters wrapped the quantized layers under their own names: the unquantized pipeline loads them
    base, tuned = _images(tiny_flux), _images(tiny_flux, tmp_path / "nf4")
    assert np.isfinite(tuned).all() and np.abs(tuned - base).max() > 1e-4

    # resume: 2 steps, then --resume latest to 4 = 4 steps straight (the base is quantized again, identically)
    _train(tiny_flux, pairs, tmp_path / "resumed", cache, 2, "--quantize", "nf4")
    _train(tiny_flux, pairs, tmp_path / "resumed", cache, 4, "--quantize", "nf4", "--resume", "latest")
    for a, b in zip(nf4, _metrics(tmp_path / "resumed"), strict=True):
        for key in ("loss", "mse_w", "mse_l", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)

    # data parallel (DDP over gloo): 2 processes x 1 pair = 1 process x 1 pair x 2 accumulation, each process
    # quantizing its own base identically
    args = ["--model", str(tiny_flux), "--pairs", str(pairs), "--out", str(tmp_path / "two"), "--cache-dir",
            str(tmp_path / "cache-two"), "--resolution", "32", "--batch-size", "1", "--max-steps", "4",
            "--learning-rate", "1e-3", "--max-sequence-length", T5_TOKENS, "--mixed-precision", "bf16",
            "--quantize", "nf4", "--no-progress"]
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "-m", "prefpipe", "train", *args]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(nf4, _metrics(tmp_path / "two"), strict=True):
        for key in ("mse_w", "mse_l", "ref_mse_w", "ref_mse_l"):
            assert a[key] == pytest.approx(b[key], rel=2e-6), (a["step"], key)


@pytest.mark.parametrize("other", ["--full", "--reference-copy"])
def test_quantize_with_a_trained_or_copied_base_is_one_message(tiny_flux, tmp_path, other):
    proc = _train(tiny_flux, _pairs(tmp_path / "pairs"), tmp_path / "run", tmp_path / "cache", 1, "--quantize", "nf4",
                  other, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--quantize nf4" in proc.stderr and "drop one of the two" in proc.stderr
