"""What every training recipe shares about a run (diffusers' `training_utils` role): its accelerator, its
folder, checkpoints and exact resume, the options a resume may change, and the closing summary.

A recipe (`trainer/recipes/`) reads top to bottom with these:

    run = open_run(cfg)                       accelerator (one process or many), checkpoint to resume, checks
    ... data, UNet (trainer/unet.py), optimizer (trainer/steps.py) ...
    state = resume(run)                       weights, optimizer, schedule and RNG from the checkpoint
    start_run_folder(run, resolved, step)     train_config.json, metrics.jsonl cut back to the checkpoint
    ... run_steps (trainer/steps.py) ...
    exported = finish_run(run, unet, family)  the LoRA file or RUN/unet, curves.png
    run_summary(...)                          the summary dict, its closing line and RUN/README.md (model card)

Run folder: `train_config.json` (options + derived numbers), `metrics.jsonl` (one line per logged step),
`checkpoint-STEP/` (safetensors and JSON only, `trainer/checkpoints.py`: weights (LoRA runs: the adapters in
the export format), optimizer, schedule, RNG; `trainer_state.json`, written last, marks it complete; a
checkpoint holding any other file is refused before anything is read), the exported weights, `curves.png` and
`README.md`, the model card (`trainer/export.py`; `prefpipe eval` adds its results and samples to it), so the
folder uploads to the hub as it is. `--report-to` also sends the metrics to TensorBoard (`RUN/logs`) and/or
Weights & Biases (`RUN/logs/wandb`) through accelerate's trackers; `metrics.jsonl` is the source of truth.

Sharding (`--full` only): when the launcher asks for FSDP (`accelerate launch --use_fsdp --fsdp_version 2`, or
an `accelerate config` with FSDP version 2), the Accelerator picks the plugin up from the environment and
`accelerator.prepare` shards the UNet's parameters, gradients and AdamW state over the processes (FSDP2,
`fully_shard`); the frozen reference is sharded the same way (`trainer.unet.place_reference`). Checkpoints
then hold one file of weight rows and one of AdamW moment rows per process (`model-R-of-N.safetensors`,
`optimizer-R-of-N.safetensors`, whatever the launcher's `fsdp_state_dict_type`; loadable by any number of
processes), and `RUN/unet` is the full state dict gathered into the main process. No flag of ours: the
launcher decides. LoRA runs, FSDP version 1 and DeepSpeed are refused (:func:`check_sharding`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import write_atomic
from trainer import checkpoints
from trainer.checkpoints import TRAIN_STATE, Trainables
from trainer.config import RESUMABLE_CHANGES, TrainConfig


@dataclass
class Run:
    """One training run: its options, folder, accelerator, tracker, and the checkpoint it resumes from."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    trackers: list[str]  # --report-to's accelerate trackers (none: [])
    checkpoint: Path | None
    trainables: Trainables | None = None  # set by trainer.steps.make_optimizer: what checkpoints save and load

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

    @property
    def sharded(self) -> bool:
        """The UNet (and its reference) are sharded over the processes by FSDP2 (see the module docstring)."""
        return sharding(self.accelerator) is not None

    def echo(self, msg: str) -> None:
        """Print on the main process only (stderr)."""
        if self.main:
            click.echo(msg, err=True)


def open_run(cfg: TrainConfig) -> Run:
    """The accelerator, the checkpoint to resume, the --report-to trackers; refuses a folder holding another run
    (every process checks, so all stop together on a bad --out/--resume)."""
    out = Path(cfg.out)
    accelerator, trackers = make_accelerator(cfg, out)
    run = Run(cfg, out, accelerator, trackers, None)
    check_sharding(cfg, accelerator, run.echo)
    run.checkpoint = find_checkpoint(cfg, out, run.echo)
    check_run_folder(cfg, out, run.checkpoint)
    init_trackers(run)  # before any model is read: a tracker that cannot start stops the run at once
    return run


def weight_dtype(cfg: TrainConfig):
    """The dtype frozen weights are stored in (and autocast computes in): --mixed-precision."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]


def make_accelerator(cfg: TrainConfig, out: Path):
    """The accelerator of a run (CPU processes when there is no GPU), and the trackers in use (--report-to)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = report_trackers(cfg.report_to)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # CPU processes under a launcher form one job only when asked
        mixed_precision=cfg.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        log_with=trackers or None,
    )
    return accelerator, trackers


# --report-to -> accelerate's trackers, and the packages each needs (either one of a tuple)
REPORT_TO = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def report_trackers(report_to: str) -> list[str]:
    """The accelerate trackers `--report-to` names, each checked to be installed (else one message naming the
    option and the package to install)."""
    if report_to not in REPORT_TO:
        raise PrefpipeError(f"--report-to {report_to!r}: choose one of {', '.join(REPORT_TO)}")
    for tracker in REPORT_TO[report_to]:
        if not any(importlib.util.find_spec(m) for m in TRACKER_PACKAGES[tracker]):
            raise PrefpipeError(f"--report-to {report_to}: the {tracker} package is not installed "
                                f"(pip install 'prefpipe[tracking]', or pip install {tracker})")
    return list(REPORT_TO[report_to])


def init_trackers(run: Run) -> None:
    """Start --report-to's trackers (main process): the run's options as their config; TensorBoard's events in
    RUN/logs/prefpipe-train, W&B's files in RUN/logs/wandb (its own WANDB_MODE decides online or offline)."""
    if not run.trackers:
        return
    logs = run.out / "logs"
    init_kwargs = {}
    if "wandb" in run.trackers:
        if run.main:
            logs.mkdir(parents=True, exist_ok=True)
        init_kwargs["wandb"] = {"dir": str(logs), "name": run.out.name}
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner and sync hints would fill the log
    try:
        run.accelerator.init_trackers("prefpipe-train", config={k: str(v) for k, v in run.cfg.to_json().items()},
                                      init_kwargs=init_kwargs)
    except Exception as e:  # wandb without a login raises its own UsageError / CommError
        if "wandb" not in run.trackers or not type(e).__module__.startswith("wandb"):
            raise
        raise PrefpipeError(f"--report-to {run.cfg.report_to}: Weights & Biases could not start ({e}); log in with "
                            "`wandb login`, or set WANDB_MODE=offline to keep the run in RUN/logs/wandb") from None


def sharding(accelerator) -> str | None:
    """The sharding in use: `fsdp2` when the launcher's FSDP plugin is (accelerate's FSDP2 path), else None."""
    return "fsdp2" if getattr(accelerator, "is_fsdp2", False) else None


LAUNCH_FSDP = "accelerate launch --use_fsdp --fsdp_version 2 ... (or `accelerate config`: FSDP, version 2)"


def check_sharding(cfg: TrainConfig, accelerator, echo) -> None:
    """What the launcher asked for, against what a run can do: FSDP2 shards `--full` runs with AdamW; a LoRA
    run (under 1% of the weights train) stays replicated (DDP, `--multi_gpu`). FSDP version 1 (it needs the
    optimizer built after wrapping), Adafactor (transformers' keeps plain-tensor state) and DeepSpeed (its
    engine owns the step, clipping and checkpoints) are refused. Without a wrap policy from the launcher, FSDP2 shards the UNet block by block (the model's
    `_no_split_modules`, as `accelerate config` proposes) instead of as one unit, which would all-gather the
    whole fp32 UNet at every forward. With --mixed-precision, weights are all-gathered in that dtype but
    gradients reduce-scattered in float32 (accelerate's default reduces in bf16/fp16). accelerate shards on
    GPUs only: CPU processes launched with --use_fsdp run replicated, which is said once."""
    import os

    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise PrefpipeError(f"DeepSpeed is not supported by `prefpipe train`; shard a --full run with FSDP2: {LAUNCH_FSDP}")
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise PrefpipeError(f"FSDP version {plugin.fsdp_version}: `prefpipe train` shards with FSDP2: {LAUNCH_FSDP}")
        if not cfg.full:
            raise PrefpipeError(
                "the launcher asks for FSDP, which shards --full runs; a LoRA run trains under 1% of the UNet's "
                "weights and is replicated instead: launch it with --multi_gpu (DDP), or pass --full"
            )
        if cfg.optimizer == "adafactor":
            raise PrefpipeError(
                "--optimizer adafactor: transformers' Adafactor builds its state as plain tensors, which cannot update "
                "FSDP's sharded weights; use adamw (its state is sharded too: 1/N per process)"
            )
        if plugin.auto_wrap_policy is None and "FSDP_AUTO_WRAP_POLICY" not in os.environ:
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            plugin.auto_wrap_policy = transformer_auto_wrap_policy  # the model's _no_split_modules, one unit each
        policy = plugin.mixed_precision_policy
        if policy is not None and policy.param_dtype is not None and policy.reduce_dtype == policy.param_dtype:
            import dataclasses

            import torch

            # accelerate reduces in the compute dtype; replicated runs all-reduce float32 gradients: so do we
            plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        echo("train: warning: the launcher asked for FSDP, but accelerate shards on GPUs only: these CPU processes "
             "each hold the whole model (DDP)")


def list_checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def find_checkpoint(cfg: TrainConfig, out: Path, echo) -> Path | None:
    """The checkpoint --resume names (`latest`: the last complete one in `out`), checked to hold safetensors
    and JSON only before any model or data is loaded."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        found = [p for p in list_checkpoints(out) if (p / TRAIN_STATE).exists()]
        if not found:
            echo(f"train: --resume latest: no checkpoint in {out} yet, starting from step 0")
            return None
        path = found[-1]
    else:
        path = Path(cfg.resume)
        if not (path / TRAIN_STATE).exists():
            raise PrefpipeError(f"--resume {cfg.resume}: not a finished checkpoint folder (no {TRAIN_STATE})")
    checkpoints.check_files(path)
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


def save_checkpoint(run: Run, step: int, nonfinite_total: int, nonfinite_run: int) -> None:
    """`RUN/checkpoint-STEP`: every process saves its part (`trainer/checkpoints.py`); `trainer_state.json`,
    written last, marks it complete. A folder left by a killed run at the same step is written afresh."""
    accelerator, cfg, out = run.accelerator, run.cfg, run.out
    if run.trainables is None:
        raise RuntimeError("save_checkpoint before make_optimizer")
    folder = out / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    checkpoints.save_state(folder, run.trainables, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "nonfinite_total": nonfinite_total, "nonfinite_run": nonfinite_run,
                 "processes": accelerator.num_processes, "sharding": sharding(accelerator)}
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
    """Load the run's checkpoint (weights, optimizer, schedule, RNG) into what `make_optimizer` built, from
    safetensors and JSON only; the loop's counters to continue from."""
    state = {"step": 0, "nonfinite_total": 0, "nonfinite_run": 0}
    if run.checkpoint is None:
        return state
    checkpoints.check_files(run.checkpoint)
    saved = checkpoints.read_json(run.checkpoint, TRAIN_STATE)
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), int) for k in state):
        raise PrefpipeError(f"--resume: {run.checkpoint / TRAIN_STATE} lacks the step counters prefpipe writes")
    written, now = saved.get("sharding"), sharding(run.accelerator)
    if written != now:
        raise PrefpipeError(
            f"--resume: {run.checkpoint} was written {f'sharded ({written})' if written else 'unsharded'} and this run is "
            f"{f'sharded ({now})' if now else 'unsharded'}: resume it launched as it was written "
            f"({LAUNCH_FSDP if written else 'without --use_fsdp'})"
        )
    if run.trainables is None:
        raise RuntimeError("resume before make_optimizer")
    checkpoints.load_state(run.checkpoint, run.trainables, run.accelerator)
    state.update({k: saved[k] for k in state})
    if saved.get("processes", run.world) != run.world:
        run.echo(f"train: warning: {run.checkpoint} was written by {saved['processes']} processes, this run has "
                 f"{run.world}: the effective batch and so the data order from here on differ from an uninterrupted run")
    return state


def start_run_folder(run: Run, resolved: dict, start_step: int) -> None:
    """train_config.json (options + the numbers derived from them), metrics cut back to the checkpoint."""
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_atomic(run.out / "train_config.json", json.dumps({**run.cfg.to_json(), "resolved": resolved}, indent=2))
        truncate_metrics(run.out / "metrics.jsonl", start_step)


def finish_run(run: Run, unet, family: str) -> Path | None:
    """Export what diffusers loads (the LoRA file, or RUN/unet) and plot the curves; ends the trackers.

    Returns when the export is on disk for every process. The process group stays up (a caller such as the
    D3PO rounds trains again in the same processes); `prefpipe train` ends it when the command is done.
    """
    from trainer import export
    from trainer.curves import plot_training_curves, read_metrics

    run.accelerator.wait_for_everyone()
    exported = None
    # sharded: every process takes part in gathering the full state dict, which only the main process receives
    gathered = run.accelerator.get_state_dict(unet) if run.sharded else None
    if run.main:
        trained = run.accelerator.unwrap_model(unet)
        exported = (export.save_full_unet(trained, run.out, gathered) if run.cfg.full
                    else export.save_lora(trained, run.out, family))
        metrics = run.out / "metrics.jsonl"
        if metrics.exists():
            plot_training_curves({"": read_metrics(metrics)}, run.out / "curves.png")
    for tracker in run.accelerator.trackers:
        tracker.finish()
    run.accelerator.wait_for_everyone()
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
    if run.main:
        write_training_card(run, summary)
    shown = ", ".join(f"{label} {last.get(key, float('nan')):{fmt}}" for key, label, fmt in metrics) + "; " if last else ""
    run.echo(
        f"train: {steps_run} steps in {wall:.1f} s ({summary['steps_per_s']:.2f} steps/s); {shown}"
        f"{state['nonfinite_total']} non-finite steps skipped; wrote {exported}"
    )
    return summary


def write_training_card(run: Run, summary: dict[str, Any]) -> Path:
    """RUN/README.md, the run's model card (`trainer/export.py`), from its options, train_config.json's derived
    numbers and the summary. A card written afresh has no eval: the samples of an eval of older weights go."""
    from trainer import export

    cfg = run.cfg
    resolved = json.loads((run.out / "train_config.json").read_text()).get("resolved", {})
    paths = [Path(cfg.workdir) / "pairs" / s for s in cfg.source] + [Path(p) for p in cfg.pairs]
    paths += [Path(p) for p in cfg.feedback] + ([Path(cfg.images)] if cfg.images else [])  # and the images' dataset
    facts = export.model_card_facts(cfg, summary, resolved, paths)
    facts["data"]["sources"] += [{"path": f, "stage": "d3po labels (JSON)", "source": "human", "scorer": "none",
                                  "rows": "-", "digest": "-"} for f in cfg.labels]
    shutil.rmtree(run.out / export.SAMPLES, ignore_errors=True)
    return export.write_model_card(run.out, facts)


def check_resumed_data(run: Run, digest: str) -> None:
    """A resumed run goes on with the data it started with: `digest` (the content digest of its input,
    recorded as `resolved.data_digest` in train_config.json) must be the one recorded when it started."""
    saved = run.out / "train_config.json"
    if run.checkpoint is None or not saved.exists():
        return
    old = json.loads(saved.read_text()).get("resolved", {}).get("data_digest")
    if old is not None and old != digest:
        raise PrefpipeError(
            f"--resume: the training data of {run.out} changed since the run started (its content digest was {old}, "
            f"now {digest}): resume with the same data, or start a new run with another --out"
        )
