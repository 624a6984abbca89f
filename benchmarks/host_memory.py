"""Host memory per rank of `prefpipe train`: what each process holds before and while it trains.

    .venv/bin/python benchmarks/host_memory.py                       # tiny SDXL built here, 2 CPU processes

Runs `accelerate launch --multi_gpu --num_processes 2 -m prefpipe train` on a tiny SDXL three times, each
in its own fresh processes, and samples every rank's RSS (psutil, every 20 ms):

(a) cold:      the cache is empty: the VAE and both text encoders are loaded to encode it;
(b) warm:      the cache is complete: only the UNet is loaded (the cache holds the latent scaling and the
               unconditional embedding);
(c) baseline:  the layout before this change, in the same run: every rank loads the whole pipeline in fp32
               on the CPU (`load_pipeline(dtype="fp32")`), then trains (`--no-cache`, so the encoders stay).

Tiny models weigh a few MB, so the RSS here is mostly the libraries (torch, diffusers); the weights'
share for the real SDXL is computed from its parameter counts and printed beside it (`--real-sdxl`).
Writes benchmarks/results/host_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0's components (their config.json, counted).
SDXL = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def sdxl_figures() -> dict[str, float]:
    """GB of weights each rank holds on the host while loading real SDXL, before and after this change."""
    gb = 1e9
    total_fp32 = sum(SDXL.values()) * 4 / gb
    text = (SDXL["text_encoder"] + SDXL["text_encoder_2"])
    return {
        "before: whole pipeline in fp32 (every run)": total_fp32,
        "LoRA bf16, cold cache: UNet + text encoders in bf16, VAE in fp32": (SDXL["unet"] + text) * 2 / gb
        + SDXL["vae"] * 4 / gb,
        "LoRA bf16, complete cache: the UNet in bf16 only": SDXL["unet"] * 2 / gb,
        "full fine-tuning, complete cache: UNet fp32 + its bf16 reference copy (transiently a second fp32 copy)":
        SDXL["unet"] * (4 + 2) / gb,
    }


def sample_ranks(proc: subprocess.Popen, stop: threading.Event, peaks: dict[int, int]) -> None:
    import psutil

    root = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            for p in root.children(recursive=True):
                try:
                    rank = p.environ().get("RANK")
                    if rank is not None and "prefpipe" in " ".join(p.cmdline()):
                        peaks[int(rank)] = max(peaks.get(int(rank), 0), p.memory_info().rss)
                except psutil.Error:
                    continue
        except psutil.Error:
            return
        time.sleep(0.02)


def run_variant(args: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    peaks: dict[int, int] = {}
    stop = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=sample_ranks, args=(proc, stop, peaks), daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed:\n{err[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mb_per_rank": {r: v / 2**20 for r, v in sorted(peaks.items())}}


BASELINE = """
import sys
from prefpipe.models import load_pipeline
import prefpipe.models as models
real = models.load_pipeline
def whole_fp32(model, **kw):  # the layout before: every component, fp32, on the CPU
    kw.update(dtype="fp32", device="cpu", dtypes=None, without=())
    return real(model, **kw)
models.load_pipeline = whole_fp32
from prefpipe.cli import main
main(sys.argv[1:])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "host_memory.json"))
    args = ap.parse_args()

    from benchmarks.train import _write_pairs
    from prefpipe.testing.tiny import write_tiny_pipeline

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="prefpipe-hostmem-") as tmp:
        tmp = Path(tmp)
        model = write_tiny_pipeline("sdxl", tmp / "model")
        pairs = _write_pairs(tmp / "pairs", args.pairs, 48)
        common = ["--model", str(model), "--pairs", str(pairs), "--resolution", "32", "--batch-size", "1",
                  "--max-steps", str(args.steps), "--checkpoint-every", "0", "--no-progress"]
        results = {
            "cold": run_variant(["-m", "prefpipe", "train", *common, "--out", str(tmp / "cold"),
                                 "--cache-dir", str(tmp / "cache")], env),
            "warm": run_variant(["-m", "prefpipe", "train", *common, "--out", str(tmp / "warm"),
                                 "--cache-dir", str(tmp / "cache")], env),
        }
        script = tmp / "baseline.py"
        script.write_text(BASELINE)
        results["baseline"] = run_variant([str(script), "train", *common, "--out", str(tmp / "base"), "--no-cache"],
                                          env)
    base = max(results["baseline"]["peak_rss_mb_per_rank"].values())
    for r in results.values():
        r["peak_rss_vs_baseline"] = max(r["peak_rss_mb_per_rank"].values()) / base
    report = {"tiny_sdxl": results, "real_sdxl_host_weights_gb_per_rank": sdxl_figures(), "pairs": args.pairs,
              "steps": args.steps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| run (tiny SDXL, 2 CPU processes) | peak RSS per rank (MiB) | vs baseline |")
    print("|---|---|---|")
    for name, r in results.items():
        ranks = ", ".join(f"{v:.0f}" for v in r["peak_rss_mb_per_rank"].values())
        print(f"| {name} | {ranks} | {r['peak_rss_vs_baseline']:.2f}x |")
    print("\n| real SDXL, weights each rank holds on the host | GB |\n|---|---|")
    for k, v in sdxl_figures().items():
        print(f"| {k} | {v:.1f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
