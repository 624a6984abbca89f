"""What every training recipe shares about a run (diffusers' `training_utils` role): its accelerator, its
folder, checkpoints and exact resume, the options a resume may change, and the closing summary.

A recipe (`trainer/recipes/`) reads top to bottom with these:

    run = open_run(cfg)                       accelerator (one process or many), checkpoint to resume, checks
    ... data, UNet (trainer/unet.py), optimizer (trainer/steps.py) ...
    state = resume(run)                       weights, optimizer, schedule and RNG from the checkpoint
    start_run_folder(run, resolved, step)     train_config.json, metrics.jsonl cut back to the checkpoint
    ... run_steps (trainer/steps.py) ...
    exported = finish_run(run, unet, family)  the LoRA file or RUN/unet, curves.png
    run_summary(...)                          the summary dict and its closing line

Run folder: `train_config.json` (options + derived numbers), `metrics.jsonl` (one line per logged step),
`checkpoint-STEP/` (accelerate state; LoRA runs hold the adapter weights in the export format, and
`trainer_state.json`, written last, marks a checkpoint complete), the exported weights and `curves.png`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from prefpipe.core.dataset import write_atomic
from prefpipe.core.errors import PrefpipeError
from trainer.config import RESUMABLE_CHANGES, TrainConfig

TRAIN_STATE = "trainer_state.json"


@dataclass
class Run:
    """One training run: its options, folder, accelerator, tracker, and the checkpoint it resumes from."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    trackers: str | None
    checkpoint: Path | None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self):
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def echo(self, msg: str) -> None:
        """Print on the main process only (stderr)."""
        if self.main:
            click.echo(msg, err=True)


def open_run(cfg: TrainConfig) -> Run:
    """The accelerator, and the checkpoint to resume; refuses a folder holding another run (every process
    checks, so all stop together on a bad --out/--resume)."""
    out = Path(cfg.out)
    accelerator, trackers = make_accelerator(cfg, out)
    run = Run(cfg, out, accelerator, trackers, None)
    run.checkpoint = find_checkpoint(cfg, out, run.echo)
    check_run_folder(cfg, out, run.checkpoint)
    return run


def weight_dtype(cfg: TrainConfig):
    """The dtype frozen weights are stored in (and autocast computes in): --mixed-precision."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]


def make_accelerator(cfg: TrainConfig, out: Path):
    """The accelerator of a run (CPU processes when there is no GPU), and the tracker in use (or None)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = "tensorboard" if any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")) else None
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # CPU processes under a launcher form one job only when asked
        mixed_precision=cfg.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        log_with=trackers,
    )
    return accelerator, trackers


def list_checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def find_checkpoint(cfg: TrainConfig, out: Path, echo) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        found = [p for p in list_checkpoints(out) if (p / TRAIN_STATE).exists()]
        if not found:
            echo(f"train: --resume latest: no checkpoint in {out} yet, starting from step 0")
            return None
        return found[-1]
    path = Path(cfg.resume)
    if not (path / TRAIN_STATE).exists():
        raise PrefpipeError(f"--resume {cfg.resume}: not a finished checkpoint folder (no {TRAIN_STATE})")
    return path


def check_run_folder(cfg: TrainConfig, out: Path, checkpoint: Path | None) -> None:
    """Refuse to overwrite another run, and to resume with options that change what a step computes."""
    saved = out / "train_config.json"
    if not saved.exists():
        return
    if cfg.resume is None:
        raise PrefpipeError(f"--out {out} already holds a run; pass --resume latest to continue it, or choose a new --out")
    old = {**TrainConfig().to_json(), **json.loads(saved.read_text())}  # options added since count as defaults
    now = cfg.to_json()
    diffs = [f"{k}: run has {old.get(k)!r}, this call asks {now[k]!r}" for k in now
             if k not in RESUMABLE_CHANGES and old.get(k) != now[k]]
    if diffs and checkpoint is not None:
        raise PrefpipeError(
            f"--resume: {out} was trained with other options, and mixing them would give a run that is neither:\n  "
            + "\n  ".join(diffs)
        )


def register_lora_checkpoint_hooks(accelerator, family: str) -> None:
    """Checkpoints of LoRA runs hold the adapter weights only (in the export format), not the whole UNet."""
    from trainer import export

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            export.save_lora(accelerator.unwrap_model(models[0]), output_dir, family)
        weights.pop()

    def load_hook(models, input_dir):
        export.load_lora(accelerator.unwrap_model(models.pop()), input_dir, family)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(run: Run, step: int, nonfinite_total: int, nonfinite_run: int) -> None:
    """`RUN/checkpoint-STEP`: every process saves its state; `trainer_state.json`, written last, marks it complete."""
    accelerator, cfg, out = run.accelerator, run.cfg, run.out
    folder = out / f"checkpoint-{step}"
    accelerator.save_state(str(folder))  # every process: each saves its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "nonfinite_total": nonfinite_total, "nonfinite_run": nonfinite_run,
                 "processes": accelerator.num_processes}
        write_atomic(folder / TRAIN_STATE, json.dumps(state))  # written last: marks the checkpoint complete
        if cfg.checkpoints_keep:
            for old in list_checkpoints(out)[: -cfg.checkpoints_keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines written after the checkpoint (a killed run may have logged past it)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))


def resume(run: Run) -> dict[str, int]:
    """Load the run's checkpoint (weights, optimizer, schedule, RNG); the loop's counters to continue from."""
    state = {"step": 0, "nonfinite_total": 0, "nonfinite_run": 0}
    if run.checkpoint is None:
        return state
    run.accelerator.load_state(str(run.checkpoint))
    saved = json.loads((run.checkpoint / TRAIN_STATE).read_text())
    state.update({k: saved[k] for k in state})
    if saved.get("processes", run.world) != run.world:
        run.echo(f"train: warning: {run.checkpoint} was written by {saved['processes']} processes, this run has "
                 f"{run.world}: the effective batch and so the data order from here on differ from an uninterrupted run")
    return state


def start_run_folder(run: Run, resolved: dict, start_step: int) -> None:
    """train_config.json (options + the numbers derived from them), metrics cut back to the checkpoint, trackers."""
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_atomic(run.out / "train_config.json", json.dumps({**run.cfg.to_json(), "resolved": resolved}, indent=2))
        truncate_metrics(run.out / "metrics.jsonl", start_step)
    if run.trackers:
        run.accelerator.init_trackers("prefpipe-train", config={k: str(v) for k, v in run.cfg.to_json().items()})


def finish_run(run: Run, unet, family: str) -> Path | None:
    """Export what diffusers loads (the LoRA file, or RUN/unet) and plot the curves; ends the trackers."""
    from trainer import export
    from trainer.curves import plot_training_curves, read_metrics

    run.accelerator.wait_for_everyone()
    exported = None
    if run.main:
        trained = run.accelerator.unwrap_model(unet)
        exported = export.save_full_unet(trained, run.out) if run.cfg.full else export.save_lora(trained, run.out, family)
        metrics = run.out / "metrics.jsonl"
        if metrics.exists():
            plot_training_curves({"": read_metrics(metrics)}, run.out / "curves.png")
    run.accelerator.end_training()
    return exported


SUMMARY_METRICS = (("loss", "loss", ".4g"), ("implicit_acc", "implicit acc", ".3f"))


def run_summary(run: Run, max_steps: int, start_step: int, wall: float, last: dict, data_counts, state: dict, exported,
                metrics=SUMMARY_METRICS) -> dict[str, Any]:
    """The summary `train` returns, and its one-line report of the last step's `metrics` (key, label, format)."""
    steps_run = max_steps - start_step
    summary = {
        "steps": max_steps, "steps_run": steps_run, "wall_s": wall, "steps_per_s": steps_run / wall if wall else 0.0,
        "last": last, "data": data_counts, "nonfinite_skipped": state["nonfinite_total"], "exported": str(exported),
        "rank": run.rank, "world": run.world,
    }
    shown = ", ".join(f"{label} {last.get(key, float('nan')):{fmt}}" for key, label, fmt in metrics) + "; " if last else ""
    run.echo(
        f"train: {steps_run} steps in {wall:.1f} s ({summary['steps_per_s']:.2f} steps/s); {shown}"
        f"{state['nonfinite_total']} non-finite steps skipped; wrote {exported}"
    )
    return summary
