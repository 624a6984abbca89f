"""`prefpipe train --full` sharded by FSDP2 over two CPU processes: it trains as the replicated run does,
resumes exactly from a sharded checkpoint, and exports the trained weights as a diffusers UNet folder.

How these run on a CPU: accelerate 1.15 shards on GPUs only. `AcceleratorState` turns the launcher's FSDP
plugin (`accelerate launch --use_fsdp`, env `ACCELERATE_USE_FSDP`) on only for GPU-like distributed types;
CPU processes (`Accelerator(cpu=True)`, gloo) stay `MULTI_CPU` and `prepare` wraps the model in DDP, with no
error. torch's FSDP2 itself (`fully_shard`, DTensor, torch.distributed.checkpoint) runs on CPU over gloo, so
the sharded runs here are launched as users launch them, through :func:`main` below (``-m
tests.test_train_sharded``), which does one thing before running `prefpipe` unchanged: it lets the plugin
the launcher passed switch CPU processes to `DistributedType.FSDP`. Everything the trainer does from there is
accelerate's own FSDP2 path (prepare -> `fully_shard`, `get_state_dict` -> the export) and our checkpoints of
it (`trainer/checkpoints.py`: each process's rows in safetensors), as on GPUs. `benchmarks/gpu_sharded.py`
runs the same checks on GPUs, without the switch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ACCELERATE_LAUNCH, REPO, run_cli

THREADS = {"OMP_NUM_THREADS": "1"}
LAUNCH = [*ACCELERATE_LAUNCH, "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
SHARDED = ["--use_fsdp", "--fsdp_version", "2", "-m", "tests.test_train_sharded"]  # FSDP2, as a user asks for it
REPLICATED = ["--multi_gpu", "-m", "prefpipe"]
# 8 pairs, 1 pair x 2 processes x 2 accumulation per step: 2 steps per epoch, so 4 steps cross an epoch
TRAIN = ["train", "--resolution", "32", "--batch-size", "1", "--gradient-accumulation", "2",
         "--learning-rate", "1e-4", "--checkpoint-every", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_pairs(folder: Path, n: int = 8) -> Path:
    """A pairs dataset of `n` drawn pairs (a box of one colour on white or black), winners alternating."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    from prefpipe.core.schema import PAIRS, conform

    def image(i: int, background: str) -> bytes:
        im = Image.new("RGB", (48, 40), background)
        ImageDraw.Draw(im).rectangle([3, 3, 16, 20], fill=("red", "green", "blue", "purple")[i % 4])
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    rows = {"caption": [f"a box {i}" for i in range(n)], "jpg_0": [image(i, "white") for i in range(n)],
            "jpg_1": [image(i, "black") for i in range(n)], "label_0": [float(i % 2) for i in range(n)],
            "label_1": [float(1 - i % 2) for i in range(n)]}
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(pa.table(rows), PAIRS), folder / "train-00000-of-00001.parquet")
    return folder


def launch(how: list[str], *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*LAUNCH, *how, *TRAIN, *map(str, args)], capture_output=True, text=True, timeout=900,
                          cwd=REPO, env={**os.environ, **THREADS})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def exported(run: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(run / "unet").state_dict()


@pytest.fixture(scope="module")
def runs(tiny_sd15, tmp_path_factory) -> dict:
    """Four-step runs of the tiny SD 1.5: replicated (DDP), sharded straight through, and sharded stopped
    after step 2 then resumed from its sharded checkpoint-2."""
    root = tmp_path_factory.mktemp("sharded")
    pairs = write_pairs(root / "pairs")
    common = ["--full", "--model", tiny_sd15, "--pairs", pairs, "--cache-dir", root / "cache"]
    out = {name: root / name for name in ("replicated", "straight", "resumed")}
    out["replicated_log"] = launch(REPLICATED, *common, "--out", out["replicated"], "--max-steps", "4").stderr
    out["straight_log"] = launch(SHARDED, *common, "--out", out["straight"], "--max-steps", "4").stderr
    launch(SHARDED, *common, "--out", out["resumed"], "--max-steps", "2")
    out["resumed_log"] = launch(SHARDED, *common, "--out", out["resumed"], "--max-steps", "4", "--resume", "latest").stderr
    out["model"], out["common"] = tiny_sd15, common
    return out


@pytest.mark.slow
def test_a_sharded_full_run_trains_as_the_replicated_run_does(runs):
    log = runs["straight_log"]
    assert "FSDP2 over 2 processes: UNet weights, gradients and adamw state sharded" in log
    assert "wrap: transformer_auto_wrap_policy" in log  # no wrap policy given: one FSDP unit per UNet block
    assert "the frozen reference is sharded over 2 processes too" in log
    assert "FSDP2" not in runs["replicated_log"]
    sharded, replicated = metrics(runs["straight"]), metrics(runs["replicated"])
    assert [m["step"] for m in sharded] == [1, 2, 3, 4] and sharded[-1]["epoch"] == 1
    first = sharded[0]  # step 1: the policy is the (separately sharded) reference
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["mse_w"] == first["ref_mse_w"]
    for a, b in zip(sharded, replicated):
        assert all(math.isfinite(v) for v in a.values() if isinstance(v, float)), a
        # The same arithmetic, with the gradients summed in another order (reduce-scatter per micro-batch,
        # not one all-reduce): step 1 is bit for bit the same; after it, AdamW's first update (about +-lr per
        # weight, whatever the gradient's size) turns last-bit differences into ~1e-7 ones in the errors,
        # which beta 5000 makes ~1e-4 in the loss and the gradient norm.
        for key in ("mse_w", "mse_l", "ref_mse_w", "ref_mse_l"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-3), (a["step"], key)
    assert sharded[0] == replicated[0]
    assert sharded[-1]["loss"] != pytest.approx(math.log(2))  # the later steps did move the UNet

    checkpoint = runs["straight"] / "checkpoint-4"
    for part in ("model", "optimizer"):  # one safetensors file of rows per process, no pickle
        assert sorted(p.name for p in checkpoint.glob(f"{part}-*")) == [f"{part}-0-of-2.safetensors", f"{part}-1-of-2.safetensors"]
    assert all(p.suffix in (".safetensors", ".json") for p in checkpoint.iterdir())
    assert json.loads((checkpoint / "trainer_state.json").read_text())["sharding"] == "fsdp2"
    assert not (checkpoint / "model.safetensors").exists()


@pytest.mark.slow
def test_resuming_from_a_sharded_checkpoint_gives_the_uninterrupted_run(runs):
    assert "resuming after step 2" in runs["resumed_log"]
    straight, resumed = metrics(runs["straight"]), metrics(runs["resumed"])
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in ("loss", "mse_w", "mse_l", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-8), (a["step"], key)
    a, b = exported(runs["straight"]), exported(runs["resumed"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=k)


@pytest.mark.slow
def test_the_export_is_the_trained_weights_gathered_into_one_unet(runs, tmp_path):
    from trainer.checkpoints import full_model_state

    # the weights as trained: the sharded model state of the last checkpoint, merged offline
    trained = full_model_state(runs["straight"] / "checkpoint-4")
    unet = exported(runs["straight"])
    assert json.loads((runs["straight"] / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    assert unet.keys() == trained.keys()
    for k, v in unet.items():
        assert v.dtype == torch.float32 and torch.equal(v, trained[k]), k
    base = exported(runs["model"])
    assert any(not torch.equal(unet[k], base[k]) for k in unet)


@pytest.mark.slow
def test_d3po_full_runs_sharded_as_in_one_process(tmp_path):
    """The D3PO recipe shards the same way (its reference too): 2 sharded processes x 1 pair = 1 process x 1
    pair x 2 accumulation, the same pairs and draws."""
    from prefpipe.stages.generate import GenerateOptions, generate
    from prefpipe.testing.tiny import write_tiny_pipeline
    from tests.test_d3po import GUIDANCE, PER_PROMPT, PROMPTS, STEPS
    from trainer.config import TrainConfig
    from trainer.recipes import train

    model = write_tiny_pipeline("sd15", tmp_path / "model", size=32)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    candidates = tmp_path / "work" / "candidates"
    generate(GenerateOptions(model=str(model), per_prompt=PER_PROMPT, steps=STEPS, guidance=GUIDANCE, trajectories=True),
             tmp_path / "prompts.txt", candidates, batch_size=6, device="cpu", progress=False)
    run_cli("label", "--scorer", "compressibility", "--candidates", candidates, "--out", tmp_path / "work",
            "--strategy", "all", "--no-progress", env=THREADS)
    d3po = dict(full=True, objective="d3po", model=str(model), candidates=str(candidates), workdir=str(tmp_path / "work"),
                source=("ai",), batch_size=1, max_steps=2, learning_rate=1e-4, checkpoint_every=0, no_progress=True)
    train(TrainConfig(out=str(tmp_path / "one"), gradient_accumulation=2, **d3po))
    proc = subprocess.run([*LAUNCH, *SHARDED, "train", "--full", "--objective", "d3po", "--model", str(model),
                           "--candidates", str(candidates), "--workdir", str(tmp_path / "work"), "--source", "ai",
                           "--batch-size", "1", "--max-steps", "2", "--learning-rate", "1e-4", "--checkpoint-every", "0",
                           "--no-progress", "--out", str(tmp_path / "sharded")],
                          capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, **THREADS})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "the frozen reference is sharded over 2 processes too" in proc.stderr
    one, sharded = metrics(tmp_path / "one"), metrics(tmp_path / "sharded")
    assert [m["step"] for m in sharded] == [1, 2] and sharded[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(one, sharded):
        for key in ("loss", "ratio_w", "ratio_l", "grad_norm", "clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (a["step"], key)
    assert (tmp_path / "sharded" / "unet" / "config.json").exists()


@pytest.mark.slow
def test_lora_or_adafactor_under_fsdp_and_resuming_across_sharding_stop_with_a_message(runs):
    lora = [a for a in runs["common"] if a != "--full"]
    proc = launch(SHARDED, *lora, "--out", runs["straight"].parent / "lora", "--max-steps", "1", check=False)
    assert proc.returncode != 0 and "a LoRA run trains under 1% of the UNet's weights" in proc.stderr
    proc = launch(SHARDED, *runs["common"], "--optimizer", "adafactor", "--out", runs["straight"].parent / "adafactor",
                  "--max-steps", "1", check=False)
    assert proc.returncode != 0 and "--optimizer adafactor: transformers' Adafactor" in proc.stderr
    # without the switch, accelerate 1.15 runs CPU processes launched with --use_fsdp replicated (DDP): said
    proc = launch(["--use_fsdp", "--fsdp_version", "2", "-m", "prefpipe"], *lora, "--out",
                  runs["straight"].parent / "cpu-ddp", "--max-steps", "1")
    assert "the launcher asked for FSDP, but accelerate shards on GPUs only" in proc.stderr and "FSDP2 over" not in proc.stderr
    # one process, no launcher: unsharded, so the sharded checkpoint is refused before anything is loaded
    proc = run_cli(*TRAIN, *runs["common"], "--out", runs["resumed"], "--max-steps", "6", "--resume", "latest",
                   check=False, env=THREADS)
    assert proc.returncode != 0 and "was written sharded (fsdp2) and this run is unsharded" in proc.stderr


def main() -> None:
    """`prefpipe` in a CPU process launched with `accelerate launch --use_fsdp` (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what AcceleratorState.__init__ does for GPU processes
            self.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            if self.mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self.mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init
    from prefpipe.cli import main as prefpipe

    sys.argv[0] = "prefpipe"
    prefpipe()


if __name__ == "__main__":
    main()
