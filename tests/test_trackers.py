"""`prefpipe train --report-to`: the metrics of metrics.jsonl also reach TensorBoard and Weights & Biases (offline)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_train import _pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _train(model, pairs, out: Path, *extra: str, env: dict | None = None, check: bool = True):
    return run_cli("train", "--model", model, "--pairs", pairs, "--out", out, "--cache-dir", out.parent / "cache",
                   "--resolution", "32", "--batch-size", "2", "--max-steps", "3", "--learning-rate", "1e-3",
                   "--checkpoint-every", "0", "--no-progress", *extra, env={"OMP_NUM_THREADS": "1", **(env or {})},
                   check=check)


def _wandb_env(tmp_path: Path) -> dict:
    """Offline, with every W&B folder under the test's own: nothing reaches the network or the home folder."""
    return {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file: a LevelDB-style log (32 KiB blocks of records, each with a
    7-byte header: crc32, length, type) of `wandb_internal_pb2.Record` protobufs, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(chunks)
            chunks = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_report_to_all_sends_the_logged_metrics_to_tensorboard_and_to_wandb_offline(tiny_sd15, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _train(tiny_sd15, _pairs(tmp_path / "pairs"), out, "--report-to", "all", env=_wandb_env(tmp_path))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3]

    events = EventAccumulator(str(out / "logs" / "prefpipe-train"))
    events.Reload()
    assert {"loss", "implicit_acc", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    scalars = events.Scalars("loss")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([m["loss"] for m in logged], rel=1e-6)

    [run_file] = (out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["loss"] for h in history] == pytest.approx([m["loss"] for m in logged], rel=1e-12)
    assert [h["implicit_acc"] for h in history] == [m["implicit_acc"] for m in logged]
    config = json.loads((out / "train_config.json").read_text())
    assert config["report_to"] == "all"


def test_report_to_may_change_on_resume_and_a_bad_value_names_the_option(tiny_sd15, tmp_path):
    pairs = _pairs(tmp_path / "pairs")
    out = tmp_path / "run"
    _train(tiny_sd15, pairs, out)
    assert not (out / "logs").exists()  # none by default, whatever is installed
    _train(tiny_sd15, pairs, out, "--resume", "latest", "--max-steps", "4", "--report-to", "tensorboard")
    assert list((out / "logs" / "prefpipe-train").glob("events.out.tfevents.*"))
    bad = _train(tiny_sd15, pairs, tmp_path / "other", "--report-to", "mlflow", check=False)
    assert bad.returncode != 0 and "--report-to" in bad.stderr and "mlflow" in bad.stderr


def test_wandb_without_a_login_stops_with_a_message_naming_the_option(tiny_sd15, tmp_path):
    # online, no API key anywhere (an empty HOME, no netrc) and a server address nothing listens on
    env = {**_wandb_env(tmp_path), "WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path),
           "WANDB_BASE_URL": "http://127.0.0.1:9"}
    bad = _train(tiny_sd15, _pairs(tmp_path / "pairs"), tmp_path / "run", "--report-to", "wandb", env=env, check=False)
    assert bad.returncode != 0 and "--report-to wandb" in bad.stderr and "WANDB_MODE=offline" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
