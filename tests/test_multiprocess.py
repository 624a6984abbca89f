"""Every stage under `accelerate launch --multi_gpu --num_processes 2` (two CPU processes) gives exactly the
dataset one process gives, on the first run; one process prints the summary; and a rank killed mid-run is
made good by a re-run. One thread per process everywhere, so that images are byte for byte the same."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest

from prefpipe.core.dataset import ShardedDataset
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import CANDIDATES
from prefpipe.core.tables import parquet_files, read_manifest
from tests.conftest import ACCELERATE_LAUNCH, REPO, run_cli
from tests.test_eval import make_lora_run
from tests.test_label import drawn, png

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PROMPTS = [f"prompt {i}" for i in range(6)]


def launch(*args, timeout: int = 900) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m prefpipe ARGS` on the CPU, as a user runs it."""
    cmd = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefpipe",
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def table(folder: Path, keys: list[str]) -> pl.DataFrame:
    return pl.read_parquet(parquet_files(folder)).sort(keys)


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> Path:
    """Six shards of drawn candidates (one prompt each, 3 candidates of different JPEG sizes)."""
    folder = tmp_path_factory.mktemp("mp") / "candidates"
    ds = ShardedDataset(folder, "generate", {"drawn": True}, "fp", len(PROMPTS), CANDIDATES)
    for unit, p in enumerate(PROMPTS):
        rows = [dict(prompt_id=prompt_id(p), prompt=p, candidate=c, seed=c, image=png(drawn((c + unit) % 3, unit)),
                     width=32, height=32, model="drawn", scheduler="none", steps=0, guidance=0.0) for c in range(3)]
        with ds.write_unit(unit) as w:
            w.write(pl.DataFrame(rows).to_arrow())
    return folder


@pytest.mark.slow
def test_label_relabel_and_pairs_on_two_processes_write_what_one_process_writes(candidates, tmp_path):
    label = ["label", "--scorer", "compressibility", "--scorer", "incompressibility", "--by", "compressibility",
             "--strategy", "all", "--candidates", candidates, "--no-progress"]
    run_cli(*label, "--out", tmp_path / "one", env=ONE_THREAD)
    two = launch(*label, "--out", tmp_path / "two")  # the first run: the pairs wait for every score shard
    assert two.stderr.count("label: scored") == 1, two.stderr  # one summary, of the whole dataset
    assert f"label: scored {3 * len(PROMPTS) * 1} images" in two.stderr
    for sub, keys in (("scores", ["prompt_id", "candidate", "scorer"]), ("pairs/ai", ["prompt_id", "image_0_uid"])):
        assert table(tmp_path / "two" / sub, keys).equals(table(tmp_path / "one" / sub, keys)), sub
        assert read_manifest(tmp_path / "two" / sub)["complete"]

    # relabel the (AI) pairs as if they were human ones: the same table and the same agreement report
    relabel = ["label", "--scorer", "compressibility", "--pairs", tmp_path / "one" / "pairs" / "ai", "--no-progress"]
    run_cli(*relabel, "--out", tmp_path / "r1", env=ONE_THREAD)
    two = launch(*relabel, "--out", tmp_path / "r2")
    assert two.stderr.count("agrees with humans") == 1, two.stderr
    keys = ["image_0_uid", "image_1_uid"]
    assert table(tmp_path / "r2" / "relabel", keys).equals(table(tmp_path / "r1" / "relabel", keys))
    reports = [json.loads((tmp_path / r / "relabel" / "agreement.json").read_text()) for r in ("r1", "r2")]
    assert reports[0] == reports[1] and reports[0]["pairs"] == table(tmp_path / "r1" / "relabel", keys).height

    # pairs alone, from the scores of the one-process run
    pairs = ["pairs", "--scores", tmp_path / "one" / "scores", "--candidates", candidates, "--by", "incompressibility",
             "--strategy", "all"]
    run_cli(*pairs, "--out", tmp_path / "p1", env=ONE_THREAD)
    two = launch(*pairs, "--out", tmp_path / "p2")
    assert two.stderr.count("pairs: ") == 1, two.stderr
    keys = ["prompt_id", "image_0_uid"]
    assert table(tmp_path / "p2", keys).equals(table(tmp_path / "p1", keys))


@pytest.mark.slow
def test_ingest_on_two_processes_writes_what_one_process_writes(tmp_path):
    from tests.test_ingest import fixture_shards, write_pickapic

    write_pickapic(tmp_path / "pickapic", fixture_shards())
    args = ["ingest", "pickapic", "--from", tmp_path / "pickapic" / "data", "--no-progress"]
    run_cli(*args, "--out", tmp_path / "one", env=ONE_THREAD)
    two = launch(*args, "--out", tmp_path / "two")
    assert two.stderr.count("ingest pickapic: read") == 1, two.stderr  # one summary, of the whole dataset
    keys = ["ranking_id", "image_0_uid"]
    one_table, two_table = table(tmp_path / "one" / "pairs" / "human", keys), table(tmp_path / "two" / "pairs" / "human", keys)
    assert two_table.equals(one_table) and one_table.height > 0
    summaries = [read_manifest(tmp_path / w / "pairs" / "human")["summary"] for w in ("one", "two")]
    assert summaries[0] == summaries[1]


@pytest.mark.slow
def test_eval_on_two_processes_scores_and_reports_what_one_process_does(tiny_sd15, tmp_path):
    run = make_lora_run(tiny_sd15, tmp_path / "lora-run")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    args = ["eval", "--base", tiny_sd15, "--tuned", run, "--prompts", prompts, "--scorer", "compressibility",
            "--per-prompt", "2", "--steps", "2", "--batch-size", "2", "--no-progress"]
    run_cli(*args, "--out", tmp_path / "one", env=ONE_THREAD)
    two = launch(*args, "--out", tmp_path / "two")
    assert two.stderr.count("eval [compressibility]:") == 1, two.stderr
    keys = ["model", "prompt_id", "candidate", "scorer"]
    one_scores = pl.read_parquet(tmp_path / "one" / "scores.parquet").sort(keys)
    assert pl.read_parquet(tmp_path / "two" / "scores.parquet").sort(keys).equals(one_scores)
    assert one_scores.height == 2 * 4 * 2
    results = [json.loads((tmp_path / r / "report.json").read_text())["results"] for r in ("one", "two")]
    assert results[0] == results[1]


@pytest.mark.slow
def test_two_d3po_rounds_on_two_processes_give_the_one_process_datasets(tiny_sd15, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    args = ["d3po-rounds", "--model", tiny_sd15, "--prompts", prompts, "--rounds", "2", "--per-prompt", "2",
            "--steps", "3", "--guidance", "2.0", "--size", "32", "--device", "cpu", "--no-progress",
            "--train", "max-steps=1", "--train", "learning-rate=1e-2", "--train", "checkpoint-every=0",
            "--train", "step-fraction=0.3", "--train", "no-progress=true"]
    # 2 processes x 1 pair = 1 process x 1 pair x 2 accumulation: the same pairs, the same per-pair draws, and
    # with one step per pair (--step-fraction) the same sum of two gradients: the same LoRA to the last bit, so
    # round 2 samples the very same images. (With several steps per pair, the processes would add the same
    # terms in another order, and float addition is not associative.)
    run_cli(*args, "--workdir", tmp_path / "one", "--train", "batch-size=1", "--train", "gradient-accumulation=2",
            env=ONE_THREAD)
    two = launch(*args, "--workdir", tmp_path / "two", "--train", "batch-size=1")
    assert two.stderr.count("d3po-rounds: round 2/2 done") == 1, two.stderr
    for k in (1, 2):
        for sub, keys in (("candidates", ["prompt_id", "candidate"]), ("scores", ["prompt_id", "candidate"]),
                          ("pairs/ai", ["prompt_id", "image_0_uid", "image_1_uid"])):
            a, b = table(tmp_path / "one" / f"round-{k}" / sub, keys), table(tmp_path / "two" / f"round-{k}" / sub, keys)
            assert a.drop("model", strict=False).equals(b.drop("model", strict=False)), (k, sub)
        metrics = [[json.loads(x) for x in (tmp_path / w / f"round-{k}" / "run" / "metrics.jsonl").read_text().splitlines()]
                   for w in ("one", "two")]
        assert metrics[0][0]["loss"] == pytest.approx(metrics[1][0]["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_a_rank_killed_mid_run_then_a_rerun_gives_the_one_process_dataset(tiny_sd15, tmp_path, parti_prompts):
    import psutil

    args = ["generate", "--model", tiny_sd15, "--prompts", parti_prompts, "--limit", "8", "--per-prompt", "2",
            "--steps", "10", "--batch-size", "2", "--prompts-per-shard", "1", "--no-progress"]
    run_cli(*args, "--out", tmp_path / "one", env=ONE_THREAD)
    killed = tmp_path / "killed"
    cmd = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prefpipe", *map(str, args), "--out", str(killed)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ONE_THREAD}, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed.glob("train-*.parquet"))) < 2:
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "prefpipe" in " ".join(p.cmdline())]
    rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
    assert rank1, [p.cmdline() for p in workers]
    os.kill(rank1[0].pid, signal.SIGKILL)  # one rank dies: the launcher stops the other
    assert proc.wait(timeout=120) != 0
    finished = len(list(killed.glob("train-*.parquet")))
    assert 2 <= finished < 8, f"the kill should land mid-run ({finished} of 8 shards finished)"
    launch(*args, "--out", killed)
    keys = ["prompt_id", "candidate"]
    assert table(killed, keys).equals(table(tmp_path / "one", keys))
    assert read_manifest(killed)["complete"]
