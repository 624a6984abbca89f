"""D3PO's costs against Diffusion-DPO's: trajectory storage per image, and training speed on the same pairs.

    .venv/bin/python benchmarks/d3po.py                                   # tiny SD 1.5 built here, CPU
    .venv/bin/python benchmarks/d3po.py --model runwayml/stable-diffusion-v1-5 --size 512 --prompts 16 \
        --mixed-precision fp16 --train-steps 20                          # on a GPU

One candidates dataset is sampled with `prefpipe generate --trajectories` (DDIM, eta 1, `--ddim-steps`
steps) and labelled by JPEG compressibility, every pair within a prompt (`prefpipe label --strategy all`).
Then, on those very pairs, with the same model, LoRA, batch and seed:

- **storage**: bytes per image of the stored trajectory (npz, float16 latents of every step) against the
  PNG itself, and the raw size ``(T+1) x C x h x w x 2``;
- **dpo**: `prefpipe train --objective dpo --source ai` (one UNet pass per pair for the policy, one for the
  reference, on re-encoded final images; VAE latents cached before the steps);
- **d3po** at `--step-fraction` 1 and at the fractions given: `--objective d3po --candidates` (per pair and
  trained step: policy and reference, each on winner and loser, each twice for classifier-free guidance).

Speeds are over the optimizer steps only (model loading, caching and trajectory decoding excluded, as the
loop's own summary measures them). Writes benchmarks/results/d3po.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
THINGS = ["box", "ball", "tree", "cat", "house", "flower", "car", "bird"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline hub id or folder (default: a tiny SD 1.5 built here)")
    ap.add_argument("--size", default=None, help="image side [default: the model's]")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--ddim-steps", type=int, default=20, help="sampling steps (D3PO's default 20)")
    ap.add_argument("--guidance", type=float, default=5.0, help="D3PO's default 5.0")
    ap.add_argument("--batch-size", type=int, default=2, help="pairs per optimizer step, both objectives")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.25], help="d3po --step-fraction values besides 1")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    import polars as pl
    import torch

    from prefpipe.core.tables import parquet_files
    from prefpipe.core.trajectory import decode_trajectory
    from prefpipe.stages.generate import GenerateOptions, generate
    from prefpipe.stages.label import build_pair_dataset, score_candidates
    from prefpipe.stages.pairs import PairOptions
    from trainer.config import TrainConfig
    from trainer.recipes import train

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="prefpipe-bench-d3po-"))
    try:
        model = args.model
        if model is None:
            from prefpipe.testing.tiny import write_tiny_pipeline

            model = str(write_tiny_pipeline("sd15", work / "tiny-sd15"))
        prompts = work / "prompts.txt"
        prompts.write_text("".join(f"a {WORDS[i % 8]} {THINGS[(i // 8 + i) % 8]}\n" for i in range(args.prompts)))
        candidates = work / "candidates"
        t0 = time.perf_counter()
        generate(GenerateOptions(model=model, per_prompt=args.per_prompt, steps=args.ddim_steps, guidance=args.guidance,
                                 size=args.size, trajectories=True), prompts, candidates, progress=False)
        generate_s = time.perf_counter() - t0
        scores = score_candidates(candidates, work / "scores", ["compressibility"], {}, progress=False)
        build_pair_dataset(scores.folder, candidates, work / "pairs" / "ai", PairOptions(strategy="all"))

        table = pl.read_parquet(parquet_files(candidates), columns=["image", "trajectory"])
        traj_bytes = table["trajectory"].bin.size().to_numpy()
        image_bytes = table["image"].bin.size().to_numpy()
        shape = decode_trajectory(table["trajectory"][0])["latents"].shape
        storage = {
            "images": table.height, "latents_shape": list(shape),
            "trajectory_bytes_per_image": float(traj_bytes.mean()),
            "raw_float16_bytes_per_image": int(2 * torch.Size(shape).numel()),
            "png_bytes_per_image": float(image_bytes.mean()),
            "trajectory_over_png": float(traj_bytes.mean() / image_bytes.mean()),
        }

        common = dict(model=model, workdir=str(work), source=("ai",), batch_size=args.batch_size, max_steps=args.train_steps,
                      learning_rate=1e-4, checkpoint_every=0, no_progress=True, seed=0, mixed_precision=args.mixed_precision,
                      cache_dir=str(work / "cache"))
        variants = {"dpo": dict(objective="dpo")}
        for fraction in [1.0, *args.fractions]:
            variants[f"d3po@{fraction:g}"] = dict(objective="d3po", candidates=str(candidates), step_fraction=fraction)
        runs = {}
        for name, options in variants.items():
            summary = train(TrainConfig(out=str(work / f"run-{name}"), **common, **options))
            resolved = json.loads((work / f"run-{name}" / "train_config.json").read_text())["resolved"]
            runs[name] = {
                "steps_per_s": summary["steps_per_s"], "pairs_per_s": summary["steps_per_s"] * args.batch_size,
                "pairs": resolved["pairs"], "steps_per_pair": resolved.get("steps_per_pair"),
                # UNet passes per optimizer step (batch counted in images): policy + reference
                "unet_images_per_step": (2 * 2 * args.batch_size if name == "dpo"
                                         else 2 * 2 * 2 * args.batch_size * resolved["steps_per_pair"]),
                "last_loss": summary["last"].get("loss"),
            }
        result = {
            "model": args.model or "tiny sd15 (built here)", "device": "cuda" if torch.cuda.is_available() else "cpu",
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu": platform.processor() or platform.machine(), "threads": args.threads or torch.get_num_threads(),
            "prompts": args.prompts, "per_prompt": args.per_prompt, "ddim_steps": args.ddim_steps, "guidance": args.guidance,
            "batch_size": args.batch_size, "train_steps": args.train_steps, "mixed_precision": args.mixed_precision,
            "generate_s": generate_s, "storage": storage, "train": runs,
            "d3po_over_dpo_time_per_step": runs["dpo"]["steps_per_s"] / runs["d3po@1"]["steps_per_s"],
        }
        out = REPO / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "d3po.json").write_text(json.dumps(result, indent=2))

        print(f"model {result['model']} on {result['device']}; {table.height} images, {args.ddim_steps} DDIM steps, "
              f"latents {tuple(shape[1:])}")
        print(f"storage per image: trajectory {storage['trajectory_bytes_per_image'] / 1024:.1f} KiB "
              f"(raw float16 {storage['raw_float16_bytes_per_image'] / 1024:.1f} KiB), PNG {storage['png_bytes_per_image'] / 1024:.1f} KiB, "
              f"x{storage['trajectory_over_png']:.1f}")
        print(f"{'':<12}{'steps/s':>10}{'pairs/s':>10}{'steps/pair':>12}{'UNet images/step':>18}")
        for name, r in runs.items():
            print(f"{name:<12}{r['steps_per_s']:>10.2f}{r['pairs_per_s']:>10.2f}{str(r['steps_per_pair'] or '-'):>12}"
                  f"{r['unet_images_per_step']:>18}")
        print(f"a D3PO step (all {args.ddim_steps} steps) takes {result['d3po_over_dpo_time_per_step']:.1f}x a Diffusion-DPO step "
              f"at batch {args.batch_size}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
