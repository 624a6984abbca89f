"""Diffusion-KTO trained on per-image feedback (`prefpipe feedback` -> `prefpipe train --objective kto --feedback
--images`): images are read where the feedback rows point (a candidates dataset, or the pairs the feedback came
from), each image once per item, and the labels move the model their way; bad pointers are dropped rows, never a
path outside --images."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.schema import CANDIDATES, FEEDBACK, PAIRS, SCORES, conform
from prefpipe.demo.compare import implicit_margin
from prefpipe.stages.feedback import FeedbackOptions, build_feedback
from trainer.cli import train as train_command
from trainer.config import TrainConfig
from trainer.data.feedback import FeedbackUnit, ImageSource, list_feedback_units
from trainer.data.rows import scan_unit
from trainer.recipes import train

from .conftest import ACCELERATE_LAUNCH, REPO, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
LORA = {"resolution": 32, "lora_rank": 4, "lora_targets": "attn,ff,conv"}


def _png(colour: str, background: str) -> bytes:
    im = Image.new("RGB", (32, 32), background)
    ImageDraw.Draw(im).ellipse([8, 8, 24, 24], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _candidates(folder: Path, colours: list[str]) -> Path:
    """Per colour one prompt and two candidates: 0 the disc on white, 1 on black (two files, to look up across)."""
    folder.mkdir(parents=True)
    rows = [{"prompt_id": f"p{c}", "prompt": f"a {c} disc", "candidate": k, "seed": k, "image": _png(c, bg),
             "width": 32, "height": 32, "model": "m", "scheduler": "s", "steps": 1, "guidance": 1.0}
            for c in colours for k, bg in enumerate(("white", "black"))]
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(conform(pa.Table.from_pylist(part), CANDIDATES), folder / f"part-{i}.parquet")
    return folder


def _scores(path: Path, colours: list[str], white_high: bool) -> Path:
    """One scorer: the white candidate scores 1 (or 0 with `white_high` False), the black one the other."""
    rows = [{"prompt_id": f"p{c}", "candidate": k, "scorer": "white", "score": float((k == 0) == white_high)}
            for c in colours for k in (0, 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(pa.Table.from_pylist(rows), SCORES), path)
    return path


def _pairs(folder: Path, colours: list[str]) -> Path:
    """Each pair: the disc on white (image 0) against black (image 1), white winning."""
    n = len(colours)
    rows = {"caption": [f"a {c} disc" for c in colours], "jpg_0": [_png(c, "white") for c in colours],
            "jpg_1": [_png(c, "black") for c in colours], "label_0": [1.0] * n, "label_1": [0.0] * n,
            "image_0_uid": [f"w{c}" for c in colours], "image_1_uid": [f"b{c}" for c in colours]}
    folder.mkdir(parents=True)
    pq.write_table(conform(pa.table(rows), PAIRS), folder / "train-00000-of-00001.parquet")
    return folder


def _train(tiny: Path, out: Path, *args: str) -> dict:
    """`prefpipe train` through the CLI's own option parsing, in this process."""
    argv = ["--model", str(tiny), "--out", str(out), "--objective", "kto", "--resolution", "32", "--lora-rank", "4",
            "--lora-targets", "attn,ff,conv", "--checkpoint-every", "0", "--no-progress", *args]
    return train(TrainConfig(**train_command.make_context("train", argv).params))


def test_kto_on_feedback_from_scores_moves_the_model_toward_the_desirable_images(tiny_sd15, tmp_path):
    candidates = _candidates(tmp_path / "candidates", COLOURS)
    margins, summaries = {}, {}
    for arm, white_high in (("reward", True), ("control", False)):
        scores = _scores(tmp_path / arm / "scores" / "scores.parquet", COLOURS, white_high)
        run_cli("feedback", "--from", "scores", "--in", str(scores.parent), "--out", str(tmp_path / arm / "fb"),
                "--desirable-top", "0.5", "--undesirable-bottom", "0.5")
        run = tmp_path / arm / "run"
        summaries[arm] = _train(tiny_sd15, run, "--feedback", str(tmp_path / arm / "fb"), "--images", str(candidates),
                                "--beta", "100", "--learning-rate", "3e-3", "--batch-size", "4", "--max-steps", "8",
                                "--cache-dir", str(tmp_path / "cache"))
        held_out = tmp_path / "held-out"
        if not held_out.exists():
            _pairs(held_out, ["cyan", "magenta", "gray", "pink"])
        margins[arm] = implicit_margin(str(tiny_sd15), run, held_out, tmp_path / "margin" / arm, batch_size=4, draws=3,
                                       train_args=LORA)
    # every image of the 12 is one item: 6 desirable (white in the reward arm), 6 undesirable, none dropped
    for arm in summaries:
        data = summaries[arm]["data"]
        assert data["rows_read"] == 12 and data["items"] == 12 and not data.get("missing_image"), data
        resolved = json.loads((tmp_path / arm / "run" / "train_config.json").read_text())["resolved"]
        assert resolved["images"] == 12 and "pairs" not in resolved
    first = json.loads((tmp_path / "reward" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # LoRA starts at the base: every z is 0
    assert "reward_desirable" in first and "kl" in first
    # the same budget, seed and noise; only the labels differ: the reward arm prefers white on held-out prompts
    assert margins["reward"] > margins["control"], margins


def test_feedback_from_pairs_reads_both_images_of_each_pair(tiny_sd15, tmp_path):
    pairs = _pairs(tmp_path / "pairs", COLOURS[:3])
    build_feedback(pairs, tmp_path / "fb", FeedbackOptions(source="pairs"))
    summary = _train(tiny_sd15, tmp_path / "run", "--feedback", str(tmp_path / "fb"), "--images", str(pairs),
                     "--batch-size", "2", "--max-steps", "2", "--cache-dir", str(tmp_path / "cache"))
    assert summary["data"]["items"] == 6 and summary["steps"] == 2
    card = (tmp_path / "run" / "README.md").read_text()
    assert "6\nimages labelled desirable or undesirable" in card
    assert f"| `{tmp_path / 'fb'}` | feedback | pairs |" in card and f"| `{pairs}` |" in card  # the labels and the images
    # images encoded at each step instead of cached: the same items, draws and losses (up to fp16 storage rounding)
    live = _train(tiny_sd15, tmp_path / "live", "--feedback", str(tmp_path / "fb"), "--images", str(pairs),
                  "--batch-size", "2", "--max-steps", "2", "--no-cache")
    assert live["data"]["items"] == 6
    cached = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    uncached = [json.loads(line) for line in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(cached, uncached, strict=True):
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-3) and a["loss"] == pytest.approx(b["loss"], abs=1e-3)


def test_image_lookup_finds_candidates_across_files_and_drops_what_is_not_there(tmp_path):
    candidates = _candidates(tmp_path / "candidates", COLOURS[:2])
    source = ImageSource.open(candidates)
    assert source.kind == "candidates"
    rows = [{"prompt_id": "pgreen", "candidate": 1}, {"prompt_id": "pred", "candidate": 0},
            {"prompt_id": "pred", "candidate": 7}, {"prompt_id": None, "candidate": None}]
    images, captions = source.read(rows)
    assert images[0] == _png("green", "black") and captions[0] == "a green disc"  # second file
    assert images[1] == _png("red", "white") and captions[1] == "a red disc"
    assert images[2] is None and images[3] is None

    # a feedback table whose rows point at a missing candidate: that row is one dropped row, named in the summary
    fb = tmp_path / "fb.parquet"
    table = [{"prompt_id": "pred", "candidate": 0, "desirable": True, "source": "scores"},
             {"prompt_id": "pred", "candidate": 9, "desirable": False, "source": "scores"}]
    pq.write_table(conform(pa.Table.from_pylist(table), FEEDBACK), fb)
    (unit,) = list_feedback_units([fb], source)
    assert isinstance(unit, FeedbackUnit)
    read = unit.read()
    assert read["jpg_0"].to_pylist() == [_png("red", "white"), None] and read["label_0"].to_pylist() == [1.0, 0.0]
    assert read["jpg_1"].to_pylist() == read["jpg_0"].to_pylist() and read["image_0_uid"].to_pylist() == ["pred#0", "pred#9"]
    # a null label from a hand-made table is a bad row for the scan, not an undesirable image
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.Table.from_pylist([{**table[0], "desirable": None}], schema=FEEDBACK.remove(
        FEEDBACK.get_field_index("desirable")).append(pa.field("desirable", pa.bool_()))), nulls)
    (unit,) = list_feedback_units([nulls], source)
    assert unit.read()["label_0"].to_pylist() == [None]
    scan = scan_unit(unit.read(), unit)
    assert scan.counts == {"rows_read": 1, "bad_label": 1} and not scan.rows


def test_pairs_rows_are_found_by_file_name_only(tmp_path):
    pairs = _pairs(tmp_path / "pairs", COLOURS[:2])
    outside = _pairs(tmp_path / "outside", ["black"])
    source = ImageSource.open(pairs)
    name = "train-00000-of-00001.parquet"
    rows = [{"pairs_file": name, "pairs_row": 1, "side": 1},
            {"pairs_file": f"../outside/{name}", "pairs_row": 0, "side": 0},  # a path: not a file of --images
            {"pairs_file": str(outside / name), "pairs_row": 0, "side": 0},
            {"pairs_file": name, "pairs_row": 2, "side": 0}, {"pairs_file": name, "pairs_row": -1, "side": 0},
            {"pairs_file": name, "pairs_row": 0, "side": 2}]
    images, captions = source.read(rows)
    assert images[0] == _png("green", "black") and captions[0] == "a green disc"
    assert images[1:] == [None] * 5


def test_bad_feedback_options_and_inputs_are_one_message(tiny_sd15, tmp_path):
    with pytest.raises(PrefpipeError, match="--feedback and --images go together"):
        TrainConfig(model="m", out="o", objective="kto", feedback=("fb",)).validate()
    with pytest.raises(PrefpipeError, match="trains --objective kto, not dpo"):
        TrainConfig(model="m", out="o", feedback=("fb",), images="c").validate()
    with pytest.raises(PrefpipeError, match="give one kind"):
        TrainConfig(model="m", out="o", objective="kto", feedback=("fb",), images="c", pairs=("p",)).validate()
    not_images = tmp_path / "scores"
    _scores(not_images / "s.parquet", COLOURS[:1], True)
    with pytest.raises(PrefpipeError, match="neither a candidates dataset"):
        ImageSource.open(not_images)
    # a pairs dataset given as --feedback: named, with what to do
    pairs = _pairs(tmp_path / "pairs", COLOURS[:1])
    with pytest.raises(PrefpipeError, match="prefpipe feedback"):
        list_feedback_units([pairs], ImageSource.open(pairs))
    proc = run_cli("train", "--model", str(tiny_sd15), "--out", str(tmp_path / "r"), "--objective", "kto",
                   "--feedback", str(tmp_path / "nothing"), "--images", str(pairs), check=False)
    assert proc.returncode != 0 and "nothing" in proc.stderr and "Traceback" not in proc.stderr


def test_per_image_objective_is_the_image_loss():
    import torch

    from trainer.losses import get_objective, kto_image_loss

    objective = get_objective("kto", per_image=True)
    assert objective.per_image and not objective.needs_loser and objective.needs_reference
    assert objective.hyperparameters == get_objective("kto").hyperparameters
    g = torch.Generator().manual_seed(0)
    pred, ref, target = (torch.randn(5, 4, 2, 2, generator=g) for _ in range(3))
    desirable = torch.tensor(np.array([1, 0, 1, 1, 0], dtype=bool))
    loss, metrics = objective(model_pred_w=pred, ref_pred_w=ref, target_w=target, desirable=desirable, beta=10.0)
    expected, _ = kto_image_loss(pred, ref, target, desirable, beta=10.0)
    assert torch.equal(loss, expected) and set(metrics) >= {"kl", "reward_desirable", "reward_undesirable"}
    with pytest.raises(ValueError, match="per-image feedback 'dpo'"):
        get_objective("dpo", per_image=True)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_share_one_kl_estimate_and_train_as_one_process_of_both(tiny_sd15, tmp_path):
    """2 processes x 1 image = 1 process x 2 images (the same items and per-item draws): with the KL estimate
    averaged over processes, as the reference does, every step's loss and KL agree; each process's own
    estimate would give both a different KL from the second step on."""
    pairs = _pairs(tmp_path / "pairs", COLOURS[:4])
    build_feedback(pairs, tmp_path / "fb", FeedbackOptions(source="pairs"))
    common = ["--feedback", str(tmp_path / "fb"), "--images", str(pairs), "--max-steps", "3", "--beta", "100",
              "--learning-rate", "3e-3"]
    _train(tiny_sd15, tmp_path / "one", *common, "--batch-size", "2", "--cache-dir", str(tmp_path / "c1"))
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "-m", "prefpipe", "train", "--model", str(tiny_sd15), "--out",
              str(tmp_path / "two"), "--objective", "kto", "--resolution", "32", "--lora-rank", "4", "--lora-targets",
              "attn,ff,conv", "--checkpoint-every", "0", "--no-progress", *common, "--batch-size", "1",
              "--cache-dir", str(tmp_path / "c2")]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 images/process x 2 process(es)" in proc.stderr
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3]
    assert any(m["kl"] > 0 for m in one[1:]), one  # the estimate is not trivially 0 after the first update
    for a, b in zip(one, two):
        for key in ("loss", "kl", "implicit_acc", "mse", "ref_mse"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)


def test_kl_reduce_replaces_the_batch_estimate_before_the_clamp():
    import torch

    from trainer.losses import kto_image_loss

    g = torch.Generator().manual_seed(1)
    pred, ref, target = (torch.randn(4, 3, 2, 2, generator=g) for _ in range(3))
    desirable = torch.tensor([True, False, True, False])
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    ref_mse = ((ref - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    for other in (0.3, -5.0):  # another process's batch estimate (the clamp applies after the average)
        _, metrics = kto_image_loss(pred, ref, target, desirable, beta=2.0, kl_reduce=lambda t, o=other: (t + o) / 2)
        expected = max(0.0, (float(np.mean(ref_mse - mse)) + other) / 2)
        assert float(metrics["kl"]) == pytest.approx(expected, abs=1e-6)
