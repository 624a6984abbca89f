"""Checkpoints hold no pickles: safetensors and JSON only, a folder holding anything else is refused before any
of it is read (a crafted pickle never runs), and resuming from them is exact (LoRA + AdamW in
tests/test_train.py, sharded in tests/test_train_sharded.py, full + Adafactor here)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from prefpipe.core.errors import PrefpipeError
from tests.test_train import _cfg, _metrics, _pairs
from trainer.recipes import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Payload:
    """Unpickling this creates `marker`: what a crafted `custom_checkpoint_0.pkl` would do with a shell command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def lora_run(tiny_sd15, tmp_path_factory) -> dict:
    """A LoRA run stopped after 1 of 2 steps (checkpoint-1), to resume in copies of its folder."""
    root = tmp_path_factory.mktemp("ckpt")
    pairs = _pairs(root / "pairs")
    run = root / "run"
    train(_cfg(tiny_sd15, run, pairs, max_steps=1, checkpoint_every=1, cache_dir=str(root / "cache")))
    return {"model": tiny_sd15, "pairs": pairs, "run": run, "cache": str(root / "cache")}


def _copy(run: Path, out: Path) -> Path:
    """A copy of a run folder at `out` (whose train_config.json records `out`, which a resume must match)."""
    shutil.copytree(run, out)
    config = json.loads((out / "train_config.json").read_text())
    (out / "train_config.json").write_text(json.dumps({**config, "out": str(out)}))
    return out


def _resume(lora_run: dict, out: Path, resume: str = "latest", **kw):
    return train(_cfg(lora_run["model"], out, lora_run["pairs"], max_steps=2, checkpoint_every=1, resume=resume,
                      cache_dir=lora_run["cache"], **kw))


def test_a_lora_checkpoint_holds_safetensors_and_json_only(lora_run):
    from safetensors import safe_open

    checkpoint = lora_run["run"] / "checkpoint-1"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.json", "optimizer.safetensors", "pytorch_lora_weights.safetensors", "rng-0.json",
        "rng-0.safetensors", "scheduler.json", "trainer_state.json"]
    for path in checkpoint.iterdir():  # each is what its name says
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), framework="pt") as f:
                assert list(f.keys())
    scheduler = json.loads((checkpoint / "scheduler.json").read_text())
    assert scheduler["last_epoch"] == 1 and "lr_lambdas" not in scheduler  # counters only; the lambdas are rebuilt
    optimizer = json.loads((checkpoint / "optimizer.json").read_text())
    assert optimizer["param_groups"][0]["betas"] == [0.9, 0.999]
    assert {v["step"]["scalar"] for v in optimizer["state"].values()} == {1.0}  # AdamW's step counts, in JSON


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scaler.pt",
                                  "pytorch_model_fsdp_0/.metadata", "model.safetensors.pkl"])
@pytest.mark.parametrize("resume", ["latest", "path"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_unpickled(lora_run, tmp_path, name, resume):
    payload = pickle.dumps(Payload(tmp_path / "proof"))
    pickle.loads(payload).close()
    assert (tmp_path / "proof").exists()  # the payload is live: unpickling it creates its marker

    out = _copy(lora_run["run"], tmp_path / "run")
    crafted = out / "checkpoint-1" / name
    crafted.parent.mkdir(exist_ok=True)
    crafted.write_bytes(pickle.dumps(Payload(tmp_path / "marker")))
    shown = re.escape(name.split("/")[0] + ("/" if "/" in name else ""))
    with pytest.raises(PrefpipeError, match=rf"refused, it holds {shown}: a prefpipe checkpoint is safetensors and JSON"):
        _resume(lora_run, out, str(out / "checkpoint-1") if resume == "path" else "latest")
    assert not (tmp_path / "marker").exists()
    assert _metrics(out) == _metrics(lora_run["run"])  # refused before anything ran


def test_links_and_stray_files_are_refused_too(lora_run, tmp_path):
    out = _copy(lora_run["run"], tmp_path / "run")
    weights = out / "checkpoint-1" / "pytorch_lora_weights.safetensors"
    weights.rename(tmp_path / "elsewhere.safetensors")
    weights.symlink_to(tmp_path / "elsewhere.safetensors")
    (out / "checkpoint-1" / "notes.txt").write_text("hi")
    with pytest.raises(PrefpipeError, match="it holds notes.txt, pytorch_lora_weights.safetensors:"):
        _resume(lora_run, out)


def test_a_partial_checkpoint_left_by_a_killed_run_is_written_afresh(lora_run, tmp_path):
    out = _copy(lora_run["run"], tmp_path / "run")
    (out / "checkpoint-2").mkdir()  # killed while writing it: no trainer_state.json, and a stray file
    (out / "checkpoint-2" / "optimizer.bin").write_bytes(b"stale")
    _resume(lora_run, out)  # from checkpoint-1
    assert not (out / "checkpoint-2" / "optimizer.bin").exists()
    assert (out / "checkpoint-2" / "trainer_state.json").exists()


@pytest.mark.parametrize("name, content, message", [
    ("scheduler.json", {"last_epoch": 1, "optimizer": "x"}, "scheduler.json is not this run's"),
    ("optimizer.json", {"params": [], "param_groups": [], "state": {}}, "the optimizer of other parameters"),
    ("trainer_state.json", {"step": "1"}, "lacks the step counters"),
])
def test_checkpoint_json_that_is_not_ours_is_refused(lora_run, tmp_path, name, content, message):
    out = _copy(lora_run["run"], tmp_path / "run")
    (out / "checkpoint-1" / name).write_text(json.dumps(content))
    with pytest.raises(PrefpipeError, match=message):
        _resume(lora_run, out)


def test_a_full_adafactor_run_killed_after_a_checkpoint_resumes_exactly(lora_run, tmp_path):
    """--full writes model.safetensors; Adafactor's state has python ints, 0-d tensors and factored moments; the
    cosine schedule's counters matter. The run killed after step 1 is its folder with checkpoint-1 the last."""
    from diffusers import UNet2DConditionModel

    opts = dict(full=True, optimizer="adafactor", lr_scheduler="cosine", checkpoint_every=1, cache_dir=lora_run["cache"])
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(_cfg(lora_run["model"], straight, lora_run["pairs"], max_steps=3, **opts))
    assert sorted(p.name for p in (straight / "checkpoint-1").iterdir()) == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors",
        "scheduler.json", "trainer_state.json"]
    _copy(straight, killed)
    for name in ("checkpoint-2", "checkpoint-3", "unet"):
        shutil.rmtree(killed / name)
    summary = train(_cfg(lora_run["model"], killed, lora_run["pairs"], max_steps=3, resume="latest", **opts))
    assert summary["steps_run"] == 2
    a, b = _metrics(straight), _metrics(killed)
    assert [m["step"] for m in b] == [1, 2, 3] and len({m["lr"] for m in a}) == 3
    for x, y in zip(a, b):
        for key in ("loss", "mse_w", "mse_l", "grad_norm", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)
    wa = UNet2DConditionModel.from_pretrained(straight / "unet").state_dict()
    wb = UNet2DConditionModel.from_pretrained(killed / "unet").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-7, msg=k)


def test_sharded_rows_load_into_any_number_of_processes(tmp_path):
    """The rows of a tensor saved by 2 processes (torch.chunk's 3 + 2) read back for 3 processes (2 + 2 + 1),
    and merged whole: what a resume with another process count, and `full_model_state`, read."""
    from contextlib import ExitStack

    from trainer.checkpoints import full_model_state
    from trainer.shards import TensorFiles, save_tensors

    weight, bias = torch.arange(20.0).reshape(5, 4), torch.arange(3.0)
    save_tensors(tmp_path / "model-0-of-2.safetensors", {"w": weight[:3], "b": bias}, {"w": [0, 5], "b": None})
    save_tensors(tmp_path / "model-1-of-2.safetensors", {"w": weight[3:]}, {"w": [3, 5]})
    with ExitStack() as stack:
        files = TensorFiles(tmp_path, "model", stack)
        assert files.names() == {"w", "b"} and files.sharded("w") and not files.sharded("b")
        for start, stop in ((0, 2), (2, 4), (4, 5), (5, 5)):
            assert torch.equal(files.rows("w", start, stop, 5), weight[start:stop])
        with pytest.raises(PrefpipeError, match="has 5 rows, this run's has 6"):
            files.rows("w", 0, 2, 6)
    merged = full_model_state(tmp_path)
    assert torch.equal(merged["w"], weight) and torch.equal(merged["b"], bias)
    (tmp_path / "model-1-of-2.safetensors").unlink()
    with ExitStack() as stack, pytest.raises(PrefpipeError, match="incomplete checkpoint"):
        TensorFiles(tmp_path, "model", stack)
