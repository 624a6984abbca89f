"""The generate stage on tiny SD 1.5 and SDXL, run as a user runs it."""

import io
import os
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import CANDIDATES
from prefpipe.core.tables import parquet_files, read_manifest
from prefpipe.stages.generate import GenerateOptions, generate, image_seed
from tests.conftest import ACCELERATE_LAUNCH, REPO, run_cli

PROMPTS = ["a red circle on a blue background", "a green square", "a yellow star at night", "a red circle on a blue background", "", "a purple cat"]
DISTINCT = 4


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _table(folder):
    return pl.read_parquet(parquet_files(folder)).sort(["prompt_id", "candidate"])


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sdxl"])
def test_tiny_pipelines_generate_candidates_that_polars_and_datasets_read(model, request, prompt_file, tmp_path):
    model_dir = request.getfixturevalue(model)
    out = tmp_path / "candidates"
    counters = generate(
        GenerateOptions(model=str(model_dir), per_prompt=3, steps=3, seed=7, prompts_per_shard=3,
                        negative_prompt="blurry"),
        prompt_file, out, batch_size=4, progress=False,
    )
    assert counters["images"] == DISTINCT * 3
    assert pq.read_schema(parquet_files(out)[0]) == CANDIDATES
    df = _table(out)
    assert df.height == DISTINCT * 3
    assert df.select(["prompt_id", "candidate"]).is_duplicated().sum() == 0
    assert set(df["prompt"]) == {p for p in PROMPTS if p}
    for row in df.iter_rows(named=True):
        assert row["prompt_id"] == prompt_id(row["prompt"])
        assert row["seed"] == image_seed(7, row["prompt_id"], row["candidate"])
        img = Image.open(io.BytesIO(row["image"]))
        assert img.format == "PNG" and img.size == (row["width"], row["height"]) == (64, 64)
        assert row["steps"] == 3 and row["negative_prompt"] == "blurry"
    loaded = datasets.load_dataset("parquet", data_files=[str(f) for f in parquet_files(out)], split="train")
    assert loaded.num_rows == DISTINCT * 3 and set(CANDIDATES.names) == set(loaded.column_names)
    m = read_manifest(out)
    assert m["complete"] and m["stage"] == "generate" and m["options"]["per_prompt"] == 3
    assert sum(u["images"] for u in m["units"].values()) == DISTINCT * 3


def test_a_second_run_skips_finished_shards_without_loading_the_model(tiny_sd15, prompt_file, tmp_path):
    opts = GenerateOptions(model=str(tiny_sd15), per_prompt=1, steps=2, prompts_per_shard=2)
    generate(opts, prompt_file, tmp_path / "c", progress=False)
    before = {f.name: f.read_bytes() for f in parquet_files(tmp_path / "c")}
    again = generate(opts, prompt_file, tmp_path / "c", progress=False)
    assert again["images"] == 0 and again["units_skipped"] == 2
    assert {f.name: f.read_bytes() for f in parquet_files(tmp_path / "c")} == before


def test_any_image_regenerates_alone(tiny_sd15, prompt_file, tmp_path):
    opts = dict(model=str(tiny_sd15), steps=3, seed=11)
    generate(GenerateOptions(per_prompt=3, **opts), prompt_file, tmp_path / "all", batch_size=1, progress=False)
    target = [p for p in PROMPTS if p][2]
    single = tmp_path / "one.txt"
    single.write_text(target + "\n")
    generate(GenerateOptions(per_prompt=3, **opts), single, tmp_path / "one", batch_size=1, progress=False)
    full = _table(tmp_path / "all").filter(pl.col("prompt") == target)
    alone = _table(tmp_path / "one")
    assert full["image"].to_list() == alone["image"].to_list()  # byte-identical at the same batch size
    # Batched with other prompts, the same image differs at most by float rounding of batched kernels.
    generate(GenerateOptions(per_prompt=3, **opts), prompt_file, tmp_path / "b4", batch_size=4, progress=False)
    batched = _table(tmp_path / "b4").filter(pl.col("prompt") == target)
    for a, b in zip(full["image"], batched["image"]):
        diff = np.abs(np.asarray(Image.open(io.BytesIO(a)), int) - np.asarray(Image.open(io.BytesIO(b)), int))
        assert diff.max() <= 2


def test_killed_run_resumes_to_the_same_images_as_an_uninterrupted_run(tiny_sd15, tmp_path, parti_prompts):
    args = ["generate", "--model", tiny_sd15, "--prompts", parti_prompts, "--limit", "8", "--per-prompt", "2",
            "--steps", "10", "--batch-size", "2", "--prompts-per-shard", "1", "--no-progress"]
    run_cli(*args, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "prefpipe", *map(str, args), "--out", str(killed)],
                            stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed.glob("train-*.parquet"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(killed.glob("train-*.parquet")))
    assert 3 <= finished < 8, f"the kill should land mid-run ({finished} of 8 shards finished)"
    run_cli(*args, "--out", killed)
    a, b = _table(tmp_path / "straight"), _table(killed)
    assert b.height == 8 * 2
    assert b.select(["prompt_id", "candidate"]).is_duplicated().sum() == 0
    assert a["image"].to_list() == b["image"].to_list()
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]


def test_two_accelerate_processes_produce_the_same_rows_as_one(tiny_sd15, tmp_path, parti_prompts):
    args = ["--model", tiny_sd15, "--prompts", parti_prompts, "--limit", "6", "--per-prompt", "2", "--steps", "2",
            "--prompts-per-shard", "1", "--no-progress"]
    # accelerate gives each CPU process one thread; the single process gets one too, so that the
    # comparison is byte for byte (a different thread count changes float rounding, not the rows).
    run_cli("generate", *args, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefpipe", "generate",
              *map(str, args), "--out", str(tmp_path / "two")]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 0/2]" in proc.stderr and "[rank 1/2]" in proc.stderr
    one, two = _table(tmp_path / "one"), _table(tmp_path / "two")
    assert two.select(["prompt_id", "candidate", "seed"]).equals(one.select(["prompt_id", "candidate", "seed"]))
    assert one["image"].to_list() == two["image"].to_list()
    assert read_manifest(tmp_path / "two")["complete"]


def test_bad_inputs_get_messages_naming_the_problem(tiny_sd15, prompt_file, tmp_path):
    out = tmp_path / "c"
    base = ["generate", "--model", tiny_sd15, "--per-prompt", "1", "--steps", "2", "--no-progress"]
    cases = [
        (["--prompts", tmp_path / "missing.txt"], "--prompts"),
        (["--prompts", tmp_path / "missing.txt"], "no such file"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    nocol = tmp_path / "p.jsonl"
    nocol.write_text('{"text2": "x"}\n')
    cases += [(["--prompts", empty], "no prompts in the file"), (["--prompts", nocol], "no prompt column")]
    for extra, message in cases:
        proc = run_cli(*base, *extra, "--out", out, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = run_cli("generate", "--model", tmp_path / "no-model", "--prompts", prompt_file, "--out", out, check=False)
    assert proc.returncode != 0 and "no-model: no such folder" in proc.stderr
    proc = run_cli("generate", "--model", tiny_sd15, "--prompts", prompt_file, "--per-prompt", "0", "--out", out, check=False)
    assert proc.returncode == 2 and "--per-prompt" in proc.stderr
    assert not out.exists(), "a run that failed before generating anything leaves no folder behind"


def test_other_options_into_the_same_folder_are_refused_and_nothing_is_lost(tiny_sd15, prompt_file, tmp_path):
    out = tmp_path / "c"
    generate(GenerateOptions(model=str(tiny_sd15), per_prompt=1, steps=2), prompt_file, out, progress=False)
    before = {f.name: f.read_bytes() for f in parquet_files(out)}
    with pytest.raises(PrefpipeError, match="steps: folder has 2, this run asks 3"):
        generate(GenerateOptions(model=str(tiny_sd15), per_prompt=1, steps=3), prompt_file, out, progress=False)
    other = prompt_file.with_name("other.txt")
    other.write_text("a brand new prompt\n")
    with pytest.raises(PrefpipeError, match="input"):
        generate(GenerateOptions(model=str(tiny_sd15), per_prompt=1, steps=2), other, out, progress=False)
    assert {f.name: f.read_bytes() for f in parquet_files(out)} == before


def test_trajectories_share_initial_noise_per_prompt_and_replay_as_ddim_steps(tiny_sd15, prompt_file, tmp_path):
    import torch

    from prefpipe.core.trajectory import decode_trajectory
    from prefpipe.models import load_pipeline
    from trainer.losses import ddim_scheduler_args, ddim_step_mean_std

    out = tmp_path / "traj"
    generate(GenerateOptions(model=str(tiny_sd15), per_prompt=2, steps=4, guidance=3.0, trajectories=True),
             prompt_file, out, batch_size=3, progress=False)
    df = _table(out)
    assert set(df["scheduler"]) == {"DDIMScheduler"}
    trajs = [decode_trajectory(b) for b in df["trajectory"]]
    assert trajs[0]["latents"].shape == (5, 4, 8, 8) and trajs[0]["latents"].dtype == np.float16
    assert float(trajs[0]["eta"]) == 1.0 and len(trajs[0]["timesteps"]) == 4
    assert np.array_equal(trajs[0]["latents"][0], trajs[1]["latents"][0])  # same prompt: same x_T
    assert not np.array_equal(trajs[0]["latents"][-1], trajs[1]["latents"][-1])  # different step noise
    assert not np.array_equal(trajs[0]["latents"][0], trajs[2]["latents"][0])  # another prompt

    # Replaying the recorded steps with the unchanged model: each recorded x_{k+1} is a draw from the
    # DDIM step's Gaussian (standardised residuals have mean square ~1, up to fp16 storage).
    pipe = load_pipeline(str(tiny_sd15), scheduler="ddim")
    pipe.scheduler.set_timesteps(4)
    cond, uncond = pipe.encode_prompt(df["prompt"][0], pipe.prefpipe_device, 1, True)
    lat = torch.tensor(trajs[0]["latents"], dtype=torch.float32)
    z2 = []
    for k, t in enumerate(trajs[0]["timesteps"]):
        with torch.no_grad():
            eps_u, eps_c = pipe.unet(torch.cat([lat[k : k + 1]] * 2), int(t),
                                     encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        eps = eps_u + 3.0 * (eps_c - eps_u)
        prev_t = torch.tensor([int(t) - 1000 // 4])
        mean, std = ddim_step_mean_std(eps, torch.tensor([int(t)]), lat[k : k + 1], prev_timestep=prev_t, eta=1.0,
                                       **ddim_scheduler_args(pipe.scheduler))
        z2.append((((lat[k + 1 : k + 2] - mean) / std) ** 2).mean().item())
    assert all(0.3 < z < 3.0 for z in z2), z2
