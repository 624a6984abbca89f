"""The memory planner's tables for real SD 1.5 and SDXL, from their published configs (no weights, no GPU).

    .venv/bin/python benchmarks/plan.py            # everything below: about 15-25 min of one core
    .venv/bin/python benchmarks/plan.py --sections recipe,layouts   # a part (each section: 1-15 min)

Writes config-only pipeline folders (`trainer.plan.configs`) under work/plan-models/, then runs the planner
(`trainer.plan`: one training step traced on fake tensors) for:

1. **budgets**: what `--max-memory` picks at 12, 16, 24, 40 and 80 GiB, for SDXL at 1024 px and SD 1.5 at
   512 px, LoRA (rank 64 on attention) and full fine-tuning, starting from 4 pairs per step, bf16, AdamW,
   no gradient checkpointing, cached latents and text embeddings. The same search as `prefpipe train --plan
   --max-memory 12GiB,16GiB,...`.
2. **the 12 GiB SDXL LoRA recipe**: its per-component plan and the exact command.
3. **layouts by FLOPs** (issue 23, item 5), SDXL at 1024 px, 1 pair: ours (cached latents and text
   embeddings; LoRA's reference = adapters off) against the reference trainers' (the VAE and both text
   encoders run at every step; a second, frozen UNet as the reference), for LoRA and full fine-tuning.
   The LoRA step's model FLOPs (without checkpointing's recomputation) are its floor at a GPU's peak.
4. **shared work between policy and reference**: the FLOPs of the UNet's modules that run before the first
   LoRA layer (identical for the policy and the adapters-off reference, so computable once), counted with
   `torch.utils.flop_counter.FlopCounterMode` per module on a fake-tensor forward.

Writes benchmarks/results/plan.json and benchmarks/results/plan.md (the README's tables are copied from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUDGETS = "12GiB,16GiB,24GiB,40GiB,80GiB"
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def base_config(model: Path, resolution: int, **changes):
    from trainer.config import TrainConfig

    cfg = TrainConfig(model=str(model), out=None, plan=True, resolution=resolution, lora_rank=64,
                      mixed_precision="bf16", batch_size=4, optimizer="adamw")
    return dataclasses.replace(cfg, **changes)


BUDGET_RUNS = ("sdxl-lora", "sdxl-full", "sd15-lora", "sd15-full")


def budgets_section(models: dict[str, Path], results: dict, md: list[str], runs: tuple[str, ...] = BUDGET_RUNS) -> None:
    from trainer.plan.fit import Search, budget_rows, format_budget_rows, parse_memory
    from trainer.plan.result import describe
    from trainer.recipes.dpo import objective_step

    md.append("## What `--max-memory` picks\n")
    for kind, resolution in (("sdxl", 1024), ("sd15", 512)):
        for mode in ("lora", "full"):
            if f"{kind}-{mode}" not in runs:
                continue
            cfg = base_config(models[kind], resolution, full=mode == "full")
            search = Search(cfg, objective_step, log)
            t0 = time.perf_counter()
            rows = budget_rows(search, parse_memory(BUDGETS))
            head = describe(search.plan(search.options[0]).settings)
            results["budgets"][f"{kind}-{mode}"] = {"configured": head, "rows": rows, "traces": len(search.plans),
                                                    "seconds": time.perf_counter() - t0}
            md += [f"**{kind.upper()} at {resolution} px, {'LoRA rank 64 (attention)' if mode == 'lora' else 'full UNet'}**"
                   f" (configured: {head})\n", format_budget_rows(rows), ""]
            log(md[-2])


def recipe_section(models: dict[str, Path], results: dict, md: list[str]) -> None:
    """The 12 GiB recipe: exactly the command's settings, planned, with AdamW and with Adafactor."""
    from trainer.plan.fit import fit
    from trainer.plan.result import gib
    from trainer.recipes.dpo import objective_step

    command = ("prefpipe train --model stabilityai/stable-diffusion-xl-base-1.0 --source ai --workdir WORKDIR "
               "--out RUN --resolution 1024 --lora-rank 64 --lora-targets attn --mixed-precision bf16 "
               "--gradient-checkpointing --batch-size 1 --gradient-accumulation 4 --max-memory 12GiB")
    md += ["## The 12 GiB SDXL LoRA recipe\n", "```", command, "```", ""]
    results["recipe_12gib"] = {"command": command}
    for optimizer in ("adamw", "adafactor"):
        cfg = base_config(models["sdxl"], 1024, batch_size=1, gradient_accumulation=4, gradient_checkpointing=True,
                          optimizer=optimizer, max_memory="12GiB")
        chosen, plan = fit(cfg, objective_step, log)
        results["recipe_12gib"][optimizer] = {"changed": chosen != cfg, "plan": plan.to_json()}
        if optimizer == "adamw":
            md += ["```", plan.format(), "```", ""]
        else:
            md.append(f"With `--optimizer adafactor` (the lean optimizer: a factored second moment, no first moment) "
                      f"the peak is {gib(plan.peak)} (optimizer states {gib(plan.category('optimizer states'))}).\n")
        log(md[-1])


def layouts_section(models: dict[str, Path], results: dict, md: list[str]) -> None:
    from trainer.plan.result import gib, plan_training
    from trainer.recipes.dpo import objective_step

    md += ["## Our layout against the reference trainers' (SDXL, 1024 px, 1 pair, bf16, checkpointing)\n",
           "| fine-tuning | layout | model FLOPs / step | executed FLOPs | at 989 TFLOP/s | peak (tensors) |",
           "|---|---|---:|---:|---:|---:|"]
    rows = {}
    for mode in ("lora", "full"):
        for layout, changes in (("ours", {}), ("reference trainers'", {"no_cache": True, "reference_copy": True})):
            cfg = base_config(models["sdxl"], 1024, batch_size=1, gradient_checkpointing=True,
                              full=mode == "full", **changes)
            plan = plan_training(cfg, objective_step)
            rows[f"{mode} {layout}"] = plan.to_json()
            md.append(f"| {mode} | {layout} | {plan.model_flops:.3e} | {plan.total_flops:.3e} | "
                      f"{1e3 * plan.model_flops / (PEAK_TFLOPS * 1e12):.1f} ms | {gib(plan.peak)} |")
            log(md[-1])
    for mode in ("lora", "full"):
        ours, ref = rows[f"{mode} ours"], rows[f"{mode} reference trainers'"]
        rows[f"{mode} ratio"] = ref["model_flops"] / ours["model_flops"]
        md.append(f"\n{mode}: the reference trainers' layout does {rows[f'{mode} ratio']:.2f}x our model FLOPs per step "
                  f"(VAE encode {ref['flops'].get('vae', 0):.2e}, text encoders {ref['flops'].get('text encoders', 0):.2e}).")
    floor = rows["lora ours"]["model_flops"]
    md.append(f"\nFLOPs floor of an SDXL-1024 LoRA Diffusion-DPO step (1 pair: policy forward and backward, reference "
              f"forward; no recomputation): {floor:.3e} FLOPs = {1e3 * floor / (PEAK_TFLOPS * 1e12):.1f} ms at "
              f"{PEAK_TFLOPS:g} TFLOP/s bf16. With checkpointing's recomputation it executes "
              f"{rows['lora ours']['total_flops']:.3e}.\n")
    results["layouts"] = rows


def shared_prefix_section(models: dict[str, Path], results: dict, md: list[str]) -> None:
    """FLOPs of the modules before the first LoRA layer (attention targets), per module, by FlopCounterMode."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.plan.models import batch_shapes, build_unet, materialize
    from trainer.plan.trace import cpu_attention_formulas

    shapes = batch_shapes(str(models["sdxl"]), None, 1024)
    unet = build_unet(str(models["sdxl"])).to(torch.bfloat16)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    materialize(unet, fake)
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas())
    with fake, torch.no_grad(), counter:
        x = torch.zeros(2, *shapes.latent, dtype=torch.bfloat16)
        text = torch.zeros(2, *shapes.text, dtype=torch.bfloat16)
        cond = {"text_embeds": torch.zeros(2, shapes.pooled, dtype=torch.bfloat16),
                "time_ids": torch.zeros(2, 6, dtype=torch.bfloat16)}
        unet(x, torch.zeros(2, dtype=torch.long), text, added_cond_kwargs=cond)
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())

    def flops(name: str) -> int:
        return sum(counts.get(f"UNet2DConditionModel.{name}", {}).values())

    # with attention targets, everything up to the first transformer block sees the same input and weights
    prefix = ["conv_in", "time_embedding", "add_embedding", "down_blocks.0", "down_blocks.1.resnets.0"]
    shared = sum(flops(n) for n in prefix)
    results["shared_prefix"] = {"modules": prefix, "flops": shared, "unet_forward_flops": total,
                                "share": shared / total}
    md.append(f"Shared work (LoRA on attention): the modules before the first adapted layer ({', '.join(prefix)}) "
              f"take {shared:.3e} of a {total:.3e}-FLOP UNet forward on 2 latents at 1024 px "
              f"({100 * shared / total:.1f}%; FlopCounterMode, per module).\n")
    log(md[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="shared,recipe,layouts,budgets",
                        help="comma list of shared, recipe, layouts, budgets (a subset writes plan-SECTIONS.json/.md)")
    parser.add_argument("--budget-runs", default=",".join(BUDGET_RUNS),
                        help=f"the budgets section's tables, a comma list of {', '.join(BUDGET_RUNS)}")
    parser.add_argument("--models", default=str(REPO / "work" / "plan-models"), help="where to write the config folders")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from trainer.plan.configs import write_config_folder

    models = {kind: write_config_folder(kind, Path(args.models) / kind) for kind in ("sd15", "sdxl")}
    results: dict = {"budgets": {}, "torch": torch.__version__}
    md = ["# The memory planner on SD 1.5 and SDXL (benchmarks/plan.py)\n",
          "Planned on fake tensors from the published configs (`trainer/plan/`); peaks count tensors only: "
          "a budget fits if peak x 1.1 + 1 GiB <= budget (fragmentation, CUDA context, workspaces).\n"]
    t0 = time.perf_counter()
    sections = {"shared": shared_prefix_section, "recipe": recipe_section, "layouts": layouts_section,
                "budgets": budgets_section}
    chosen = args.sections.split(",")
    if set(chosen) - set(sections):
        parser.error(f"--sections: choose from {', '.join(sections)}")
    runs = tuple(args.budget_runs.split(","))
    if set(runs) - set(BUDGET_RUNS):
        parser.error(f"--budget-runs: choose from {', '.join(BUDGET_RUNS)}")
    for name in chosen:
        if name == "budgets":
            budgets_section(models, results, md, runs)
        else:
            sections[name](models, results, md)
    results["seconds"] = time.perf_counter() - t0
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "plan" if set(chosen) == set(sections) and runs == BUDGET_RUNS else "plan-" + "-".join(chosen + list(runs))
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
