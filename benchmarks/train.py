"""Training throughput and memory: our default against the reference trainers' layout, same run.

    .venv/bin/python benchmarks/train.py                                  # tiny SD 1.5 built here, CPU
    .venv/bin/python benchmarks/train.py --model stabilityai/stable-diffusion-xl-base-1.0 \
        --resolution 1024 --batch-size 1 --mixed-precision fp16 --vae madebyollin/sdxl-vae-fp16-fix \
        --vae-dtype fp16 --gradient-checkpointing --steps 30                # on a GPU

(a) ours:      cached VAE latents + text embeddings (encoded once, before the steps), LoRA reference =
               the policy UNet with adapters disabled.
(b) reference: the Diffusion-DPO trainers' layout: VAE and text encoder(s) run at every step, and a second,
               frozen UNet is the reference (diffusers' LoRA script disables adapters instead; the paper's
               train.py keeps a copy; (b) takes the heavier of the two to show what the defaults save).

Both variants train the same LoRA on the same pairs with the same seed, so their losses agree (reported as
the largest difference). Each variant runs in its own child process, so peak memory is its own:
steps/s over the training steps (model loading and the one-off cache encoding excluded and reported
separately), peak RSS of the process and during the steps (CPU; psutil samples every 20 ms), and
`torch.cuda.max_memory_allocated` during the steps (GPU). Writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "ours": {},
    "reference": {"no_cache": True, "reference_copy": True},
}


def _write_pairs(folder: Path, n: int, size: int) -> Path:
    """`n` pairs of drawn images (shapes on backgrounds), PNG and JPEG, in our pairs schema."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    from prefpipe.core.schema import PAIRS, conform

    rng = random.Random(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]

    def image(fmt: str) -> bytes:
        im = Image.new("RGB", (size, size), rng.choice(colours))
        d = ImageDraw.Draw(im)
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 8, size // 3)
        d.ellipse([x - r, y - r, x + r, y + r], fill=rng.choice(colours))
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        return buf.getvalue()

    rows = {"caption": [f"a {rng.choice(colours)} circle" for _ in range(n)],
            "jpg_0": [image("PNG") for _ in range(n)], "jpg_1": [image("JPEG") for _ in range(n)],
            "label_0": [float(i % 2) for i in range(n)]}
    rows["label_1"] = [1 - v for v in rows["label_0"]]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(pa.table(rows), PAIRS), folder / "train-00000-of-00001.parquet")
    return folder


def child(args: argparse.Namespace) -> None:
    """Run one variant; print one JSON line."""
    import psutil
    import torch

    from trainer.config import TrainConfig
    from trainer.recipes import train

    if args.threads:
        torch.set_num_threads(args.threads)
    proc = psutil.Process()
    state = {"steps_started": None, "rss_steps": 0}

    def steps_start():  # the first step marks the start of the measured steps
        state["steps_started"] = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    stop = threading.Event()

    def sample():
        while not stop.is_set():
            if state["steps_started"] is not None:
                state["rss_steps"] = max(state["rss_steps"], proc.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    cfg = TrainConfig(
        model=args.model, out=args.out, pairs=(args.pairs_dir,), cache_dir=args.cache_dir, resolution=args.resolution,
        batch_size=args.batch_size, max_steps=args.steps, learning_rate=1e-5, checkpoint_every=0, no_progress=True,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing, vae=args.vae,
        vae_dtype=args.vae_dtype, lora_rank=args.lora_rank, seed=0, **VARIANTS[args.child],
    )
    t0 = time.perf_counter()
    summary = train(cfg, on_steps_start=steps_start)
    total = time.perf_counter() - t0
    stop.set()
    losses = [json.loads(line).get("loss") for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({
        "variant": args.child,
        "steps": summary["steps_run"],
        "steps_per_s": summary["steps_per_s"],
        "pairs_per_s": summary["steps_per_s"] * args.batch_size,
        "setup_s": total - summary["wall_s"],  # loading, scanning and (ours) encoding the cache once
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps_rss_mb": state["rss_steps"] / 2**20,
        "steps_gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "losses": losses,
    }))


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline hub id or folder (default: a tiny SD 1.5 built here)")
    ap.add_argument("--pairs", type=int, default=64, help="number of drawn pairs")
    ap.add_argument("--image-size", type=int, default=None, help="side of the drawn images [default: resolution]")
    ap.add_argument("--resolution", type=int, default=None, help="training resolution [default: the model's]")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--vae", default=None)
    ap.add_argument("--vae-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's)")
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--pairs-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch

    work = Path(tempfile.mkdtemp(prefix="prefpipe-bench-train-"))
    try:
        if args.model is None:
            from prefpipe.testing.tiny import write_tiny_pipeline

            args.model = str(write_tiny_pipeline("sd15", work / "tiny-sd15"))
        size = args.image_size or args.resolution or 64
        pairs = _write_pairs(work / "pairs", args.pairs, size)
        results = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--pairs-dir", str(pairs),
                   "--out", str(work / f"run-{variant}"), "--cache-dir", str(work / "cache"),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--mixed-precision", args.mixed_precision, "--vae-dtype", args.vae_dtype,
                   "--lora-rank", str(args.lora_rank)]
            for flag, value in (("--resolution", args.resolution), ("--vae", args.vae), ("--threads", args.threads)):
                if value is not None:
                    cmd += [flag, str(value)]
            if args.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        ours, ref = results["ours"], results["reference"]
        diffs = [abs(a - b) for a, b in zip(ours.pop("losses"), ref.pop("losses")) if a is not None and b is not None]
        result = {
            "model": args.model, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu": platform.processor() or platform.machine(), "threads": args.threads or torch.get_num_threads(),
            "pairs": args.pairs, "batch_size": args.batch_size, "steps": args.steps,
            "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
            "ours": ours, "reference": ref,
            "speedup": ours["steps_per_s"] / ref["steps_per_s"],
            "max_loss_difference": max(diffs) if diffs else None,
        }
        out = REPO / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.json").write_text(json.dumps(result, indent=2))
        print(f"model {args.model} on {result['device']}; {args.steps} steps of {args.batch_size} pairs")
        rows = [("steps/s", "steps_per_s"), ("pairs/s", "pairs_per_s"), ("setup s (load + encode)", "setup_s"),
                ("peak RSS MB (process)", "peak_rss_mb"), ("RSS MB during steps", "steps_rss_mb"),
                ("GPU peak MB during steps", "steps_gpu_peak_mb")]
        print(f"{'':<26}{'ours (cache + adapters off)':>30}{'reference (encode + UNet copy)':>34}")
        for label, key in rows:
            print(f"{label:<26}{_fmt(ours[key]):>30}{_fmt(ref[key]):>34}")
        print(f"speed-up {result['speedup']:.2f}x; largest loss difference between the two {result['max_loss_difference']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
