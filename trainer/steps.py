"""The optimizer, its schedule, the step plan, and the step loop every recipe runs.

`run_steps` takes the recipe's `micro_batch(m) -> (loss, metrics, epoch)` and does the rest: gradient
accumulation, a non-finite loss skipping the step in every process (and stopping the run after
`--max-nonfinite` in a row), clipping, the optimizer and schedule steps, metrics averaged over micro-batches
and processes into `metrics.jsonl` (and the tracker), and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

from prefpipe.core.errors import PrefpipeError
from trainer.checkpoints import Trainables
from trainer.config import TrainConfig
from trainer.run import Run, save_checkpoint


def make_optimizer(run: Run, unet, params: list, lr: float, max_steps: int, family: str):
    """AdamW or Adafactor over `params` and the lr schedule; the UNet and the optimizer prepared, and all three
    kept as `run.trainables`, what checkpoints save and `resume` loads (LoRA runs: the adapters only).

    Sharded (FSDP2, `run.sharded`): `accelerator.prepare` replaces every parameter of `unet` by its shard
    (the optimizer is switched to the shards, so its state is sharded too); `params`, the caller's list, is
    emptied first (a full weight is freed only once nothing holds it) and refilled with the shards.
    """
    cfg, accelerator = run.cfg, run.accelerator
    import torch
    from diffusers.optimization import get_scheduler

    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                              weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    if run.sharded:
        params.clear()
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if run.sharded:
        params.extend(p for p in unet.parameters() if p.requires_grad)
        plugin = accelerator.state.fsdp_plugin
        wrap = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
        run.echo(f"train: FSDP2 over {run.world} processes: UNet weights, gradients and {cfg.optimizer} state sharded "
                 f"(wrap: {getattr(wrap, '__name__', 'one unit')}; checkpoints: one safetensors file per process)")
    run.trainables = Trainables(unet, optimizer, lr_scheduler, family, full=cfg.full, sharded=run.sharded)
    return unet, optimizer, lr_scheduler


def step_plan(cfg: TrainConfig, order, n_pairs: int, world: int) -> tuple[int, int, float]:
    """(optimizer steps, effective batch = pairs per optimizer step, learning rate after --scale-lr)."""
    if order.per_epoch == 0:
        raise PrefpipeError(
            f"{n_pairs} training pairs are fewer than one batch across processes "
            f"(--batch-size {cfg.batch_size} x {world} processes); lower --batch-size"
        )
    accum = cfg.gradient_accumulation
    max_steps = cfg.max_steps or max(1, cfg.epochs * order.per_epoch // accum)
    effective_batch = cfg.batch_size * accum * world
    return max_steps, effective_batch, cfg.learning_rate * (effective_batch if cfg.scale_lr else 1)


def run_steps(run: Run, unet, params, optimizer, lr_scheduler, state: dict, max_steps: int, *, micro_batches: int,
              micro_batch: Callable, hint: str = "", on_start: Callable[[], None] | None = None):
    """Optimizer steps `state["step"]` .. `max_steps`: each sums the gradients of `micro_batches` calls
    ``micro_batch(m) -> (loss, metrics, epoch)`` (m counts this process's micro-batches from the run's start;
    each loss is divided by `micro_batches`), clips, steps, logs the mean metrics and checkpoints.
    Replicated (DDP), the gradients are synchronised once per step; sharded (FSDP2), after every micro-batch
    (reduce-scattered into the shards, so accumulation never holds a full-size gradient).

    A non-finite loss in any process skips the step in all of them (no update); `cfg.max_nonfinite`
    consecutive ones stop the run with a PrefpipeError (`hint` names the objective's knobs to lower).
    `on_start()`, if given, is called once before the first micro-batch (benchmarks measure from there).
    Returns (last logged metrics, wall seconds, final state).
    """
    import numpy as np
    import torch

    from prefpipe.core.progress import progress

    cfg, out, accelerator = run.cfg, run.out, run.accelerator
    main, device, sharded = accelerator.is_main_process, accelerator.device, run.sharded
    start_step, nonfinite_total, nonfinite_run = state["step"], state["nonfinite_total"], state["nonfinite_run"]
    bar = progress(total=max_steps, initial=start_step, desc="train", unit="step", enabled=main and not cfg.no_progress)
    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    epoch = 0
    if on_start is not None:
        on_start()
    t_start = time.perf_counter()
    for step in range(start_step, max_steps):
        totals: dict[str, Any] = {}
        finite = True
        for j in range(micro_batches):
            last_one = j == micro_batches - 1
            sync = contextlib.nullcontext() if last_one or sharded else accelerator.no_sync(unet)
            with sync:
                loss, metrics, epoch = micro_batch(step * micro_batches + j)
                finite = bool(accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)
                if not finite:  # every process sees the same flag: all skip together
                    break
                accelerator.backward(loss / micro_batches)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v.float() / micro_batches
        if finite:
            if cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # sharded gradients: their norm is a DTensor
                    grad_norm = grad_norm.full_tensor()
                totals["grad_norm"] = torch.as_tensor(grad_norm, dtype=torch.float32, device=device)
            optimizer.step()
            nonfinite_run = 0
        else:
            nonfinite_total += 1
            nonfinite_run += 1
        optimizer.zero_grad(set_to_none=True)
        lr_now = lr_scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # a skipped first step is not the ordering mistake torch warns about
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            lr_scheduler.step()

        # metrics: mean over micro-batches (above) and over processes (here); written by the main process
        if finite:
            names = sorted(totals)
            vec = torch.stack([torch.as_tensor(totals[k], device=device).float().reshape(()) for k in names])
            vec = accelerator.gather(vec.reshape(1, -1)).mean(dim=0).tolist()
            window.append(dict(zip(names, vec)))
        done = step + 1
        if done % cfg.log_every == 0 or done == max_steps or not finite:
            record = {"step": done, "epoch": epoch}
            if window:
                record.update({k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]})
                last = {k: v for k, v in record.items() if isinstance(v, float)}
            record.update(lr=lr_now, nonfinite_skipped=nonfinite_total)
            if not finite:
                record["skipped"] = True
            window = []
            if main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=done)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "implicit_acc") if k in record})
        if not finite and nonfinite_run >= cfg.max_nonfinite:
            bar.close()
            raise PrefpipeError(
                f"stopped at step {step + 1}: {nonfinite_run} consecutive steps had a non-finite loss "
                f"({nonfinite_total} in all, each skipped). Lower {hint}"
                f"--learning-rate (now {lr_scheduler.base_lrs[0]:g}), or train in higher precision (--mixed-precision bf16 or no "
                f"instead of fp16, --vae-dtype fp32 or an fp16-fix --vae)."
            )
        bar.update(1)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == max_steps:
            save_checkpoint(run, done, nonfinite_total, nonfinite_run)
    bar.close()
    state = {"step": max_steps, "nonfinite_total": nonfinite_total, "nonfinite_run": nonfinite_run}
    return last, time.perf_counter() - t_start, state
