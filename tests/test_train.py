"""`prefpipe train` on tiny SD 1.5 and SDXL: objectives, export, resume, processes, cache, pairs handling."""

from __future__ import annotations

import io
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.options import cli_name
from prefpipe.core.schema import PAIRS, conform
from tests.conftest import ACCELERATE_LAUNCH, REPO, run_cli
from trainer.config import TrainConfig
from trainer.data.cache import LatentSpec
from trainer.data.pairs import PairData, PairIndex, build_index
from trainer.data.rows import Unit, prepare_pair, scan_unit
from trainer.recipes import train

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------------
# Pairs built from drawn images
# ------------------------------------------------------------------------------------------------------


def _drawn(colour: str, background: str, size=(48, 40), fmt="PNG") -> bytes:
    """A box in the top-left quarter: an asymmetric pattern whose crop and flip are visible."""
    im = Image.new("RGB", size, background)
    ImageDraw.Draw(im).rectangle([3, 3, size[0] // 3, size[1] // 2], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=95)
    return buf.getvalue()


def _pairs(folder: Path, n: int = 8, labels: list[float] | None = None, captions: list[str] | None = None,
           jpg_1: list[bytes] | None = None) -> Path:
    """A pairs dataset (our PAIRS schema) of `n` drawn pairs; image 0 on white (JPEG/PNG), image 1 on black."""
    labels = labels if labels is not None else [float(i % 2) for i in range(n)]
    captions = captions or [f"a {COLOURS[i % len(COLOURS)]} box" for i in range(n)]
    rows = {
        "caption": captions,
        "jpg_0": [_drawn(COLOURS[i % 6], "white", fmt="JPEG" if i % 2 else "PNG") for i in range(n)],
        "jpg_1": jpg_1 or [_drawn(COLOURS[i % 6], "black") for i in range(n)],
        "label_0": labels,
        "label_1": [1.0 - v for v in labels],
        "image_0_uid": [f"a{i}" for i in range(n)],
        "image_1_uid": [f"b{i}" for i in range(n)],
    }
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(pa.table(rows), PAIRS), folder / "train-00000-of-00001.parquet")
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return _pairs(tmp_path_factory.mktemp("pairs") / "pairs" / "ai")


def _cfg(model, out, pairs, **kw) -> TrainConfig:
    base = dict(model=str(model), out=str(out), pairs=(str(pairs),), cache_dir=str(Path(out).parent / "cache"),
                resolution=32, batch_size=2, max_steps=3, learning_rate=1e-3, checkpoint_every=0, no_progress=True)
    return TrainConfig(**{**base, **kw})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


# ------------------------------------------------------------------------------------------------------
# End to end: both families, LoRA and full, exported weights load and generate
# ------------------------------------------------------------------------------------------------------


def _generate(model, tmp_path, name, **kw) -> list[np.ndarray]:
    from prefpipe.core.tables import iter_batches
    from prefpipe.stages.generate import GenerateOptions, generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red box\n")
    out = tmp_path / name
    generate(GenerateOptions(model=str(model), per_prompt=1, steps=2, size="32", dtype="fp32", **kw), prompts, out,
             batch_size=1, device="cpu", progress=False)
    return [_png_pixels(b) for batch in iter_batches(out, ["image"]) for b in batch.column("image").to_pylist()]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_and_full_runs_train_end_to_end_and_load_into_the_base_pipeline(family, request, pairs, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    lora_run, full_run = tmp_path / "lora", tmp_path / "full"

    summary = train(_cfg(model, lora_run, pairs, lora_targets="attn,ff", learning_rate=5e-3))
    first = _metrics(lora_run)[0]
    # Step 0: LoRA B is zero, so the policy is the reference: the DPO loss is log 2, implicit accuracy 1/2.
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["implicit_acc"] == 0.5 and first["reward_margin"] == 0.0
    assert first["mse_w"] == first["ref_mse_w"] and first["mse_l"] == first["ref_mse_l"]
    assert [m["step"] for m in _metrics(lora_run)] == [1, 2, 3]
    assert summary["steps_run"] == 3 and summary["data"]["items"] == 8
    for name in ("pytorch_lora_weights.safetensors", "curves.png", "train_config.json", "checkpoint-3"):
        assert (lora_run / name).exists(), name
    resolved = json.loads((lora_run / "train_config.json").read_text())["resolved"]
    assert resolved["beta"] == 5000.0 and resolved["family"] == family

    base = _generate(model, tmp_path, "base")
    with_lora = _generate(model, tmp_path, "with-lora", lora=str(lora_run))
    assert np.abs(base[0] - with_lora[0]).mean() > 0  # the trained LoRA changes what the pipeline draws

    train(_cfg(model, full_run, pairs, full=True, max_steps=2, learning_rate=1e-3))
    assert (full_run / "unet" / "config.json").exists()
    from prefpipe.models import load_pipeline

    pipe = load_pipeline(str(model), dtype="fp32", device="cpu", unet=str(full_run))
    gen = torch.Generator().manual_seed(0)
    image = pipe("a red box", num_inference_steps=2, height=32, width=32, generator=gen, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_sft_with_adafactor_checkpointing_warmup_and_scaled_lr(tiny_sd15, pairs, tmp_path):
    run = tmp_path / "sft"
    train(_cfg(tiny_sd15, run, pairs, objective="sft", optimizer="adafactor", gradient_checkpointing=True,
               lr_scheduler="cosine", lr_warmup_steps=1, scale_lr=True, max_steps=2))
    first, second = _metrics(run)
    assert "implicit_acc" not in first and first["loss"] == pytest.approx(first["mse_w"], rel=1e-6)
    assert first["lr"] == 0.0 and second["lr"] > 0  # one warm-up step from 0
    assert first["grad_norm"] > 0  # gradients reach the LoRA through the checkpointed blocks
    assert json.loads((run / "train_config.json").read_text())["resolved"]["lr"] == pytest.approx(2e-3)  # 1e-3 x 2 pairs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_target_is_the_noise_or_the_velocity(prediction_type):
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from trainer.conditioning import PromptEmbeds
    from trainer.data.pairs import PairBatch
    from trainer.losses import get_objective
    from trainer.recipes.dpo import objective_step

    class ZeroUNet(torch.nn.Module):
        def forward(self, sample, timestep, **kwargs):
            return SimpleNamespace(sample=torch.zeros_like(sample))

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    latents = torch.randn(2, 4, 4, 4)
    batch = PairBatch(latents, -latents, PromptEmbeds(torch.zeros(2, 77, 8), None), None, None, torch.ones(2), ["a", "b"])
    loss, _ = objective_step(None, ZeroUNet(), None, get_objective("sft"), {}, batch, scheduler,
                              [torch.Generator().manual_seed(i) for i in range(2)], "cpu", torch.float32)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gens])
    noise = torch.stack([torch.randn((4, 4, 4), generator=g) for g in gens])
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------
# Resume, processes, cache
# ------------------------------------------------------------------------------------------------------


def test_resume_after_two_steps_gives_the_same_losses_as_four_steps_straight(tiny_sd15, tmp_path):
    work = tmp_path / "work"
    _pairs(work / "pairs" / "ai")
    common = dict(model=str(tiny_sd15), source=("ai",), workdir=str(work), resolution=32, batch_size=2,
                  gradient_accumulation=2, learning_rate=1e-3, checkpoint_every=2, no_progress=True)
    train(TrainConfig(out=str(tmp_path / "straight"), max_steps=4, checkpoints_keep=1, **common))
    assert [p.name for p in (tmp_path / "straight").glob("checkpoint-*")] == ["checkpoint-4"]
    train(TrainConfig(out=str(tmp_path / "resumed"), max_steps=2, **common))
    with pytest.raises(PrefpipeError, match="--resume latest"):
        train(TrainConfig(out=str(tmp_path / "resumed"), max_steps=4, **common))
    summary = train(TrainConfig(out=str(tmp_path / "resumed"), max_steps=4, resume="latest", **common))
    assert summary["steps_run"] == 2
    assert (work / "cache").is_dir()  # --source ai read WORKDIR/pairs/ai and cached under WORKDIR/cache
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert straight[-1]["epoch"] == 1  # the 4 steps cross an epoch boundary (2 steps per epoch)
    for a, b in zip(straight, resumed):
        for key in ("loss", "mse_w", "mse_l", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert straight[-1]["loss"] != pytest.approx(math.log(2))  # the later steps did move the LoRA


@pytest.mark.slow
def test_two_accelerate_processes_log_once_the_mean_of_both(tiny_sd15, pairs, tmp_path):
    # 2 processes x 1 pair = 1 process x 1 pair x 2 accumulation: same pairs, same per-pair draws.
    one = tmp_path / "one"
    train(_cfg(tiny_sd15, one, pairs, batch_size=1, gradient_accumulation=2, cache_dir=str(tmp_path / "c1")))
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefpipe", "train",
              "--model", str(tiny_sd15), "--pairs", str(pairs), "--out", str(tmp_path / "two"), "--resolution", "32",
              "--batch-size", "1", "--max-steps", "3", "--learning-rate", "1e-3", "--checkpoint-every", "0",
              "--cache-dir", str(tmp_path / "c2"), "--no-progress"]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 pairs/process x 2 process(es)" in proc.stderr
    two = _metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3]  # one line per step: written by the main process only
    for a, b in zip(_metrics(one), two):
        for key in ("loss", "implicit_acc", "mse_w", "mse_l", "ref_mse_w"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_second_run_reuses_the_cache_and_matches_no_cache(tiny_sdxl, pairs, tmp_path):
    cache = tmp_path / "cache"
    opts = dict(max_steps=1, cache_dir=str(cache), random_flip=True, random_crop=True)
    first = train(_cfg(tiny_sdxl, tmp_path / "a", pairs, **opts))
    assert first["data"]["units_encoded"] == 1
    files = sorted(cache.rglob("unit-*.safetensors"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = train(_cfg(tiny_sdxl, tmp_path / "b", pairs, **opts))
    assert second["data"]["units_encoded"] == 0 and second["data"]["units_reused"] == 1
    assert first["data"]["encoders_loaded"] and not second["data"]["encoders_loaded"]  # a complete cache: no VAE
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    live = train(_cfg(tiny_sdxl, tmp_path / "c", pairs, no_cache=True, **opts))
    assert live["data"]["cache"] is None
    a, b, c = (_metrics(tmp_path / r)[0] for r in "abc")
    for key in ("loss", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l"):
        assert a[key] == b[key]
        assert c[key] == pytest.approx(a[key], rel=1e-4), key


# ------------------------------------------------------------------------------------------------------
# Pairs: joint crop and flip, winner order, ties, bad rows
# ------------------------------------------------------------------------------------------------------


def _box_mask(pixels: torch.Tensor, colour: tuple[int, int, int]) -> torch.Tensor:
    """(3, R, R) in [-1, 1] -> bool (R, R) where the pixel is close to `colour`."""
    rgb = (pixels + 1) * 127.5
    return ((rgb - torch.tensor(colour).view(3, 1, 1)).abs().amax(0) < 40)


def test_both_halves_of_a_pair_get_the_same_crop_and_flip():
    img0 = Image.open(io.BytesIO(_drawn("red", "white", size=(96, 48))))
    img1 = Image.open(io.BytesIO(_drawn("blue", "black", size=(96, 48))))
    import random

    for flip in (False, True):
        for seed in range(5):
            p = prepare_pair(img0, img1, 32, crop="random", flip=flip, rng=random.Random(seed))
            assert p.pixels.shape == (2, 3, 32, 32)
            m0, m1 = _box_mask(p.pixels[0], (255, 0, 0)), _box_mask(p.pixels[1], (0, 0, 255))
            assert torch.equal(m0, m1)  # the same crop offsets and the same flip for both halves
            top, left = p.crop_top_left.tolist()
            assert top == 0 and 0 <= left <= 64 - 32  # resized to 64x32: only the width has room
    # centre crop of the resized 64x32 image at (0, 16); flipped, the box moves to the right edge
    centre = prepare_pair(img0, img1, 32)
    flipped = prepare_pair(img0, img1, 32, flip=True, crop=(0, 0))
    assert centre.crop_top_left.tolist() == [0, 16] and centre.original_size.tolist() == [[48, 96], [48, 96]]
    box = _box_mask(flipped.pixels[0], (255, 0, 0))
    assert box[:, -4:].any() and not box[:, :4].any()
    assert flipped.crop_top_left.tolist() == [0, 32]  # in the flipped frame the crop starts 32 px from the left
    # image 1 of another size is resized to image 0's size before the joint crop
    small = Image.open(io.BytesIO(_drawn("blue", "black", size=(48, 24))))
    p = prepare_pair(img0, small, 32, crop=(0, 7))
    assert p.pixels.shape == (2, 3, 32, 32) and p.original_size.tolist() == [[48, 96], [24, 48]]


def _table(labels, captions=None, bad_image_rows=()) -> pa.Table:
    n = len(labels)
    jpg_1 = [b"not an image" if i in bad_image_rows else _drawn("blue", "black") for i in range(n)]
    folder = _pairs(Path(__import__("tempfile").mkdtemp()), n=n, labels=labels, captions=captions, jpg_1=jpg_1)
    return pq.read_table(folder / "train-00000-of-00001.parquet")


class _StubCache:
    """Stored tensors whose latent mean is 0 for image 0 and 1 for image 1 (log-variance -inf: no noise)."""

    def get(self, unit, pos, flip):
        mean = torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2)]).half()
        return {"mean": mean, "logvar": torch.full_like(mean, -float("inf")), "crop": torch.tensor([0, 0]),
                "original_size": torch.tensor([[40, 48], [20, 24]]), "prompt_embeds": torch.zeros(77, 8).half(),
                "pooled": torch.zeros(8).half()}


def test_label_0_orders_winner_and_loser_and_ties_follow_keep_ties(caplog):
    labels = [1.0, 0.0, 0.5, 1.0, 0.0, 0.3, 1.0]
    captions = ["a", "b", "c", "", "e", "f", "g"]
    table = _table(labels, captions, bad_image_rows={6})
    unit = Unit(Path("pairs.parquet"), 0, table.num_rows)
    scan = scan_unit(table, unit)
    assert scan.rows == [0, 1, 2, 4]
    assert scan.counts == {"rows_read": 7, "empty_caption": 1, "bad_label": 1, "bad_image": 1}
    assert "a3/b3" in caplog.text and "a6/b6" in caplog.text  # bad rows are logged with their key

    skip = build_index([scan], "skip")
    assert skip.swap.tolist() == [False, True, True] and skip.pos.tolist() == [0, 1, 3]
    assert skip.counts["ties_dropped"] == 1 and skip.weight.tolist() == [1.0, 1.0, 1.0]
    half = build_index([scan], "half")
    assert half.pos.tolist() == [0, 1, 2, 2, 3] and half.swap.tolist() == [False, True, False, True, True]
    assert half.weight.tolist() == [1.0, 1.0, 0.5, 0.5, 1.0] and half.counts["ties_kept"] == 1

    # The assembled batch puts the winner first: image 0 (mean 0) for label 1, image 1 (mean 1) for label 0.
    index = PairIndex(skip.unit, skip.pos, skip.swap, skip.weight, skip.keys, skip.counts)
    data = PairData(index, [unit], LatentSpec(scaling_factor=2.0), 16, _empty(), cache=_StubCache(), family="sdxl")
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    batch = data.batch(np.array([0, 1, 2]), np.zeros(3, dtype=bool), gens)
    assert batch.latents_w[:, 0, 0, 0].tolist() == [0.0, 2.0, 2.0]
    assert batch.latents_l[:, 0, 0, 0].tolist() == [2.0, 0.0, 0.0]
    assert batch.time_ids_w[1].tolist() == [20, 24, 0, 0, 16, 16]  # the winner's own original size


def test_pick_a_pic_shards_as_published_are_read(tmp_path):
    from prefpipe.core.schema import PICKAPIC_V2
    from trainer.data.rows import list_units, read_unit

    rows = {"caption": ["a red box", "a blue box"], "jpg_0": [_drawn("red", "white", fmt="JPEG")] * 2,
            "jpg_1": [_drawn("blue", "black", fmt="JPEG")] * 2, "label_0": [0.0, 1.0], "label_1": [1.0, 0.0]}
    folder = tmp_path / "pickapic" / "data"
    folder.mkdir(parents=True)
    pq.write_table(conform(pa.table(rows), PICKAPIC_V2), folder / "train-00000-of-00014.parquet")
    units = list_units([tmp_path / "pickapic"])
    scan = scan_unit(read_unit(units[0]), units[0])
    assert scan.rows == [0, 1] and scan.keys[1].endswith("train-00000-of-00014.parquet:0:1")
    assert build_index([scan], "skip").swap.tolist() == [True, False]


def _empty():
    from trainer.conditioning import PromptEmbeds

    return PromptEmbeds(torch.ones(1, 77, 8), torch.ones(1, 8))


def test_caption_dropout_uses_the_unconditional_embedding():
    index = PairIndex(np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64), np.zeros(4, dtype=bool),
                      np.ones(4, dtype=np.float32), ["k"] * 4, {})
    data = PairData(index, [], LatentSpec(1.0), 16, _empty(), cache=_StubCache(), family="sdxl", caption_dropout=1.0)
    batch = data.batch(np.arange(4), np.zeros(4, dtype=bool), [torch.Generator() for _ in range(4)])
    assert (batch.embeds.prompt_embeds == 1).all() and (batch.embeds.pooled == 1).all()


# ------------------------------------------------------------------------------------------------------
# Bad input, non-finite losses, the CLI
# ------------------------------------------------------------------------------------------------------


def test_bad_inputs_stop_with_a_message_naming_the_problem(tiny_sd15, pairs, tmp_path):
    no_label = tmp_path / "no-label"
    no_label.mkdir()
    table = pq.read_table(pairs / "train-00000-of-00001.parquet").drop_columns(["label_0"])
    pq.write_table(table, no_label / "train-00000-of-00001.parquet")
    proc = run_cli("train", "--model", tiny_sd15, "--pairs", no_label, "--out", tmp_path / "r", check=False)
    assert proc.returncode != 0 and "column 'label_0' is missing" in proc.stderr and "Traceback" not in proc.stderr

    ties = _pairs(tmp_path / "ties", n=3, labels=[0.5, 0.5, 0.5])
    with pytest.raises(PrefpipeError, match=r"3 rows read .*all dropped \(3 ties"):
        train(_cfg(tiny_sd15, tmp_path / "r2", ties))
    with pytest.raises(PrefpipeError, match="--model"):
        train(_cfg(tmp_path / "no-such-model", tmp_path / "r3", pairs))
    with pytest.raises(PrefpipeError, match="trajectories"):
        train(_cfg(tiny_sd15, tmp_path / "r4", pairs, objective="d3po"))
    with pytest.raises(PrefpipeError, match="no training data"):
        train(TrainConfig(model=str(tiny_sd15), out=str(tmp_path / "r5")))
    with pytest.raises(PrefpipeError, match="no such file or folder"):
        train(_cfg(tiny_sd15, tmp_path / "r6", tmp_path / "missing"))


def test_nonfinite_losses_skip_the_step_and_stop_the_run(tiny_sd15, pairs, tmp_path, monkeypatch):
    import trainer.recipes
    from trainer.losses import Objective, diffusion_dpo_loss

    def nan_dpo(**kw):
        loss, metrics = diffusion_dpo_loss(**kw)
        return loss * float("nan"), metrics

    monkeypatch.setattr(trainer.recipes, "get_objective", lambda name, per_image=False: Objective(nan_dpo, "denoising", True, True))
    run = tmp_path / "nan"
    with pytest.raises(PrefpipeError, match=r"2 consecutive steps had a non-finite loss.*--beta.*--learning-rate.*precision"):
        train(_cfg(tiny_sd15, run, pairs, max_nonfinite=2, max_steps=5))
    assert [(m["step"], m.get("skipped")) for m in _metrics(run)] == [(1, True), (2, True)]
    assert "loss" not in _metrics(run)[0]


def test_every_config_field_is_a_train_option():
    from trainer.cli import train as command

    result = CliRunner().invoke(command, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert f"--{cli_name(f.name)}" in result.output, f.name


def test_a_pairs_table_relabelled_in_place_trains_on_its_new_labels(tiny_sd15, tmp_path):
    """Same file name, same size, label_0 flipped: the cache must not hand back the old preferences."""
    import pyarrow.compute as pc

    folder = _pairs(tmp_path / "pairs", n=8)
    shard = folder / "train-00000-of-00001.parquet"
    work = tmp_path / "work"  # one --workdir for both runs: one cache
    train(_cfg(tiny_sd15, tmp_path / "before", folder, cache_dir=str(work / "cache")))
    size = shard.stat().st_size
    table = pq.read_table(shard)
    flipped = table.set_column(table.schema.get_field_index("label_0"), "label_0",
                               pc.subtract(pa.scalar(1.0), table["label_0"]))
    flipped = flipped.set_column(flipped.schema.get_field_index("label_1"), "label_1", table["label_0"])
    pq.write_table(flipped, shard)
    assert shard.stat().st_size == size  # the old identity (names and sizes) cannot tell the two apart
    after = train(_cfg(tiny_sd15, tmp_path / "after", folder, cache_dir=str(work / "cache")))
    assert after["data"]["units_encoded"] == 1  # re-encoded, not reused
    fresh = train(_cfg(tiny_sd15, tmp_path / "fresh", folder, cache_dir=str(tmp_path / "fresh-cache")))
    assert [m["loss"] for m in _metrics(tmp_path / "after")] == [m["loss"] for m in _metrics(tmp_path / "fresh")]
    assert fresh["data"]["units_encoded"] == 1
    before = _metrics(tmp_path / "before")
    assert [m["implicit_acc"] for m in before] != [m["implicit_acc"] for m in _metrics(tmp_path / "after")] or \
        [m["loss"] for m in before] != [m["loss"] for m in _metrics(tmp_path / "after")]


def test_resuming_on_changed_pairs_is_refused(tiny_sd15, tmp_path):
    folder = _pairs(tmp_path / "pairs", n=8)
    run = tmp_path / "run"
    train(_cfg(tiny_sd15, run, folder, max_steps=1, checkpoint_every=1))
    _pairs(tmp_path / "pairs", n=8, labels=[float(1 - i % 2) for i in range(8)])  # the same files, relabelled
    with pytest.raises(PrefpipeError, match="training data of .* changed since the run started"):
        train(_cfg(tiny_sd15, run, folder, max_steps=2, checkpoint_every=1, resume="latest"))
