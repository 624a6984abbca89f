"""The training recipe: pairs -> a LoRA (or a full UNet) trained on a preference objective.

Reads top to bottom (torchtune style): check options -> accelerator -> models -> data (cache) -> UNet and
reference -> optimizer -> resume -> print the plan -> steps -> export. No hooks beyond accelerate's own.

Supports: SD 1.x/2.x and SDXL; epsilon and v-prediction; every denoising objective of
`trainer/losses.py` by name (`dpo` default, `hinge`, `ipo`, `sft`), the loop learning from the
`Objective` entry whether it needs the loser and the reference; LoRA (reference = the same UNet with its
adapters disabled, no second copy) or full fine-tuning (reference = a frozen copy in the weight dtype);
mixed precision, gradient checkpointing, AdamW or Adafactor, warm-up and schedule, gradient accumulation;
one process or many (`accelerate launch`, GPUs or CPU processes); checkpoints and exact resume;
`--init-from RUN` (start from an earlier run's weights; the reference stays the base model).

`--objective d3po` (kind "log_prob": recorded sampler trajectories, not pairs of images) is handed over
to `trainer/d3po.py`, which reuses the parts below `train` (accelerator, UNet and reference, optimizer,
resume, the step loop, export) and brings its own data and micro-batch.

Assumes: one square resolution; winner and loser share the noise and the timestep (the references do).

Determinism: micro-batch m of process r uses the items of :class:`trainer.data.PairOrder` (a function of
the seed and the epoch), and each pair one CPU `torch.Generator` seeded from (seed, its slot in the stream
of trained pairs) for, in order, caption dropout, latent sampling, timestep and noise. A resumed run sees
the same data and the same random draws as an uninterrupted one (accelerate restores the weights and the
optimizer state), and a run gives the same per-pair draws however its effective batch is split across
processes and accumulation, so its losses do not depend on the number of processes.

Raises PrefpipeError for bad options, a bad dataset, an unknown model, and after `max_nonfinite`
consecutive non-finite losses (each such step is skipped: no update).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import click

from prefpipe.errors import PrefpipeError
from trainer.config import RESUMABLE_CHANGES, TrainConfig
from trainer.losses import Objective, get_objective

TRAIN_STATE = "trainer_state.json"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run. Returns a summary: steps, last metrics, data and cache counters."""
    import torch

    # ---- 1. options that need no model ----------------------------------------------------------------
    cfg.validate()
    objective = get_objective(cfg.objective)
    if objective.kind == "log_prob":  # D3PO: recorded trajectories, its own data and micro-step
        from trainer.d3po import train_d3po

        return train_d3po(cfg, objective)
    if cfg.candidates or cfg.labels or cfg.step_fraction != 1.0:
        raise PrefpipeError(
            f"--candidates, --labels and --step-fraction are for --objective d3po (trajectories); "
            f"--objective {cfg.objective} trains on pairs (--source / --pairs)"
        )
    hyper = hyperparameters(objective, cfg)
    out = Path(cfg.out)
    from trainer.data import list_units, model_identity, prepare_data, sources_fingerprint

    sources = cfg.pairs_paths()
    units = list_units(sources, cfg.limit)  # a wrong path or a missing column stops here
    if not units:
        raise PrefpipeError(f"no rows in the pairs datasets {', '.join(map(str, sources))}")

    # ---- 2. accelerator: one process or many ----------------------------------------------------------
    accelerator, trackers = make_accelerator(cfg, out)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    echo = (lambda msg: click.echo(msg, err=True)) if main else (lambda msg: None)
    checkpoint = _find_checkpoint(cfg, out, echo)
    _check_run_folder(cfg, out, checkpoint)  # every process: all stop together on a bad --out/--resume

    # ---- 3. models ------------------------------------------------------------------------------------
    from diffusers import DDPMScheduler

    from prefpipe.models import load_pipeline, model_family
    from trainer.conditioning import TextConditioner

    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    vae_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.vae_dtype]
    pipe = load_pipeline(cfg.model, dtype="fp32", device="cpu")
    family = model_family(pipe)
    vae = _load_vae(cfg.vae) if cfg.vae else pipe.vae
    vae.requires_grad_(False).eval().to(device, vae_dtype)
    text = TextConditioner(pipe, device, dtype=weight_dtype)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise PrefpipeError(f"--model {cfg.model}: prediction_type {prediction_type!r}; epsilon or v_prediction only")
    unet = pipe.unet
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or int(unet.config.sample_size) * vae_scale
    del pipe

    # ---- 4. data: scan, encode into the cache (once per dataset/model/resolution/crop), index ----------
    from trainer.data import Encoders, PairOrder, describe_drops

    cache_parts = {
        "pairs": sources_fingerprint(sources, cfg.limit),
        **model_identity(cfg.model, cfg.vae),
        "vae_dtype": cfg.vae_dtype,
        "resolution": resolution,
        "crop": f"random/{cfg.seed}" if cfg.random_crop else "center",
        "orientations": "both" if cfg.random_flip else "as stored",
    }
    data = prepare_data(
        units=units, cache_root=None if cfg.no_cache else cfg.cache_root(), cache_parts=cache_parts,
        encoders=Encoders(vae, text, cfg.encode_batch_size), resolution=resolution, keep_ties=cfg.keep_ties,
        random_crop=cfg.random_crop, random_flip=cfg.random_flip, seed=cfg.seed, caption_dropout=cfg.caption_dropout,
        rank=rank, world=world, barrier=accelerator.wait_for_everyone, progress=main and not cfg.no_progress,
    )
    if not cfg.no_cache:  # training reads the cache: the encoders are no longer needed
        text.free()
        vae = None
        gc.collect()
    n_rows = data.stats.get("rows_read", 0)
    if len(data) == 0:
        raise PrefpipeError(
            f"no training pairs left: {n_rows} rows read from {', '.join(map(str, sources))}, "
            f"all dropped ({describe_drops(data.stats)})"
        )
    order = PairOrder(len(data), cfg.batch_size, world, cfg.seed, cfg.random_flip)
    accum = cfg.gradient_accumulation
    max_steps, effective_batch, lr = step_plan(cfg, order, len(data), world)

    # ---- 5. the UNet to train (LoRA or full, optionally --init-from), and the reference ----------------
    unet, ref_unet, params = prepare_unet(unet, cfg, objective, device, weight_dtype, family)

    # ---- 6. optimizer and schedule (stepped once per optimizer step) ----------------------------------
    unet, optimizer, lr_scheduler = make_optimizer(accelerator, unet, params, cfg, lr, max_steps, family)

    # ---- 7. resume --------------------------------------------------------------------------------------
    state = resume(accelerator, checkpoint, echo)
    resolved = {"beta": hyper.get("beta"), "resolution": resolution, "lr": lr, "max_steps": max_steps,
                "effective_batch": effective_batch, "processes": world, "family": family,
                "prediction_type": prediction_type, "pairs": len(data), "cache": data.stats.get("cache")}
    start_run_folder(accelerator, cfg, out, resolved, state["step"], trackers)

    # ---- 8. the plan ------------------------------------------------------------------------------------
    start_step = state["step"]
    n_unet = sum(p.numel() for p in accelerator.unwrap_model(unet).parameters())
    n_train = sum(p.numel() for p in params)
    hyper_text = ", ".join(f"{k} {v:g}" for k, v in hyper.items())
    echo(
        f"train: {cfg.objective}{f' ({hyper_text})' if hyper_text else ''} on {len(data)} pairs "
        f"({n_rows} rows read; dropped: {describe_drops(data.stats)}) | {family}, {resolution} px, "
        f"{prediction_type} target\n"
        f"  batch: {cfg.batch_size} pairs/process x {world} process(es) x {accum} accumulation = "
        f"{effective_batch} pairs per step (effective batch)\n"
        f"  steps: {max_steps} ({order.per_epoch // accum} per epoch of {len(data)} pairs)"
        f"{f', resuming after step {start_step}' if start_step else ''}; "
        f"{cfg.lr_scheduler} schedule, {cfg.lr_warmup_steps} warm-up\n"
        f"  lr: {lr:g}" + (f" (= {cfg.learning_rate:g} x {effective_batch}, --scale-lr)" if cfg.scale_lr else "")
        + f", {cfg.optimizer}\n"
        f"  memory: {_memory_plan(cfg, objective, n_train, n_unet, ref_unet, data, weight_dtype)}"
    )

    # ---- 9. steps: micro-batch m of this process -> the objective's loss ------------------------------
    def micro_batch(m: int):
        items, flips, epoch = order.micro_batch(m, rank)
        generators = order.generators(m, rank)
        batch = data.batch(items, flips, generators)
        loss, metrics = _objective_step(
            accelerator, unet, ref_unet, objective, hyper, batch, noise_scheduler, generators, device, weight_dtype
        )
        return loss, metrics, epoch

    last, wall, state = run_steps(accelerator, unet, params, optimizer, lr_scheduler, cfg, out, state, max_steps,
                                  micro_batches=accum, micro_batch=micro_batch, hint=f"--beta (now {hyper.get('beta', 'n/a')}) or ")

    # ---- 10. export -------------------------------------------------------------------------------------
    exported = finish_run(accelerator, unet, cfg, out, family)
    return run_summary(max_steps, start_step, wall, last, data.stats, state, exported, rank, world, echo)


# --------------------------------------------------------------------------------------------------------
# The parts every recipe shares (Diffusion-DPO/SFT above, D3PO in trainer/d3po.py)
# --------------------------------------------------------------------------------------------------------


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


def prepare_unet(unet, cfg: TrainConfig, objective: Objective, device, weight_dtype, family: str):
    """Make `unet` trainable: LoRA adapters (B = 0, so the policy starts as the reference) or every weight;
    the reference (a frozen copy, only for --full or --reference-copy; otherwise the adapters are switched
    off); then --init-from loads an earlier run's weights into the policy only. Returns (unet, ref_unet or
    None, trainable params)."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the LoRA initialisation (A gaussian, B zero): the same in every process and run
    unet.requires_grad_(False)
    ref_unet = None
    if (cfg.full or cfg.reference_copy) and objective.needs_reference:
        ref_unet = copy.deepcopy(unet).to(device, weight_dtype).eval()  # the base model, before --init-from
    if cfg.full:
        unet.requires_grad_(True)  # trainable weights stay float32; autocast runs the forward in weight_dtype
    else:
        from peft import LoraConfig

        unet.to(weight_dtype)
        unet.add_adapter(LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights="gaussian",
            target_modules=cfg.lora_target_modules(),
        ))
        for p in unet.parameters():  # LoRA B starts at zero: the policy equals the reference at step 0
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.init_from:
        _load_init_weights(unet, cfg, family)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise PrefpipeError(f"--lora-targets {cfg.lora_targets}: no module of this UNet matches")
    return unet, ref_unet, params


def _load_init_weights(unet, cfg: TrainConfig, family: str) -> None:
    """--init-from RUN: its LoRA into the (same-shaped) adapters, or with --full its UNet's weights."""
    from trainer import export

    run = Path(cfg.init_from)
    if cfg.full:
        folder = run / "unet" if (run / "unet" / "config.json").exists() else run
        if not (folder / "config.json").exists():
            raise PrefpipeError(f"--init-from {run}: no full-run UNet there (RUN/unet/config.json); drop --full for a LoRA run")
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder).state_dict())
        return
    if not (run / export.LORA_FILE).exists():
        raise PrefpipeError(f"--init-from {run}: no {export.LORA_FILE} there (a LoRA run of `prefpipe train`)")
    saved = run / "train_config.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        diffs = [f"--{k.replace('_', '-')} {old.get(k)}" for k in ("lora_rank", "lora_alpha", "lora_targets")
                 if old.get(k) != getattr(cfg, k)]
        if diffs:
            raise PrefpipeError(f"--init-from {run}: its adapters have other shapes; train with {' '.join(diffs)}")
    try:
        export.load_lora(unet, run, family)
    except (RuntimeError, ValueError, KeyError) as e:
        raise PrefpipeError(f"--init-from {run}: its LoRA does not fit these adapters: {str(e).splitlines()[0]}") from e


def make_optimizer(accelerator, unet, params, cfg: TrainConfig, lr: float, max_steps: int, family: str):
    """AdamW or Adafactor over `params`, the lr schedule, both prepared (LoRA checkpoints hold the adapters)."""
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
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    if not cfg.full:
        _register_lora_checkpoint_hooks(accelerator, family)
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


def resume(accelerator, checkpoint: Path | None, echo) -> dict[str, int]:
    """Load a checkpoint (weights, optimizer, schedule, RNG); the loop's counters to continue from."""
    state = {"step": 0, "nonfinite_total": 0, "nonfinite_run": 0}
    if checkpoint is None:
        return state
    accelerator.load_state(str(checkpoint))
    saved = json.loads((checkpoint / TRAIN_STATE).read_text())
    state.update({k: saved[k] for k in state})
    world = accelerator.num_processes
    if saved.get("processes", world) != world:
        echo(f"train: warning: {checkpoint} was written by {saved['processes']} processes, this run has {world}: "
             "the effective batch and so the data order from here on differ from an uninterrupted run")
    return state


def start_run_folder(accelerator, cfg: TrainConfig, out: Path, resolved: dict, start_step: int, trackers) -> None:
    """train_config.json (options + the numbers derived from them), metrics cut back to the checkpoint, trackers."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps({**cfg.to_json(), "resolved": resolved}, indent=2))
        _truncate_metrics(out / "metrics.jsonl", start_step)
    if trackers:
        accelerator.init_trackers("prefpipe-train", config={k: str(v) for k, v in cfg.to_json().items()})


def run_steps(accelerator, unet, params, optimizer, lr_scheduler, cfg: TrainConfig, out: Path, state: dict,
              max_steps: int, *, micro_batches: int, micro_batch, hint: str = ""):
    """Optimizer steps `state["step"]` .. `max_steps`: each sums the gradients of `micro_batches` calls
    ``micro_batch(m) -> (loss, metrics, epoch)`` (m counts this process's micro-batches from the run's start;
    each loss is divided by `micro_batches`), clips, steps, logs the mean metrics and checkpoints.

    A non-finite loss in any process skips the step in all of them (no update); `cfg.max_nonfinite`
    consecutive ones stop the run with a PrefpipeError (`hint` names the objective's knobs to lower).
    Returns (last logged metrics, wall seconds, final state).
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    main, device = accelerator.is_main_process, accelerator.device
    start_step, nonfinite_total, nonfinite_run = state["step"], state["nonfinite_total"], state["nonfinite_run"]
    bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step",
               disable=not main or cfg.no_progress, dynamic_ncols=True)
    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    epoch = 0
    t_start = time.perf_counter()
    for step in range(start_step, max_steps):
        totals: dict[str, Any] = {}
        finite = True
        for j in range(micro_batches):
            sync = contextlib.nullcontext() if j == micro_batches - 1 else accelerator.no_sync(unet)
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
            _save_checkpoint(accelerator, cfg, out, done, nonfinite_total, nonfinite_run)
    bar.close()
    state = {"step": max_steps, "nonfinite_total": nonfinite_total, "nonfinite_run": nonfinite_run}
    return last, time.perf_counter() - t_start, state


def finish_run(accelerator, unet, cfg: TrainConfig, out: Path, family: str) -> Path | None:
    """Export what diffusers loads (the LoRA file, or RUN/unet) and plot the curves; ends the trackers."""
    from trainer import export

    accelerator.wait_for_everyone()
    exported = None
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(unet)
        exported = export.save_full_unet(trained, out) if cfg.full else export.save_lora(trained, out, family)
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    accelerator.end_training()
    return exported


SUMMARY_METRICS = (("loss", "loss", ".4g"), ("implicit_acc", "implicit acc", ".3f"))


def run_summary(max_steps: int, start_step: int, wall: float, last: dict, data_counts, state: dict, exported,
                rank: int, world: int, echo, metrics=SUMMARY_METRICS) -> dict[str, Any]:
    """The summary `train` returns, and its one-line report of the last step's `metrics` (key, label, format)."""
    steps_run = max_steps - start_step
    summary = {
        "steps": max_steps, "steps_run": steps_run, "wall_s": wall, "steps_per_s": steps_run / wall if wall else 0.0,
        "last": last, "data": data_counts, "nonfinite_skipped": state["nonfinite_total"], "exported": str(exported),
        "rank": rank, "world": world,
    }
    shown = ", ".join(f"{label} {last.get(key, float('nan')):{fmt}}" for key, label, fmt in metrics) + "; " if last else ""
    echo(
        f"train: {steps_run} steps in {wall:.1f} s ({summary['steps_per_s']:.2f} steps/s); {shown}"
        f"{state['nonfinite_total']} non-finite steps skipped; wrote {exported}"
    )
    return summary


# --------------------------------------------------------------------------------------------------------
# One micro-batch through the objective
# --------------------------------------------------------------------------------------------------------


def _objective_step(accelerator, unet, ref_unet, objective: Objective, hyper: dict, batch, noise_scheduler,
                    generators, device, weight_dtype):
    """Noise winner (and loser) with the same noise and timestep, predict, and apply the objective.

    Returns the objective's ``(loss, metrics)``. Pair i draws its timestep, then its noise ``(4, h, w)``,
    from `generators[i]`, after the draws :meth:`PairData.batch` made.
    """
    import torch

    from trainer.conditioning import unet_kwargs

    k = 2 if objective.needs_loser else 1
    n_t = noise_scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(0, n_t, (1,), generator=g) for g in generators])
    noise = torch.stack([torch.randn(batch.latents_w.shape[1:], generator=g) for g in generators])
    latents = torch.cat([batch.latents_w, batch.latents_l][:k]).to(device)
    noise, timesteps = noise.repeat(k, 1, 1, 1).to(device), timesteps.repeat(k).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    embeds = batch.embeds.to(device, weight_dtype)
    embeds = type(embeds)(embeds.prompt_embeds.repeat(k, 1, 1), None if embeds.pooled is None else embeds.pooled.repeat(k, 1))
    tids = None if batch.time_ids_w is None else torch.cat([batch.time_ids_w, batch.time_ids_l][:k]).to(device, weight_dtype)
    kwargs = unet_kwargs(embeds, tids)
    pred = unet(noisy, timesteps, **kwargs).sample
    inputs: dict = dict(hyper)
    pred_w, *pred_l = pred.chunk(k)
    target_w, *target_l = target.chunk(k)
    inputs.update(model_pred_w=pred_w, target_w=target_w)
    if objective.needs_loser:
        inputs.update(model_pred_l=pred_l[0], target_l=target_l[0])
    if objective.needs_reference:
        with torch.no_grad(), accelerator.autocast():
            if ref_unet is not None:
                ref = ref_unet(noisy.to(weight_dtype), timesteps, **kwargs).sample
            else:  # the same UNet with its adapters switched off: no second copy in memory
                policy = accelerator.unwrap_model(unet)
                with adapters_disabled(policy):
                    ref = policy(noisy, timesteps, **kwargs).sample
        ref_w, *ref_l = ref.chunk(k)
        inputs.update(ref_pred_w=ref_w, **({"ref_pred_l": ref_l[0]} if ref_l else {}))
    weight = batch.weight.to(device)
    if not bool((weight == 1).all()):
        inputs["weight"] = weight
    return objective(**inputs)


@contextlib.contextmanager
def adapters_disabled(unet):
    """The base UNet for the duration: every LoRA layer off, then on again (what `unet.disable_adapters()` /
    `enable_adapters()` do, with the layer list found once per UNet instead of at every call)."""
    layers = getattr(unet, "_prefpipe_lora_layers", None)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        unet._prefpipe_lora_layers = layers
    for layer in layers:
        layer.enable_adapters(enabled=False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(enabled=True)


# --------------------------------------------------------------------------------------------------------
# Helpers (options, checkpoints, reporting)
# --------------------------------------------------------------------------------------------------------


def hyperparameters(objective: Objective, cfg: TrainConfig) -> dict[str, float]:
    """The objective's own defaults (beta 5000 for dpo; beta 0.1, eps 0.1 for d3po), overridden by the
    options of the same name (--beta, --eps)."""
    hyper = dict(objective.hyperparameters)
    for name in ("beta", "eps"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if name not in hyper:
            raise PrefpipeError(f"--{name}: --objective {cfg.objective} has no {name}")
        if value <= 0 or (name == "eps" and value >= 1):
            raise PrefpipeError(f"--{name} {value}: must be {'in (0, 1)' if name == 'eps' else '> 0'}")
        hyper[name] = float(value)
    return hyper


def _load_vae(vae: str):
    from diffusers import AutoencoderKL

    path = Path(vae)
    try:
        if path.exists():
            sub = "vae" if (path / "vae" / "config.json").exists() else None
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub)
        return AutoencoderKL.from_pretrained(vae)
    except (OSError, ValueError) as e:
        raise PrefpipeError(f"--vae {vae}: could not load an AutoencoderKL: {str(e).splitlines()[0]}") from e


def _checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _find_checkpoint(cfg: TrainConfig, out: Path, echo) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        found = [p for p in _checkpoints(out) if (p / TRAIN_STATE).exists()]
        if not found:
            echo(f"train: --resume latest: no checkpoint in {out} yet, starting from step 0")
            return None
        return found[-1]
    path = Path(cfg.resume)
    if not (path / TRAIN_STATE).exists():
        raise PrefpipeError(f"--resume {cfg.resume}: not a finished checkpoint folder (no {TRAIN_STATE})")
    return path


def _check_run_folder(cfg: TrainConfig, out: Path, checkpoint: Path | None) -> None:
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


def _register_lora_checkpoint_hooks(accelerator, family: str) -> None:
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


def _save_checkpoint(accelerator, cfg: TrainConfig, out: Path, step: int, nonfinite_total: int, nonfinite_run: int) -> None:
    folder = out / f"checkpoint-{step}"
    accelerator.save_state(str(folder))  # every process: each saves its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "nonfinite_total": nonfinite_total, "nonfinite_run": nonfinite_run,
                 "processes": accelerator.num_processes}
        (folder / TRAIN_STATE).write_text(json.dumps(state))  # written last: marks the checkpoint complete
        if cfg.checkpoints_keep:
            for old in _checkpoints(out)[: -cfg.checkpoints_keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines written after the checkpoint (a killed run may have logged past it)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _memory_plan(cfg: TrainConfig, objective: Objective, n_train: int, n_unet: int, ref_unet, data, weight_dtype) -> str:
    dtype = str(weight_dtype).removeprefix("torch.")
    if cfg.full:
        what = f"full UNet: {n_train:,} trainable params (fp32)"
    else:
        what = (f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {n_train:,} trainable of {n_unet:,} UNet params "
                f"({100 * n_train / max(n_unet, 1):.2f}%), base in {dtype}")
    if not objective.needs_reference:
        ref = f"none ({cfg.objective} needs no reference)"
    elif ref_unet is not None:
        ref = f"frozen UNet copy in {dtype} ({sum(p.numel() for p in ref_unet.parameters()):,} params)"
    else:
        ref = "the policy UNet with adapters disabled (no second UNet)"
    if data.cache is not None:
        enc = (f"cached latents + text embeddings in {data.cache.folder} ({data.stats.get('units_encoded', 0)} units "
               f"encoded now, {data.stats.get('units_reused', 0)} reused); VAE and text encoders freed")
    else:
        enc = "no cache: VAE and text encoder(s) stay resident and run every step"
    extras = f"mixed precision {cfg.mixed_precision}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
    return f"{what}; reference: {ref}; encoders: {enc}; {extras}"


def plot_curves(metrics: Path, png: Path) -> None:
    """Loss, implicit accuracy, reward margin, denoising errors (dpo) or probability ratios and clip fraction
    (d3po), and lr against the step (matplotlib Agg)."""
    if not metrics.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    panels = [("loss", ["loss"]), ("implicit accuracy", ["implicit_acc"]), ("reward margin", ["reward_margin"]),
              ("denoising MSE", ["mse_w", "mse_l", "ref_mse_w", "ref_mse_l"]),
              ("probability ratio (policy / reference)", ["ratio_w", "ratio_l"]), ("ratio clip fraction", ["clip_frac"]),
              ("learning rate", ["lr"])]
    panels = [(t, [k for k in keys if k in rows[0]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(steps, [r.get(key, math.nan) for r in rows], label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
