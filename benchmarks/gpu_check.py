"""The planner against a GPU: real SDXL (or FLUX.1-dev) shapes at 1024 px, one LoRA Diffusion-DPO step, measured.

    --model flux-dev --quantize nf4: FLUX.1-dev over an NF4 base (QLoRA, bitsandbytes' CUDA kernels), the
    24 GiB recipe.

    bash benchmarks/gpu_check.sh                 # on a GPU machine (no hub access needed)
    .venv/bin/python benchmarks/gpu_check.py --tiny --device cpu --steps 1   # the same code on a small config

1. The plan: `trainer.plan` traces the step on fake CPU tensors from SDXL's published configs
   (`trainer.plan.configs`), as `prefpipe train --plan` does (the 12 GiB recipe's settings: LoRA rank 64 on
   attention, bf16 weights, gradient checkpointing, 1 pair, AdamW, cached latents, adapters-off reference).
2. The measurement: the same models built from the same configs with random weights (no hub, no download),
   moved to the GPU, and the same step (`trainer.plan.step.run_step`, the recipe's own `objective_step`)
   run for real under CUDA autocast. After one warm-up step, `torch.cuda.reset_peak_memory_stats()`, then
   `--steps` steps: `torch.cuda.max_memory_allocated()` is the measured peak (tensors only, as the plan:
   the CUDA context and the allocator's reserve are in `memory_reserved`, reported beside it).
3. Speed: the median step time against the plan's model FLOPs (no recomputation) gives the model FLOPs
   utilisation at the device's bf16 dense peak (`--peak-tflops`, 989 for H100/H200 SXM).

Writes benchmarks/results/gpu_check.json (`--out`). On CPU (`--device cpu`) the memory check uses
`torch.profiler`'s allocator records instead, as tests/test_plan.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = {  # the same block types, narrow (the CPU smoke run)
    "sdxl": {"unet": {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                      "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
                      "transformer_layers_per_block": [1, 2], "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                      "projection_class_embeddings_input_dim": 80}},
    "flux-dev": {"transformer": {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
                                 "num_attention_heads": 4, "joint_attention_dim": 128, "pooled_projection_dim": 64,
                                 "axes_dims_rope": [4, 6, 6]}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a narrow config of the model (CPU smoke run)")
    parser.add_argument("--model", choices=sorted(TINY), default="sdxl", help="whose published config")
    parser.add_argument("--quantize", choices=["none", "nf4"], default="none", help="--quantize of prefpipe train")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=None, help="default: 1024 (256 with --tiny)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from trainer.config import TrainConfig
    from trainer.plan.configs import write_config_folder
    from trainer.plan.result import plan_training
    from trainer.plan.step import build_models, run_step
    from trainer.plan.trace import StepTracer
    from trainer.recipes.dpo import objective_step

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --device cpu --tiny for the smoke run)")
    resolution = args.resolution or (256 if args.tiny else 1024)
    model = write_config_folder(args.model, Path(tempfile.mkdtemp(prefix="gpu-check-")) / args.model,
                                TINY[args.model] if args.tiny else None)
    cfg = TrainConfig(model=str(model), out=None, plan=True, resolution=resolution, lora_rank=args.lora_rank,
                      mixed_precision="bf16", gradient_checkpointing=not args.no_checkpointing,
                      batch_size=args.batch_size, quantize=args.quantize,
                      max_sequence_length=32 if args.tiny and args.model == "flux-dev" else None)

    t0 = time.perf_counter()
    plan = plan_training(cfg, objective_step)
    print(plan.format(), flush=True)
    plan_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    torch.manual_seed(0)
    tracer = StepTracer(memory=False)  # names phases only: counts nothing
    m = build_models(cfg, tracer, None)
    for module in (m.unet, m.ref_unet, m.vae, *m.text_encoders):
        if module is not None:
            module.to(device)
    build_seconds = time.perf_counter() - t0

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    optimizer = run_step(cfg, m, objective_step, tracer, device=device)  # warm-up: kernels, states, allocator
    sync()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            t = time.perf_counter()
            run_step(cfg, m, objective_step, tracer, device=device, optimizer=optimizer)
            sync()
            times.append(time.perf_counter() - t)
        measured = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        name = torch.cuda.get_device_name()
    else:
        from torch.profiler import ProfilerActivity, profile

        before = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                      for mod in (m.unet, m.ref_unet, m.vae, *m.text_encoders) if mod is not None
                      for t in [*mod.parameters(), *mod.buffers()]}.values())
        before += sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
        for _ in range(args.steps):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                t = time.perf_counter()
                run_step(cfg, m, objective_step, tracer, device=device, optimizer=optimizer)
                times.append(time.perf_counter() - t)
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        current = peak = 0
        for e in events:
            current += e.nbytes()
            peak = max(peak, current)
        measured, reserved, name = before + peak, None, "cpu"
    step = statistics.median(times)
    result = {
        "device": name, "torch": torch.__version__, "tiny": args.tiny, "settings": plan.settings,
        "planned_peak": plan.peak, "measured_peak": measured, "max_memory_reserved": reserved,
        "error": plan.peak / measured - 1, "planned_with_headroom": plan.needed(),
        "model_flops": plan.model_flops, "executed_flops": plan.total_flops,
        "step_seconds": times, "median_step_seconds": step,
        "mfu": plan.model_flops / step / (args.peak_tflops * 1e12), "peak_tflops": args.peak_tflops,
        "plan_seconds": plan_seconds, "build_seconds": build_seconds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    gib = 2**30
    print(f"planned {plan.peak / gib:.3f} GiB, measured {measured / gib:.3f} GiB "
          f"({100 * result['error']:+.1f}%)" + (f", reserved {reserved / gib:.3f} GiB" if reserved else "")
          + f"; step {1e3 * step:.1f} ms = MFU {100 * result['mfu']:.1f}% of {args.peak_tflops:g} TFLOP/s -> {out}")


if __name__ == "__main__":
    main()
