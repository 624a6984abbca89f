"""Every stage at Pick-a-Pic scale (issue 15): time and peak memory at 10^4, 10^5 and 10^6 pairs.

    .venv/bin/python benchmarks/scale.py                                   # 10^4, 10^5, 10^6 pairs
    .venv/bin/python benchmarks/scale.py --sizes 10000,100000 --cache-max 10000

The input is written in the published Pick-a-Pic v2 layout and schema (`PICKAPIC_V2` plus the stray
`__index_level_0__`; shards of `--rows-per-shard` rows in row groups of `--row-group`): distinct PNG images of
16, 24 or 32 px (gradients of random colours plus noise of random strength, so every scorer's scores differ),
12% human ties, and human labels that follow the brighter image 65% of the time. Steps, each in a fresh child
process with one thread (imports and model loading are not timed; peak RSS is the child's VmHWM):

  ingest                    `prefpipe ingest pickapic` (ingest_pickapic, default checks, --ties keep)
  relabel+agree mean_pixel  relabel_pairs of the ingested pairs with MeanPixel, a cheap continuous scorer
                            defined here, then agreement_report (its tie-threshold search sorts every |diff|)
  relabel+agree compress.   the same with the `compressibility` scorer (discrete JPEG sizes)
  trainer scan              trainer.data.rows.list_units + trainer.data.pairs.prepare_data(cache_root=None):
                            every row's images decoded and checked, the pair index built (no UNet steps)
  trainer cache             prepare_data with a fresh cache: every image VAE-encoded and every caption
                            text-encoded by the tiny SD 1.5 (prefpipe.testing.tiny), for sizes <= --cache-max

Linearity: between consecutive sizes, time may grow at most 1.2x the rows (12x for 10x) and peak RSS at
most 1.2x ("flat"); PASS/FAIL per step. The check uses the child's CPU time (user + sys): on a shared
machine wall time also measures the neighbours; both are reported. Steps not run at the largest size are
extrapolated from the two largest sizes measured (marked "est."). Prints a markdown table; writes
benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEPS = ("ingest", "relabel+agree mean_pixel", "relabel+agree compressibility", "trainer scan", "trainer cache")
SIDES = (16, 24, 32)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1", "RAYON_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false"}


class MeanPixel:
    """A cheap continuous scorer: mean pixel value in [0, 1] plus 1e-4 x sin(sum of a pixel subsample), so
    that images of equal mean rarely tie."""

    name, version, higher_is_better = "mean_pixel", "bench-1", True

    def score(self, images, prompts) -> np.ndarray:
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB"), dtype=np.float32)
            out.append(a.mean() / 255 + 1e-4 * math.sin(float(a[::3, ::5].sum())))
        return np.array(out, dtype=np.float32)


# -- input ------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_batch(arrays: np.ndarray) -> list[bytes]:
    """RGB uint8 arrays (N, S, S, 3) -> PNG files (filter 0, zlib level 1), without Pillow's per-image cost."""
    n, h, w, _ = arrays.shape
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    tail = _chunk(b"IEND", b"")
    rows = np.concatenate([np.zeros((n, h, 1), np.uint8), arrays.reshape(n, h, w * 3)], axis=2)
    return [head + _chunk(b"IDAT", zlib.compress(r.tobytes(), 1)) + tail for r in rows]


def images(rng: np.random.Generator, n: int, banks: dict[int, np.ndarray]) -> tuple[list[bytes], np.ndarray]:
    """`n` distinct PNGs of random side, and their mean pixel values."""
    side = rng.choice(SIDES, n)
    out: list[bytes] = [b""] * n
    means = np.zeros(n)
    for s in SIDES:
        idx = np.flatnonzero(side == s)
        k = len(idx)
        y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
        ramps = np.stack([x, y, (x + y) / 2, (1 + x - y) / 2])[rng.integers(0, 4, k), ..., None]
        c0, c1 = (rng.uniform(0, 255, (k, 1, 1, 3)).astype(np.float32) for _ in range(2))
        amp = rng.uniform(0, 0.35, (k, 1, 1, 1)).astype(np.float32)
        arr = np.clip(c0 + (c1 - c0) * ramps + banks[s][rng.integers(0, len(banks[s]), k)] * amp, 0, 255).astype(np.uint8)
        means[idx] = arr.mean(axis=(1, 2, 3))
        for i, data in zip(idx, png_batch(arr)):
            out[i] = data
    return out, means


def make_input(folder: Path, rows: int, rows_per_shard: int, row_group: int) -> int:
    """Write `rows` Pick-a-Pic v2 rows under folder/data; returns the bytes on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefpipe.core.schema import PICKAPIC_V2

    schema = pa.schema(list(PICKAPIC_V2) + [pa.field("__index_level_0__", pa.int64())])
    rng = np.random.default_rng(0)
    banks = {s: rng.normal(0, 128, (512, s, s, 3)).astype(np.float32) for s in SIDES}
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    things = ["cat", "house", "tree", "car", "boat", "flower", "robot", "castle"]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    n_shards, size = -(-rows // rows_per_shard), 0
    t0 = np.datetime64("2023-05-01T00:00:00", "ns")
    for k in range(n_shards):
        i = np.arange(k * rows_per_shard, min(rows, (k + 1) * rows_per_shard))
        n = len(i)
        (jpg_0, m0), (jpg_1, m1) = images(rng, n, banks), images(rng, n, banks)
        label_0 = ((m0 > m1) ^ (rng.random(n) < 0.35)).astype(float)
        label_0[rng.random(n) < 0.12] = 0.5
        uid0, uid1 = [f"{j:012x}-0" for j in i], [f"{j:012x}-1" for j in i]
        cols = {
            "are_different": [True] * n,
            "best_image_uid": [a if lab == 1 else b if lab == 0 else None for a, b, lab in zip(uid0, uid1, label_0)],
            "caption": [f"a {colours[j // 4 % 8]} {things[j // 32 % 8]}, picture {j // 4}" for j in i],  # 4 per prompt
            "created_at": t0 + i.astype("timedelta64[s]"),
            "has_label": [True] * n,
            "image_0_uid": uid0, "image_0_url": [f"https://example.org/{u}.png" for u in uid0],
            "image_1_uid": uid1, "image_1_url": [f"https://example.org/{u}.png" for u in uid1],
            "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label_0, "label_1": 1 - label_0,
            "model_0": ["sdxl"] * n, "model_1": ["sd21"] * n,
            "ranking_id": i, "user_id": i % 997, "num_example_per_prompt": [4] * n, "__index_level_0__": i,
        }
        path = folder / "data" / f"train-{k:05d}-of-{n_shards:05d}-{1000 + k:016x}.parquet"
        pq.write_table(pa.table(cols, schema=schema), path, row_group_size=row_group)
        size += path.stat().st_size
    return size


# -- one measured step, in a child process ----------------------------------------------------------
def _vm(field: str) -> float:
    """This process's VmHWM (peak) or VmRSS in MB (VmHWM is the address space's own, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(step: str, work: Path, model: str) -> dict:
    """Run `step` on work/input (or work/out, ingest's output); returns rows, seconds, RSS and step figures."""
    human, extra = work / "out" / "pairs" / "human", {}
    if step == "ingest":
        from prefpipe.stages.ingest.options import IngestOptions
        from prefpipe.stages.ingest.pickapic import ingest_pickapic

        base, t0, c0 = _vm("VmRSS"), time.perf_counter(), time.process_time()
        counters = ingest_pickapic(work / "input", work / "out", IngestOptions(ties="keep"), progress=False, rank=0, world=1)
        rows, extra = counters["rows_read"], {"kept": counters["kept"]}
    elif step.startswith("relabel"):
        from prefpipe.stages.label import agreement_report, relabel_pairs
        from prefpipe.stages.scoring import load_scorers

        name = step.split()[1]
        scorers = [MeanPixel()] if name == "mean_pixel" else load_scorers([name], {}, device="cpu")
        base, t0, c0 = _vm("VmRSS"), time.perf_counter(), time.process_time()
        ds = relabel_pairs(human, work / f"relabel-{name}", [name], {}, device="cpu", progress=False, scorers=scorers)
        t1 = time.perf_counter()
        report = agreement_report(ds.folder, [name])
        r = report["scorers"][name]
        rows = report["pairs"]
        extra = {"agreement_s": time.perf_counter() - t1, "accuracy_non_tie": r["accuracy_non_tie"],
                 "tie_aware_accuracy": r["tie_aware_accuracy"], "tie_threshold": r["tie_threshold"]}
    else:
        import torch

        from prefpipe.models import load_pipeline
        from trainer.conditioning import TextConditioner
        from trainer.data.cache import Encoders
        from trainer.data.pairs import prepare_data
        from trainer.data.rows import list_units, sources_fingerprint

        torch.set_num_threads(1)
        pipe = load_pipeline(model, dtype="fp32", device="cpu")
        vae = pipe.vae.requires_grad_(False).eval()
        resolution = int(pipe.unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
        encoders = Encoders(vae, TextConditioner(pipe, "cpu"), batch_size=64)
        cache = work / "cache" if step == "trainer cache" else None
        base, t0, c0 = _vm("VmRSS"), time.perf_counter(), time.process_time()
        units = list_units([human])
        data = prepare_data(units=units, cache_root=cache, cache_parts={"pairs": sources_fingerprint([human], None),
                            "resolution": resolution}, encoders=encoders, resolution=resolution, keep_ties="half",
                            random_crop=False, random_flip=False, seed=0, caption_dropout=0.0, progress=False)
        rows, extra = data.stats["rows_read"], {"units": len(units), "items": len(data), "resolution": resolution}
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"rows": rows, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": _vm("VmHWM"), "base_rss_mb": base, **extra}


def measure(step: str, work: Path, model: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", step, str(work), model], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"{step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the report -------------------------------------------------------------------------------------
def linearity(runs: list[dict], sizes: list[int]) -> dict:
    """Per step: the checks between consecutive measured sizes (on CPU time; wall time is shown beside it),
    and an estimate at the largest size if the step was not run there (a power law through the two largest
    sizes measured, exponent at least 1)."""
    out = {}
    for step in STEPS:
        got = sorted((r for r in runs if r["step"] == step), key=lambda r: r["size"])
        checks = []
        for a, b in zip(got, got[1:]):
            limit = 1.2 * b["size"] / a["size"]
            c = {"from": a["size"], "to": b["size"], "cpu_ratio": b["cpu_s"] / a["cpu_s"],
                 "wall_ratio": b["wall_s"] / a["wall_s"], "time_limit": limit,
                 "rss_ratio": b["peak_rss_mb"] / a["peak_rss_mb"]}
            c["pass"] = c["cpu_ratio"] <= limit and c["rss_ratio"] <= 1.2
            checks.append(c)
        entry = {"checks": checks, "pass": all(c["pass"] for c in checks) if checks else None}
        if got and got[-1]["size"] < max(sizes) and len(got) >= 2:
            a, b = got[-2], got[-1]
            k = max(1.0, math.log(b["cpu_s"] / a["cpu_s"]) / math.log(b["size"] / a["size"]))
            entry["estimate"] = {"size": max(sizes), "exponent": k, "cpu_s": b["cpu_s"] * (max(sizes) / b["size"]) ** k}
        out[step] = entry
    return out


def print_report(results: dict) -> None:
    print("\n| step | pairs | wall s | CPU s | rows/s (CPU) | peak RSS MB | RSS at start MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        print(f"| {r['step']} | {r['size']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rows'] / r['cpu_s']:,.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['base_rss_mb']:.0f} |")
    for step, e in results["linearity"].items():
        if "estimate" in e:
            est = e["estimate"]
            print(f"| {step} | {est['size']:,} (est.) | - | {est['cpu_s']:.0f} | {est['size'] / est['cpu_s']:,.0f} | - | - |")
    print()
    for step, e in results["linearity"].items():
        parts = [f"{c['from']:,}->{c['to']:,}: CPU x{c['cpu_ratio']:.2f} (limit x{c['time_limit']:.1f}; wall "
                 f"x{c['wall_ratio']:.2f}), peak RSS x{c['rss_ratio']:.2f} (limit x1.2)" for c in e["checks"]]
        verdict = {True: "PASS", False: "FAIL", None: "not checked (one size)"}[e["pass"]]
        note = ""
        if "estimate" in e:
            note = (f"; not run at {e['estimate']['size']:,}: about {e['estimate']['cpu_s'] / 60:.0f} CPU min "
                    f"extrapolated (time ~ rows^{e['estimate']['exponent']:.2f})")
        print(f"{step}: {verdict}  {'; '.join(parts)}{note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="pairs, comma-separated")
    ap.add_argument("--cache-max", type=int, default=100_000, help="largest size at which the trainer cache is built")
    ap.add_argument("--rows-per-shard", type=int, default=5000)
    ap.add_argument("--row-group", type=int, default=500)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one under /tmp, removed after)")
    ap.add_argument("--child", nargs=3, metavar=("STEP", "WORK", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.child[2])))
        return

    from prefpipe.testing.tiny import write_tiny_pipeline

    sizes = sorted(int(s) for s in args.sizes.split(","))
    root = Path(args.work or tempfile.mkdtemp(prefix="prefpipe-bench-scale-"))
    model = str(write_tiny_pipeline("sd15", root / "tiny-sd15", size=32))
    results = {"cpu": platform.processor() or platform.machine(), "threads": 1, "sizes": sizes,
               "rows_per_shard": args.rows_per_shard, "row_group": args.row_group, "cache_max": args.cache_max,
               "inputs": {}, "runs": []}
    try:
        for size in sizes:
            work = root / f"pairs-{size}"
            shutil.rmtree(work, ignore_errors=True)
            need, free = size * 2 * 1700 * 2.5, shutil.disk_usage(root).free  # input + ingested copy, ~1.7 kB/image
            if need > free:
                print(f"{size:,} pairs: needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free: skipped", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            nbytes = make_input(work / "input", size, args.rows_per_shard, args.row_group)
            results["inputs"][size] = {"mb": nbytes / 1e6, "write_s": time.perf_counter() - t0}
            print(f"{size:,} pairs: wrote {nbytes / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for step in STEPS:
                if step == "trainer cache" and size > args.cache_max:
                    continue
                r = {"step": step, "size": size, **measure(step, work, model)}
                results["runs"].append(r)
                print(f"  {step:<32}{r['wall_s']:8.1f} s wall {r['cpu_s']:8.1f} s CPU  {r['rows'] / r['cpu_s']:9.0f} rows/s  "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MB", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    results["linearity"] = linearity(results["runs"], sizes)
    print_report(results)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
