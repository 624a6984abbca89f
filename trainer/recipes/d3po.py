"""The D3PO recipe (Yang et al. 2023, arXiv 2311.13231): preferences over recorded sampler trajectories -> a LoRA.

    generate --trajectories ──▶ candidates: every DDIM step's latents; a prompt's candidates share x_T
    preferences ─ pairs (`prefpipe label`, or people, in our pairs schema) ─┐
                └ D3PO labels JSON (per prompt, per-candidate scores)      ─┴▶ (prompt, winner, loser)
    per pair: K = max(1, int(T x step_fraction)) of its T steps, shuffled ──▶ for each step k:
        log p(x_{k+1} | x_k), the DDIM step's Gaussian, under the policy and (no_grad, adapters off) the reference
        ──▶ d3po_loss: -logsigmoid(beta (log r_w - log r_l)),  r = clamp(p / p_ref, 1 - eps, 1 + eps)
    rounds (`prefpipe d3po-rounds`, prefpipe/stages/rounds.py): generate with the last round's LoRA ▶ label ▶ train --init-from it

What follows yk7333/d3po (`scripts/train.py`, `scripts/rm/train_d3po.py`) and DDPO's `ddim_step_with_logprob`:

- **One step's log-probability** (:func:`step_log_prob`): the model's noise prediction at the recorded
  ``x_k`` with classifier-free guidance as at sampling (the trajectory's own ``guidance``; the unconditional
  branch is what the pipeline used: the empty prompt, the candidate's negative prompt, or zeros for SDXL
  pipelines with ``force_zeros_for_empty_prompt``), then the Gaussian log-density of the recorded
  ``x_{k+1}`` under the DDIM step, averaged over latent dimensions (`trainer.losses.ddim_step_log_prob`).
  Steps without a density (the last step of a scheduler with ``set_alpha_to_one=True``) are not trained.
- **Which steps**: per pair, a permutation of its trainable steps drawn from the pair's generator (the
  seed and the pair's slot, as in `trainer/recipes/dpo.py`); the first K are trained. Winner and loser are
  trained at the same step index (D3PO's time permutation is shared by the images of a prompt).
- **One optimizer step** accumulates ``batch_size x K`` (x processes x accumulation) per-step losses:
  one UNet micro-batch per trained step, as D3PO accumulates over ``gradient_accumulation x timesteps``.
- **The reference** is the base model: the same UNet with its LoRA adapters disabled, its log-probs
  computed once per step under no_grad (with --full or --reference-copy, a frozen copy). With
  ``--init-from RUN`` (the next round) the last round's LoRA is loaded into the adapters only, so the
  reference stays the original model, as in D3PO's online script (`scripts/rm/train_d3po.py` copies the
  UNet before adding LoRA and keeps that copy for every epoch; its human-feedback `scripts/train.py` copies
  after `load_state`, so a resumed run there compares with the resumed model instead). With the base as
  reference, a model that has moved far sees its ratios clipped: watch `clip_frac` in metrics.jsonl.
- **Ties are dropped** (D3PO keeps them in the mean as a constant log 2, which only rescales the loss).

The data side (preferences, their checks against the trajectories, D3PO's label files) is in
`trainer/data/preferences.py` and `trainer/data/trajectories.py`; the online rounds that generate, label and
train in turn are a stage, `prefpipe/stages/rounds.py`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prefpipe.core.errors import PrefpipeError
from trainer.conditioning import PromptEmbeds, unet_kwargs
from trainer.config import TrainConfig, hyperparameters
from trainer.data import describe_drops
from trainer.data.pairs import PairOrder
from trainer.data.preferences import load_trajectory_pairs
from trainer.data.trajectories import TRAJECTORY_DROPS, StepBatch
from trainer.losses import (
    Objective,
    ddim_prev_timestep,
    ddim_scheduler_args,
    ddim_step_log_prob,
    ddim_step_mean_std,
)
from trainer.run import (
    SUMMARY_METRICS,
    check_resumed_data,
    finish_run,
    open_run,
    resume,
    run_summary,
    start_run_folder,
    weight_dtype,
)
from trainer.steps import make_optimizer, run_steps, step_plan
from trainer.unet import adapters_disabled, place_reference, prepare_unet

# Options of `prefpipe train` that change what a Diffusion-DPO step sees and have no meaning on recorded
# trajectories (D3PO trains at the sampled resolution, on the sampled prompts).
PAIR_IMAGE_OPTIONS = {"resolution": None, "random_crop": False, "random_flip": False, "caption_dropout": 0.0,
                       "keep_ties": "skip"}


@dataclass
class DDIMArgs:
    """What the DDIM step's Gaussian needs besides the model output (one sampler setting per run)."""

    scheduler: dict[str, Any]  # `ddim_scheduler_args` of the DDIMScheduler the candidates were sampled with
    num_train_timesteps: int
    timesteps: np.ndarray  # (T,) the recorded timesteps, x_k -> x_{k+1} at timesteps[k]
    eta: float

    @classmethod
    def of(cls, scheduler_config, timesteps: np.ndarray, eta: float) -> DDIMArgs:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(scheduler_config)  # as `prefpipe generate --trajectories` built it
        return cls(ddim_scheduler_args(sched), int(sched.config.num_train_timesteps), np.asarray(timesteps), float(eta))

    def prev_timestep(self, t: Tensor) -> Tensor:
        return ddim_prev_timestep(t, self.num_train_timesteps, len(self.timesteps))

    def trainable_steps(self) -> np.ndarray:
        """Indices k of the steps with a density (std > 0); the last step of `set_alpha_to_one` has none."""
        t = torch.as_tensor(self.timesteps)
        zeros = torch.zeros(len(t), 1, 1, 1)
        _, std = ddim_step_mean_std(zeros, t, zeros, prev_timestep=self.prev_timestep(t), eta=self.eta, **self.scheduler)
        return np.flatnonzero(std.flatten().numpy() > 0)


def step_log_prob(unet, batch: StepBatch, ddim: DDIMArgs) -> Tensor:
    """``(N,)`` log p(x_{k+1} | x_k) of recorded DDIM steps under `unet`, nats per latent element.

    The noise prediction is guided as at sampling: ``uncond + g (cond - uncond)`` where the recorded
    guidance ``g > 1`` (the pipeline's condition for classifier-free guidance), the conditional prediction
    alone otherwise; then `trainer.losses.ddim_step_log_prob` with the recorded ``x_{k+1}``.
    """
    x, t = batch.latents, batch.timesteps
    guided = batch.guidance > 1
    if bool(guided.any()):
        embeds = PromptEmbeds(torch.cat([batch.uncond.prompt_embeds, batch.cond.prompt_embeds]),
                              None if batch.cond.pooled is None else torch.cat([batch.uncond.pooled, batch.cond.pooled]))
        tids = None if batch.time_ids is None else batch.time_ids.repeat(2, 1)
        uncond, cond = unet(torch.cat([x, x]), torch.cat([t, t]), **unet_kwargs(embeds, tids)).sample.chunk(2)
        g = torch.where(guided, batch.guidance, torch.ones_like(batch.guidance)).to(cond.dtype).reshape(-1, 1, 1, 1)
        eps = uncond + g * (cond - uncond)
    else:
        eps = unet(x, t, **unet_kwargs(batch.cond, batch.time_ids)).sample
    return ddim_step_log_prob(eps, t, x, batch.next_latents, prev_timestep=ddim.prev_timestep(t), eta=ddim.eta,
                              **ddim.scheduler).log_prob


def train_d3po(cfg: TrainConfig, objective: Objective, *, on_steps_start: Callable[[], None] | None = None
               ) -> dict[str, Any]:
    """Run (or resume) one D3PO training run (`prefpipe train --objective d3po`); the summary as `train`'s."""
    # ---- 1. options, preferences and their trajectories (no model needed) -----------------------------
    refuse_flow_model(cfg.model)
    if not cfg.candidates:
        raise PrefpipeError(
            "--objective d3po trains on recorded sampler trajectories: give --candidates DIR (`prefpipe generate "
            "--trajectories`) and preferences over them (--source ai, --pairs DIR or --labels FILE)"
        )
    if not (cfg.source or cfg.pairs or cfg.labels):
        raise PrefpipeError("no training data: give --source ai (WORKDIR/pairs/ai), --pairs DIR or --labels FILE")
    changed = [f"--{k.replace('_', '-')}" for k, v in PAIR_IMAGE_OPTIONS.items() if getattr(cfg, k) != v]
    if changed:
        raise PrefpipeError(f"{', '.join(changed)}: not used by --objective d3po (it trains on the recorded "
                            "latents at the sampled size; ties are dropped)")
    hyper = hyperparameters(objective, cfg)
    data = load_trajectory_pairs(cfg)

    # ---- 2. the run: accelerator, the checkpoint to resume ---------------------------------------------
    run = open_run(cfg)
    rank, world, device, accelerator = run.rank, run.world, run.device, run.accelerator
    check_resumed_data(run, data.digest)

    # ---- 3. models: prompts encoded once, the sampler's DDIM step, the UNet (never the VAE) -------------
    from prefpipe.models import load_pipeline, model_family, text_encoder_names
    from trainer.conditioning import TextConditioner

    dtype = weight_dtype(cfg)
    dtype_name = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[cfg.mixed_precision]
    pipe = load_pipeline(cfg.model, dtype="fp32", device="cpu", without=("vae",),
                         dtypes={"unet": "fp32" if cfg.full else dtype_name,
                                 **dict.fromkeys(text_encoder_names(cfg.model), dtype_name)})
    family = model_family(pipe)
    text = TextConditioner(pipe, device, dtype=dtype)
    data.encode_prompts(text)
    ddim = DDIMArgs.of(pipe.scheduler.config, data.timesteps, data.eta)
    if ddim.scheduler["prediction_type"] == "sample":
        raise PrefpipeError(f"--model {cfg.model}: prediction_type 'sample' is not supported; epsilon or v_prediction")
    unet = pipe.unet
    del pipe, text
    gc.collect()
    trainable = ddim.trainable_steps()
    if len(trainable) == 0:
        raise PrefpipeError("no trajectory step has a probability (every step is deterministic)")
    k_steps = max(1, int(len(trainable) * cfg.step_fraction))

    order = PairOrder(len(data), cfg.batch_size, world, cfg.seed)
    accum = cfg.gradient_accumulation
    max_steps, effective_batch, lr = step_plan(cfg, order, len(data), world)

    # ---- 4. the UNet (adapters; --init-from loads the last round's LoRA into them), reference, optimizer --
    unet, ref_unet, params = prepare_unet(unet, cfg, objective, dtype, family, device=device)
    unet, optimizer, lr_scheduler = make_optimizer(run, unet, params, lr, max_steps, family)
    ref_unet = place_reference(run, ref_unet)  # whole on the device, or sharded like the policy (FSDP)
    state = resume(run)
    resolved = {**hyper, "lr": lr, "max_steps": max_steps, "effective_batch": effective_batch, "processes": world,
                "family": family, "pairs": len(data), "steps_per_trajectory": len(data.timesteps),
                "trainable_steps": len(trainable), "steps_per_pair": k_steps, "eta": data.eta,
                "init_from": cfg.init_from, "data": data.counts, "data_digest": data.digest}
    start_step = state["step"]
    start_run_folder(run, resolved, start_step)

    # ---- 5. the plan --------------------------------------------------------------------------------------
    n_train = sum(p.numel() for p in params)
    reference = (f"frozen UNet copy in {str(dtype).removeprefix('torch.')}" if ref_unet is not None
                 else "the base UNet: the policy with its adapters disabled (no second UNet)")
    run.echo(
        f"train: d3po ({', '.join(f'{k} {v:g}' for k, v in hyper.items())}) on {len(data)} pairs of trajectories "
        f"({data.counts.get('rows_read', 0)} preference rows; dropped: {describe_drops(data.counts, TRAJECTORY_DROPS)}) | {family}, "
        f"{len(data.timesteps)} DDIM steps (eta {data.eta:g}), {len(trainable)} with a density\n"
        f"  batch: {cfg.batch_size} pairs/process x {world} process(es) x {accum} accumulation = {effective_batch} "
        f"pairs per step, each at {k_steps} of its steps (--step-fraction {cfg.step_fraction:g}, shuffled): "
        f"{effective_batch * k_steps} per-step losses per optimizer step\n"
        f"  steps: {max_steps} ({order.per_epoch // accum} per epoch of {len(data)} pairs)"
        f"{f', resuming after step {start_step}' if start_step else ''}; {cfg.lr_scheduler} schedule\n"
        f"  lr: {lr:g}, {cfg.optimizer}; start: {cfg.init_from or 'the base model'}\n"
        f"  memory: {'full UNet' if cfg.full else f'LoRA rank {cfg.lora_rank} on {cfg.lora_targets}'}, {n_train:,} "
        f"trainable params; reference: {reference}; trajectories in memory: {data.nbytes() / 2**20:.1f} MiB"
    )

    # ---- 6. steps: micro-batch m = (pair micro-batch m // K, its (m % K)-th chosen step) ---------------
    current: dict[str, Any] = {"m": None}

    def micro_batch(m: int):
        pair_m, slot = divmod(m, k_steps)
        if current["m"] != pair_m:
            items, _, epoch = order.micro_batch(pair_m, rank)
            chosen = np.stack([trainable[torch.randperm(len(trainable), generator=g)[:k_steps].numpy()]
                               for g in order.generators(pair_m, rank)])  # (B, K): each pair its own steps
            current.update(m=pair_m, items=items, chosen=chosen, epoch=epoch)
        batch = data.step_batch(current["items"], current["chosen"][:, slot], family).to(device, dtype)
        logp = step_log_prob(unet, batch, ddim)
        with torch.no_grad(), accelerator.autocast():
            if ref_unet is not None:
                ref_logp = step_log_prob(ref_unet, batch, ddim)
            else:
                policy = accelerator.unwrap_model(unet)
                with adapters_disabled(policy):
                    ref_logp = step_log_prob(policy, batch, ddim)
        logp_w, logp_l = logp.chunk(2)
        ref_w, ref_l = ref_logp.chunk(2)
        loss, metrics = objective(logp_w=logp_w, logp_l=logp_l, ref_logp_w=ref_w, ref_logp_l=ref_l, **hyper)
        return loss, metrics, current["epoch"]

    last, wall, state = run_steps(run, unet, params, optimizer, lr_scheduler, state, max_steps,
                                  micro_batches=accum * k_steps, micro_batch=micro_batch,
                                  hint=f"--beta (now {hyper['beta']:g}) or ", on_start=on_steps_start)

    # ---- 7. export: the same LoRA file (or UNet) as Diffusion-DPO runs --------------------------------
    exported = finish_run(run, unet, family)
    return run_summary(run, max_steps, start_step, wall, last, data.counts, state, exported,
                       SUMMARY_METRICS + (("clip_frac", "clip frac", ".3f"),))


def refuse_flow_model(model: str) -> None:
    """D3PO needs the sampler's per-step log-probabilities: refuse a flow-matching (transformer) pipeline."""
    from prefpipe.models import component_config

    try:
        index = component_config(model, "model_index")
    except PrefpipeError:  # not readable here: loading the model says why, later
        return
    if "transformer" in index:
        raise PrefpipeError(
            f"--objective d3po: --model {model} is a flow-matching model (SD3.x / FLUX.1). D3PO trains on the "
            "log-probabilities of recorded DDIM steps, which its deterministic flow (ODE) sampler does not have, and "
            "Flow-GRPO's stochastic sampler with log-probabilities is not implemented here. Train it on pairs "
            "instead: --objective dpo (Flow-DPO), sft, hinge or ipo"
        )
