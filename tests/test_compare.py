"""`make compare`'s reduced version (prefpipe/demo/compare.py) on the tiny SD 1.5 pipeline: every objective,
trained through `prefpipe train`'s own option parsing on one budget of denoiser forwards, moves the model's
held-out preference (its denoising margin against the base, `implicit_margin`) further toward its labels than
the same objective trained on the same pairs reversed; one run in its own process records its peak memory;
the budget arithmetic and the table."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from prefpipe.core.schema import PAIRS, conform
from prefpipe.demo.compare import (
    Arm,
    forwards_per_pair,
    implicit_margin,
    steps_for,
    table,
    train_arms,
    train_one,
)

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
LORA = {"resolution": 32, "lora_rank": 4, "lora_targets": "attn,ff,conv"}


def _png(colour: str, background: str) -> bytes:
    im = Image.new("RGB", (32, 32), background)
    ImageDraw.Draw(im).ellipse([8, 8, 24, 24], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _pairs(folder: Path, colours: list[str], white_wins: bool) -> Path:
    """Each pair: the same disc on white (image 0) and on black (image 1); white wins or loses everywhere."""
    n = len(colours)
    label = 1.0 if white_wins else 0.0
    rows = {"caption": [f"a {c} disc" for c in colours], "jpg_0": [_png(c, "white") for c in colours],
            "jpg_1": [_png(c, "black") for c in colours], "label_0": [label] * n, "label_1": [1 - label] * n,
            "image_0_uid": [f"w{c}" for c in colours], "image_1_uid": [f"b{c}" for c in colours]}
    folder.mkdir(parents=True)
    pq.write_table(conform(pa.table(rows), PAIRS), folder / "train-00000-of-00001.parquet")
    return folder


def test_budget_is_equal_denoiser_forwards():
    assert {o: forwards_per_pair(o) for o in ("dpo", "mapo", "kto", "sft")} == {"dpo": 4, "mapo": 2, "kto": 4, "sft": 1}
    assert [steps_for(o, 25600, 32) for o in ("dpo", "mapo", "kto", "sft")] == [200, 400, 200, 800]


def test_every_objective_moves_the_preference_in_its_labels_direction(tiny_sd15, tmp_path):
    reward = _pairs(tmp_path / "reward", COLOURS, white_wins=True)
    control = _pairs(tmp_path / "control", COLOURS, white_wins=False)
    held_out = _pairs(tmp_path / "held-out", ["cyan", "magenta", "gray", "pink"], white_wins=True)
    objectives = ("dpo", "mapo", "kto", "sft")
    arms = [Arm(o, arm, str(p)) for o in objectives for arm, p in (("reward", reward), ("control", control))]
    train_args = ["--learning-rate", "3e-3", "--resolution", "32", "--lora-rank", "4", "--lora-targets", "attn,ff,conv"]
    hyper = {"dpo": {"beta": 500.0}, "mapo": {"beta": 0.1}, "kto": {"beta": 100.0}, "sft": {}}
    records = train_arms(arms, model=str(tiny_sd15), workdir=tmp_path / "cmp", budget=4 * 3 * 8, batch_size=3,
                         train_args=train_args, hyper=hyper, in_process=True)
    assert {r["objective"]: r["steps"] for r in records.values()} == {"dpo": 8, "mapo": 16, "kto": 8, "sft": 32}
    assert all(r["steps_per_s"] > 0 for r in records.values())

    margins = {}
    for name in records:
        margins[name] = implicit_margin(str(tiny_sd15), tmp_path / "cmp" / "runs" / name, held_out,
                                        tmp_path / "margin" / name, batch_size=4, draws=3, train_args=LORA)
    # Training either way on these drawn pairs also shifts the held-out margin by a common amount (about +0.08 at
    # 8 DPO steps here, whatever the labels): what the labels did is the paired difference of the two arms, which
    # differ in the labels only (same budget, seed, noise and held-out draws).
    for o in objectives:
        assert margins[f"{o}-reward"] > margins[f"{o}-control"], (o, margins)

    report = {"results": [{"scorer": "s", "tuned": name, "win_rate": 0.5, "win_rate_ci": [0.4, 0.6], "n": 10}
                          for name in records]}
    lines = table(records, report, "s", list(objectives))
    assert len(lines) == 6 and lines[2].startswith("| dpo | 50.0% [40.0, 60.0] (n=10) |") and "| 8 | 12 (96) |" in lines[2]


def test_a_run_in_its_own_process_records_its_peak_memory(tiny_sd15, tmp_path):
    pairs = _pairs(tmp_path / "pairs", COLOURS[:2], white_wins=True)
    arm = Arm("mapo", "reward", str(pairs))
    record = train_one(arm, model=str(tiny_sd15), out=tmp_path / "run", steps=2, batch_size=2,
                       train_args=["--resolution", "32", "--lora-rank", "4"], hyper={"beta": 0.1}, threads=1,
                       cache=tmp_path / "cache")
    assert record["steps"] == 2 and record["forwards_per_step"] == 4 and record["steps_per_s"] > 0
    assert 100 * 2**20 < record["peak_rss_bytes"] < 8 * 2**30  # the child's own high-water mark (torch alone is >100 MiB)
    assert "reference: none (mapo needs no reference)" in (tmp_path / "run.log").read_text()
    assert train_one(arm, model="unused", out=tmp_path / "run", steps=2, batch_size=2, train_args=[], hyper={},
                     threads=1, cache=tmp_path / "cache") == record  # a finished run is not trained again
