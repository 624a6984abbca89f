"""Label-stage throughput: images/s per scorer, all scorers in one pass vs one pass per scorer, the stage
against the scorers' bare forward (the model alone, on inputs prepared beforehand, at the same batch: the
floor), the stage with `--workers` threads decoding and preparing ahead (default: what a GPU run uses) against one
(`PREFPIPE_WORKERS`), and our HPSv2 against the `hpsv2` package's own per-image API on the same checkpoint
(same process, same images). Everything alternates over `--rounds` rounds; the figures are the medians. Each model scorer's
peak memory is measured in a process of its own (`--peak-memory NAME`): resident memory (RSS) after loading and
at its peak while scoring, against the same process before loading; on a GPU also torch's peak allocation.

    .venv/bin/python benchmarks/label.py --batch-size 32     # tiny checkpoints built here, CPU
    .venv/bin/python benchmarks/label.py --real --images 512 # hub defaults, on a GPU (needs the hub)
    .venv/bin/python benchmarks/label.py --scorers imagereward,hpsv3 --batch-size 32   # some scorers only

Writes benchmarks/results/label.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SCORERS = ["pickscore", "hpsv2", "imagereward", "hpsv3", "clip", "aesthetic", "compressibility"]


def high_water_mark_mib() -> float:
    """This process's peak RSS: Linux's VmHWM (reset by exec, unlike ru_maxrss, which a child started by
    subprocess inherits from its parent's peak), else ru_maxrss."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(name: str, weights: str | None, candidates: Path, batch_size: int) -> dict:
    """In this (fresh) process: RSS before and after building scorer `name`, and the peak while it scores
    every candidate at `batch_size`; on CUDA also torch's peak allocated bytes. MiB."""
    import polars as pl
    import psutil
    import torch
    from PIL import Image

    from prefpipe.core.tables import parquet_files
    from prefpipe.stages.scoring import load_scorers

    df = pl.read_parquet(parquet_files(candidates))
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in df["image"]]
    mib = 2**20
    before = psutil.Process().memory_info().rss / mib
    (scorer,) = load_scorers([name], {name: weights} if weights else {}, batch_size=batch_size, device="auto")
    loaded = psutil.Process().memory_info().rss / mib
    t0 = time.perf_counter()
    scorer.score(images, df["prompt"].to_list())
    seconds = time.perf_counter() - t0
    peak = high_water_mark_mib()
    out = {"rss_before_mib": before, "rss_loaded_mib": loaded, "rss_peak_mib": peak,
           "weights_rss_mib": loaded - before, "scoring_peak_over_before_mib": peak - before,
           "images_per_s_one_pass": len(images) / seconds}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / mib
    return out


def drawn_candidates(folder: Path, n: int, side: int) -> Path:
    """A candidates dataset of `n` PNG images (smooth noise, `side` px), 4 per prompt, in 4 shards."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from prefpipe.core.dataset import ShardedDataset
    from prefpipe.core.prompts import prompt_id
    from prefpipe.core.schema import CANDIDATES

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        small = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        p = f"a photo of object {i // 4}"
        rows.append(dict(prompt_id=prompt_id(p), prompt=p, candidate=i % 4, seed=i, image=buf.getvalue(),
                         width=side, height=side, model="drawn", scheduler="none", steps=0, guidance=0.0))
    ds = ShardedDataset(folder, "generate", {"bench": n}, "fp", 4, CANDIDATES)
    per = -(-n // 4)
    for u in range(4):
        with ds.write_unit(u) as w:
            w.write(pa.Table.from_pylist(rows[u * per : (u + 1) * per], schema=CANDIDATES))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--real", action="store_true", help="use the real hub checkpoints instead of tiny ones")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None,
                    help="threads preparing ahead in the stage's main arm [default: what a GPU run uses: one per core, "
                         "at most 8; a CPU run's default is 1]")
    ap.add_argument("--scorers", default=",".join(SCORERS), help="comma-separated subset of " + ",".join(SCORERS))
    ap.add_argument("--peak-memory", default=None, help=argparse.SUPPRESS)  # internal: NAME,WEIGHTS,CANDIDATES
    args = ap.parse_args()
    if args.peak_memory:
        name, weights, candidates = args.peak_memory.split(",")
        print(json.dumps(peak_memory(name, weights or None, Path(candidates), args.batch_size)))
        return
    chosen = [s for s in args.scorers.split(",") if s]
    unknown = sorted(set(chosen) - set(SCORERS))
    if unknown:
        ap.error(f"unknown --scorers {unknown}: choose among {SCORERS}")
    SCORERS[:] = chosen  # the rest of this run reads the module list
    from prefpipe.core.background import default_workers

    args.workers = args.workers or default_workers("cuda")
    import statistics

    from prefpipe.stages.label import score_candidates
    from prefpipe.stages.scoring import load_scorers
    from prefpipe.testing.scorers import write_tiny_scorer

    work = Path(tempfile.mkdtemp(prefix="prefpipe-bench-label-"))
    cands = drawn_candidates(work / "candidates", args.images, args.side)
    weights = {} if args.real else {k: str(write_tiny_scorer(k, work / k)) for k in SCORERS if k != "compressibility"}
    scorers = load_scorers(SCORERS, weights, batch_size=args.batch_size, device="auto")
    by_name = {s.name: s for s in scorers}
    score_candidates(cands, work / "warm", SCORERS, weights, batch_size=args.batch_size, progress=False, scorers=scorers)

    import polars as pl
    from PIL import Image

    from prefpipe.core.tables import parquet_files

    df = pl.read_parquet(parquet_files(cands))
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in df["image"]]
    prompts = df["prompt"].to_list()
    try:
        ref_score, checkpoint = _hpsv2_reference(work, weights.get("hpsv2"))
    except ImportError as e:
        ref_score, checkpoint = None, f"skipped: {e} (pip install --no-deps hpsv2x clint)"

    def bare_forward(scorer) -> float:
        """The model alone at the stage's batch size, on inputs prepared beforehand (the floor)."""
        import torch

        if not hasattr(scorer, "forward_batch"):  # no model (JPEG size): its score is all there is
            t0 = time.perf_counter()
            scorer.score(images, prompts)
            return time.perf_counter() - t0
        chunks = [scorer.prepare_batch(images[i : i + args.batch_size], prompts[i : i + args.batch_size])
                  for i in range(0, len(images), args.batch_size)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            for inputs in chunks:
                scorer.forward_batch(inputs)
        return time.perf_counter() - t0

    rounds = []
    for r in range(args.rounds):
        one = {}
        t0 = time.perf_counter()
        score_candidates(cands, work / f"all-{r}", SCORERS, weights, batch_size=args.batch_size, progress=False,
                         scorers=scorers)
        one["all_in_one_pass_s"] = time.perf_counter() - t0
        one["per_scorer_s"], one["per_scorer_one_worker_s"] = {}, {}
        for name in SCORERS:
            for key, threads in (("per_scorer_s", args.workers), ("per_scorer_one_worker_s", 1)):
                os.environ["PREFPIPE_WORKERS"] = str(threads)  # against one thread decoding and preparing ahead
                try:
                    t0 = time.perf_counter()
                    score_candidates(cands, work / f"{key}-{name}-{r}", [name], weights, batch_size=args.batch_size,
                                     progress=False, scorers=[by_name[name]])
                    one[key][name] = time.perf_counter() - t0
                finally:
                    del os.environ["PREFPIPE_WORKERS"]
        one["bare_forward_s"] = {name: bare_forward(by_name[name]) for name in SCORERS}
        if ref_score is not None and "hpsv2" in SCORERS:  # HPSv2: ours (batched) against the reference package's per-image API
            t0 = time.perf_counter()
            for img, p in zip(images, prompts):
                ref_score([img], p, cp=checkpoint, hps_version="v2.1")
            one["hpsv2_reference_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            by_name["hpsv2"].score(images, prompts)
            one["hpsv2_ours_s"] = time.perf_counter() - t0
        rounds.append(one)

    med = statistics.median
    n = args.images
    result: dict = {"images": n, "side": args.side, "weights": "hub" if args.real else "tiny", "rounds": rounds}
    result["per_scorer"] = {
        name: {"images_per_s": n / med(r["per_scorer_s"][name] for r in rounds),
               "bare_forward_images_per_s": n / med(r["bare_forward_s"][name] for r in rounds),
               "stage_vs_bare_forward": med(r["bare_forward_s"][name] / r["per_scorer_s"][name] for r in rounds),
               "one_worker_images_per_s": n / med(r["per_scorer_one_worker_s"][name] for r in rounds),
               "workers_speedup": med(r["per_scorer_one_worker_s"][name] / r["per_scorer_s"][name] for r in rounds)}
        for name in SCORERS
    }
    result["workers"] = args.workers
    result["all_in_one_pass_s"] = med(r["all_in_one_pass_s"] for r in rounds)
    result["one_pass_per_scorer_s"] = med(sum(r["per_scorer_s"].values()) for r in rounds)
    result["one_pass_speedup"] = med(sum(r["per_scorer_s"].values()) / r["all_in_one_pass_s"] for r in rounds)
    result["stage_vs_bare_forward_all_scorers"] = med(sum(r["bare_forward_s"].values()) / r["all_in_one_pass_s"]
                                                      for r in rounds)
    import subprocess

    result["peak_memory"] = {}
    for name in SCORERS:
        if name == "compressibility":
            continue
        proc = subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size), "--peak-memory",
                               f"{name},{weights.get(name, '')},{cands}"], capture_output=True, text=True)
        result["peak_memory"][name] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                                       else f"failed: {proc.stderr[-500:]}")
    result["batch_size"] = args.batch_size
    if ref_score is not None and "hpsv2" in SCORERS:
        result["hpsv2_vs_reference_package"] = {
            "ours_images_per_s": n / med(r["hpsv2_ours_s"] for r in rounds),
            "reference_per_image_api_images_per_s": n / med(r["hpsv2_reference_s"] for r in rounds),
            "speedup": med(r["hpsv2_reference_s"] / r["hpsv2_ours_s"] for r in rounds),
        }
    else:
        result["hpsv2_vs_reference_package"] = checkpoint if "hpsv2" in SCORERS else "not run (hpsv2 not in --scorers)"

    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "label.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


def _hpsv2_reference(work: Path, tiny_weights: str | None):
    """The hpsv2 package's `img_score.score`; with tiny weights, its model cache filled with the tiny arch."""
    from hpsv2 import img_score

    if tiny_weights is None:
        return img_score.score, None
    from hpsv2.src.open_clip import factory

    from prefpipe.testing.scorers import TINY_OPEN_CLIP_H

    factory._MODEL_CONFIGS["prefpipe-tiny-ViT-H-14"] = json.loads(json.dumps(TINY_OPEN_CLIP_H))  # noqa: SLF001 - the reference package has no public way to register an architecture
    real_create = img_score.create_model_and_transforms
    img_score.create_model_and_transforms = lambda name, pretrained, **kw: real_create("prefpipe-tiny-ViT-H-14", None, **kw)
    img_score.model_dict = {}
    img_score.root_path = str(work)
    img_score.device = "cpu"
    return img_score.score, str(Path(tiny_weights) / "HPS_v2.1_compressed.pt")


if __name__ == "__main__":
    main()
