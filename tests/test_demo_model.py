"""The demo's base model: drawn data, training from scratch (quick config), saving, loading, the cache."""

import io
import json
import time
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from prefpipe.demo.build import CACHE, build_demo_model, demo_model
from prefpipe.demo.model import QUICK
from prefpipe.demo.world import (
    COLOURS,
    SHAPES,
    TEXTURES,
    caption,
    colour_accuracy,
    demo_prompts,
    draw_dataset,
    draw_image,
    write_demo_prompts,
)


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("demo") / "base"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and does not stall on a busy machine
    try:
        t0 = time.perf_counter()
        record = build_demo_model(QUICK, out, progress=False)
        return out, record, time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def _files(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def _jpeg_bytes(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.tell()


def test_quick_model_trains_and_its_losses_go_down(quick_model):
    out, record, _seconds = quick_model  # speed is measured in benchmarks, never asserted here
    assert not record["cached"]
    for part in ("vae", "unet"):
        curve = record["losses"][part]
        assert len(curve) >= 2 and curve[-1] < curve[0], (part, curve)


def test_quick_model_loads_through_load_pipeline_and_generates_32px_images(quick_model, tmp_path):
    from prefpipe.models import load_pipeline, model_family
    from prefpipe.stages.generate import GenerateOptions, generate

    out, _, _ = quick_model
    pipe = load_pipeline(str(out), device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and model_family(pipe) == "sd15"
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # the real CLIP vocabulary
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\nan orange square on a green background\n")
    counters = generate(GenerateOptions(model=str(out), per_prompt=2, steps=3, seed=1), prompts, tmp_path / "cands",
                        progress=False, pipe=pipe)
    assert counters["images"] == 4
    import polars as pl

    from prefpipe.core.tables import parquet_files

    df = pl.read_parquet(parquet_files(tmp_path / "cands"))
    assert set(df["width"]) == {32} and set(df["height"]) == {32}
    assert Image.open(io.BytesIO(df["image"][0])).size == (32, 32)


def test_model_folder_loads_with_diffusers_from_pretrained(quick_model):
    from diffusers import DiffusionPipeline

    out, _, _ = quick_model
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_record_holds_config_losses_timings_and_measured_quality(quick_model):
    out, record, _ = quick_model
    on_disk = CACHE.read(out)
    assert on_disk["config"]["steps_unet"] == QUICK.steps_unet
    assert set(on_disk["timings_s"]) >= {"draw", "vae", "encode", "unet", "measure", "total"}
    metrics = on_disk["metrics"]
    assert -1 <= metrics["reconstruction"]["jpeg_kb_correlation"] <= 1
    assert set(metrics["generation"]["colour_accuracy"]) == {"background", "shape", "both"}
    assert (out / "samples.png").exists()


def test_second_run_with_the_same_config_reuses_the_model_without_touching_it(quick_model):
    out, _, _ = quick_model
    before = _files(out)
    t0 = time.perf_counter()
    record = build_demo_model(QUICK, out, progress=False)
    assert record["cached"] and time.perf_counter() - t0 < 2
    assert _files(out) == before


def test_command_skips_a_cached_model_and_writes_the_prompt_files(quick_model, tmp_path):
    out, _, _ = quick_model
    result = CliRunner().invoke(demo_model, ["--quick", "--out", str(out), "--prompts-out", str(tmp_path / "prompts")])
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output
    train = (tmp_path / "prompts" / "train.txt").read_text().splitlines()
    held_out = (tmp_path / "prompts" / "held_out.txt").read_text().splitlines()
    assert (train, held_out) == demo_prompts()


def test_a_different_config_retrains(tmp_path):
    out = tmp_path / "base"
    tiny = replace(QUICK, steps_vae=2, steps_unet=2, images=64)
    assert not build_demo_model(tiny, out, progress=False)["cached"]
    assert build_demo_model(tiny, out, progress=False)["cached"]
    other = replace(tiny, steps_unet=3)
    record = build_demo_model(other, out, progress=False)
    assert not record["cached"]
    assert CACHE.read(out)["config"]["steps_unet"] == 3
    assert not (tmp_path / ".base.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert json.loads((out / CACHE.record).read_text())["config"] == record["config"]


def test_two_cold_builds_in_fresh_processes_give_bit_identical_weights(tmp_path):
    """The base model's training is reproducible: two builds of one config, each in a fresh process (no
    state shared), one started on 1 OpenMP thread and one on 2 (the build pins its own), save the same
    bits in every tensor of every safetensors file, and the same loss curves."""
    import torch
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    outs = [tmp_path / "a", tmp_path / "b"]
    for out, threads in zip(outs, ("1", "2")):
        run_cli("demo-model", "--quick", "--steps-vae", "12", "--steps-unet", "12", "--out", out, "--no-progress",
                env={"OMP_NUM_THREADS": threads})
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.safetensors"))
    assert {f.parts[0] for f in files} == {"vae", "text_encoder", "unet"}
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.safetensors"))
    compared = 0
    for f in files:
        a, b = load_file(outs[0] / f), load_file(outs[1] / f)
        assert a.keys() == b.keys(), f
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (str(f), name)
            compared += 1
    assert compared > 100
    records = [CACHE.read(out) for out in outs]
    assert records[0]["losses"] == records[1]["losses"]
    assert records[0]["versions"]["torch_threads"] == 1 and records[0]["versions"]["deterministic_algorithms"]


def test_drawn_dataset_is_deterministic_in_the_seed():
    a, b, c = draw_dataset(64, seed=3), draw_dataset(64, seed=3), draw_dataset(64, seed=4)
    assert a.pixels.shape == (64, 32, 32, 3) and a.pixels.dtype == np.uint8
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.combos, b.combos)
    assert not np.array_equal(a.pixels, c.pixels)


def test_textures_make_the_jpeg_size_vary_at_a_fixed_caption():
    rng = np.random.default_rng(0)
    sizes = {t: [_jpeg_bytes(draw_image(rng, "red", "circle", "blue", t)) for _ in range(20)] for t in TEXTURES}
    flat = np.mean(sizes["flat"])
    assert all(np.mean(sizes[t]) > 1.15 * flat for t in ("striped", "checkered", "noisy"))
    every = sum(sizes.values(), [])
    assert max(every) - min(every) > 300  # bytes, at one caption
    # ...and the caption never names the texture
    assert not any(t in p for t in TEXTURES for p in sum(demo_prompts(), []))


def test_held_out_prompts_are_combinations_never_in_train_yet_use_only_trained_words():
    train, held_out = demo_prompts()
    assert len(train) + len(held_out) == len(COLOURS) * len(SHAPES) * (len(COLOURS) - 1)
    assert held_out and not set(train) & set(held_out)
    train_words = {w for p in train for w in p.split()}
    assert {w for p in held_out for w in p.split()} <= train_words
    assert caption("orange", "circle", "red") == "an orange circle on a red background"


def test_write_demo_prompts_writes_one_prompt_per_line(tmp_path):
    train, held_out = write_demo_prompts(tmp_path / "p")
    assert train.read_text().splitlines() == demo_prompts()[0]
    assert held_out.read_text().splitlines() == demo_prompts()[1]


def test_colour_check_reads_every_drawn_image_right():
    drawn = draw_dataset(300, seed=5)
    images = [Image.fromarray(p) for p in drawn.pixels]
    assert colour_accuracy(images, drawn.captions()) == {"background": 1.0, "shape": 1.0, "both": 1.0}
    others = drawn.captions()[1:] + drawn.captions()[:1]  # each image judged against another's prompt
    assert colour_accuracy(images, others)["both"] < 0.2
