"""Generate-stage throughput and overhead, against a bare pipeline loop in the same process.

    .venv/bin/python benchmarks/generate.py                       # tiny SD 1.5 (built offline)
    .venv/bin/python benchmarks/generate.py --model stabilityai/stable-diffusion-xl-base-1.0 \
        --size 1024 --steps 30 --batch-size 8 --prompts 64         # on a GPU

Reports images/s of `prefpipe generate` and of a bare loop calling the same pipeline with the same
batches (the floor: no PNG encoding, no Parquet, no bookkeeping), their ratio, the share of the stage's
wall time spent outside the pipeline call (our overhead: PNG encoding and writing run in a background
thread, so it should be small), and peak RSS. The two alternate over `--rounds` rounds (a noisy machine
slows both alike within a round); the figures are the medians. Writes benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PARTI = REPO.parent / "shared" / "data" / "PartiPrompts.tsv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline hub id or folder (default: a tiny SD 1.5 built here)")
    ap.add_argument("--prompts", type=int, default=16, help="number of PartiPrompts prompts")
    ap.add_argument("--per-prompt", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the bare loop and the stage")
    args = ap.parse_args()

    import torch

    from prefpipe.core.prompts import read_prompts
    from prefpipe.models import load_pipeline
    from prefpipe.stages.generate import GenerateOptions, generate, image_seed, parse_size
    from prefpipe.testing.tiny import write_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="prefpipe-bench-"))
    model = args.model or str(write_tiny_pipeline("sd15", work / "tiny-sd15"))
    ps = read_prompts(PARTI, limit=args.prompts)
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(ps.prompts) + "\n")
    n_images = len(ps) * args.per_prompt

    opts = GenerateOptions(model=model, per_prompt=args.per_prompt, steps=args.steps, size=args.size,
                           dtype=args.dtype, prompts_per_shard=max(1, len(ps) // 4))
    pipe = load_pipeline(model, dtype=args.dtype)  # one pipeline for both measurements
    size = parse_size(args.size)
    call = {"num_inference_steps": args.steps, "output_type": "pil"}
    if size:
        call.update(width=size[0], height=size[1])
    jobs = [(pid, p, c) for pid, p in zip(ps.ids, ps.prompts) for c in range(args.per_prompt)]
    batches = [jobs[b : b + args.batch_size] for b in range(0, len(jobs), args.batch_size)]

    def bare_loop(batches) -> float:
        """The floor: the same pipeline on the same batches and generators, images discarded."""
        t0 = time.perf_counter()
        for batch in batches:
            gens = [torch.Generator("cpu").manual_seed(image_seed(0, pid, c)) for pid, _, c in batch]
            pipe(prompt=[p for _, p, _ in batch], generator=gens, **call)
        return time.perf_counter() - t0

    import statistics

    bare_loop(batches[:1])  # warm-up (first-call kernel selection) outside both measurements
    rounds = []
    for r in range(args.rounds):
        bare_wall = bare_loop(batches)
        stage = generate(opts, prompt_file, work / f"stage-{r}", batch_size=args.batch_size, progress=False, pipe=pipe)
        rounds.append({"bare_s": bare_wall, "stage_s": stage["wall_s"], "pipeline_s": stage["pipeline_s"]})
    bare_wall = statistics.median(x["bare_s"] for x in rounds)
    stage_wall = statistics.median(x["stage_s"] for x in rounds)

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "model": args.model or "tiny-sd15 (64 px)",
        "device": str(pipe.prefpipe_device),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "images": n_images,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "stage_images_per_s": n_images / stage_wall,
        "bare_loop_images_per_s": n_images / bare_wall,
        "stage_vs_bare_ratio": statistics.median(x["bare_s"] / x["stage_s"] for x in rounds),
        "share_outside_pipeline": statistics.median(1 - x["pipeline_s"] / x["stage_s"] for x in rounds),
        "rounds": rounds,
        "peak_rss_mb": rss_mb,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(result, indent=2))
    width = max(map(len, result))
    for k, v in result.items():
        if k != "rounds":
            print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
