"""Ingest throughput and peak memory at 1x and 10x input, against plain pyarrow reads of the same files.

    .venv/bin/python benchmarks/ingest.py                     # 1x = 1,000 rows, 10x = 10,000 rows, 512 px
    .venv/bin/python benchmarks/ingest.py --rows 500 --side 256 --scale 20

The input is written here in the published Pick-a-Pic v2 schema (shards of `--rows-per-shard` rows in row
groups of `--row-group` rows, about 12% ties, byte-distinct JPEGs of `--side` pixels). Every measurement
runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own:

  import only          the libraries the stage imports (the part of RSS that no input size moves)
  pyarrow read         iter_batches over every column of every file: the floor we compete with
  pyarrow read+write   the same batches written back to Parquet (zstd): the floor of any rewrite
  ingest header        `prefpipe ingest pickapic` with its defaults (header checks, global dedup)
  ingest full / none   every image decoded / no image checks (1x only)

Prints a table and writes benchmarks/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the address space, so unlike ru_maxrss (kept across
    exec) it does not inherit the parent's peak from before the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: an upper bound


def child(mode: str, data: str, out: str) -> dict:
    """One measurement in this (fresh) process; returns rows, wall seconds and peak RSS."""
    import pyarrow.parquet as pq

    from prefpipe.core.tables import parquet_files

    files = parquet_files(data)
    if mode.startswith("ingest") or mode == "import":  # imports are not part of the timed work
        import numpy  # noqa: F401
        import PIL.Image  # noqa: F401
        import tqdm.auto  # noqa: F401

        import prefpipe.stages.ingest  # noqa: F401
    t0 = time.perf_counter()
    rows = 0
    if mode == "import":
        pass
    elif mode in ("read", "read+write"):
        for i, f in enumerate(files):
            writer = None
            for batch in pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20).iter_batches(batch_size=64, use_threads=False):
                rows += batch.num_rows
                if mode == "read+write":
                    if writer is None:
                        writer = pq.ParquetWriter(Path(out) / f"{i:05d}.parquet", batch.schema, compression="zstd")
                    writer.write_batch(batch)
            if writer is not None:
                writer.close()
    else:
        from prefpipe.stages.ingest.options import IngestOptions
        from prefpipe.stages.ingest.pickapic import ingest_pickapic

        verify = mode.split()[1]
        counters = ingest_pickapic(data, out, IngestOptions(verify_images=verify), progress=False, rank=0, world=1)
        rows = counters["rows_read"]
    return {"rows": rows, "wall_s": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}


def make_input(folder: Path, rows: int, rows_per_shard: int, row_group: int, side: int) -> int:
    """Write `rows` Pick-a-Pic rows; returns the bytes on disk."""
    from tests.test_ingest import jpeg, row, unique_jpeg, write_pickapic

    pool = [jpeg(seed, side=side) for seed in range(16)]
    shards, rows_left, i = [], rows, 0
    while rows_left > 0:
        n = min(rows_per_shard, rows_left)
        shard = []
        for _ in range(n):
            label = 0.5 if i % 25 in (0, 8, 16) else float(i % 2)  # 12% ties, as Pick-a-Pic v2 train
            shard.append(row(f"prompt {i // 8}", f"u{i}a", f"u{i}b", label, unique_jpeg(pool[i % 16], 2 * i),
                             unique_jpeg(pool[(i + 7) % 16], 2 * i + 1), ranking_id=i, n_per_prompt=8))
            i += 1
        shards.append(shard)
        rows_left -= n
    paths = write_pickapic(folder, shards, row_group_size=row_group)
    return sum(p.stat().st_size for p in paths)


def measure(mode: str, data: Path, work: Path) -> dict:
    out = work / f"out-{mode.replace(' ', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(data), str(out)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000, help="rows at 1x")
    ap.add_argument("--scale", type=int, default=10, help="the larger input is this many times --rows")
    ap.add_argument("--rows-per-shard", type=int, default=500)
    ap.add_argument("--row-group", type=int, default=100)
    ap.add_argument("--side", type=int, default=512, help="image side in pixels")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="prefpipe-bench-ingest-"))
    results = {"cpu": platform.processor() or platform.machine(), "side": args.side,
               "rows_per_shard": args.rows_per_shard, "row_group": args.row_group, "runs": []}
    for scale in (1, args.scale):
        data = work / f"input-{scale}x"
        t0 = time.perf_counter()
        size = make_input(data, args.rows * scale, args.rows_per_shard, args.row_group, args.side)
        print(f"{scale}x: wrote {args.rows * scale} rows, {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        modes = ["import", "read", "read+write", "ingest header"]
        if scale == 1:
            modes += ["ingest full", "ingest none"]
        for mode in modes:
            r = measure(mode, data, work)
            r.update(mode=mode, scale=scale, input_mb=size / 1e6,
                     rows_per_s=r["rows"] / r["wall_s"] if r["rows"] else None,
                     mb_per_s=size / 1e6 / r["wall_s"] if r["rows"] else None)
            results["runs"].append(r)
            print(f"  {mode:<14} {r['wall_s']:7.2f} s  peak RSS {r['peak_rss_mb']:6.0f} MB", file=sys.stderr)
        shutil.rmtree(data, ignore_errors=True)
    by = {(r["mode"], r["scale"]): r for r in results["runs"]}
    for scale in (1, args.scale):
        ing, read = by[("ingest header", scale)], by[("read", scale)]
        results[f"ingest_vs_read_{scale}x"] = ing["rows_per_s"] / read["rows_per_s"]
    results["ingest_rss_growth_mb"] = by[("ingest header", args.scale)]["peak_rss_mb"] - by[("ingest header", 1)]["peak_rss_mb"]

    print(f"\n{'mode':<16}{'size':>6}{'rows':>8}{'rows/s':>10}{'MB/s':>8}{'peak RSS MB':>13}")
    for r in results["runs"]:
        rate = f"{r['rows_per_s']:10.0f}{r['mb_per_s']:8.0f}" if r["rows_per_s"] else f"{'-':>10}{'-':>8}"
        print(f"{r['mode']:<16}{str(r['scale']) + 'x':>6}{r['rows']:>8}{rate}{r['peak_rss_mb']:>13.0f}")
    print(f"\ningest/pyarrow read throughput: {results['ingest_vs_read_1x']:.2f} at 1x, "
          f"{results[f'ingest_vs_read_{args.scale}x']:.2f} at {args.scale}x; "
          f"ingest peak RSS change 1x -> {args.scale}x: {results['ingest_rss_growth_mb']:+.0f} MB")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(results, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
