"""The Diffusion-DPO recipe (and SFT, hinge, IPO): pairs -> a LoRA (or a full UNet).

Reads top to bottom (torchtune style): check options -> run (accelerator, checkpoint) -> models -> data
(cache) -> UNet and reference -> optimizer -> resume -> print the plan -> steps -> export. No hooks beyond
accelerate's own; the shared parts are `trainer/run.py`, `trainer/unet.py` and `trainer/steps.py`.

Supports: SD 1.x/2.x and SDXL (epsilon and v-prediction), SD3.x and FLUX.1 (flow matching, "Flow-DPO": the
transformer in the UNet's place, see `trainer/flow.py`); every denoising objective of
`trainer/losses.py` by name (`dpo` default, `hinge`, `ipo`, `sft`, `mapo` (no reference forward), `kto` (the
pairs' per-image view: winners desirable, losers undesirable; or, with `--feedback`, per-image labels: one image
per item, `trainer/data/feedback.py`)), the recipe learning from the
`Objective` entry whether it needs the loser and the reference; LoRA (reference = the same UNet with its
adapters disabled, no second copy) or full fine-tuning (reference = a frozen copy in the weight dtype);
mixed precision, gradient checkpointing, AdamW or Adafactor, warm-up and schedule, gradient accumulation;
one process or many (`accelerate launch`, GPUs or CPU processes); checkpoints and exact resume;
`--init-from RUN` (start from an earlier run's weights; the reference stays the base model).

Assumes: one square resolution; winner and loser share the noise and the timestep (the references do).

Determinism: micro-batch m of process r uses the items of :class:`trainer.data.pairs.PairOrder` (a function
of the seed and the epoch), and each pair one CPU `torch.Generator` seeded from (seed, its slot in the stream
of trained pairs) for, in order, caption dropout, latent sampling, timestep and noise. A resumed run sees
the same data and the same random draws as an uninterrupted one (its checkpoint restores the weights and the
optimizer state), and a run gives the same per-pair draws however its effective batch is split across
processes and accumulation, so its losses do not depend on the number of processes.

Raises PrefpipeError for bad options, a bad dataset, an unknown model, and after `max_nonfinite`
consecutive non-finite losses (each such step is skipped: no update).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefpipe.core.errors import PrefpipeError
from trainer.config import TrainConfig, hyperparameters
from trainer.data import describe_drops
from trainer.data.cache import Encoders, PairCache, model_identity
from trainer.data.feedback import ImageSource, feedback_fingerprint, list_feedback_units
from trainer.data.pairs import PairOrder, prepare_data
from trainer.data.rows import PAIR_DROPS, list_units, sources_fingerprint
from trainer.flow import FLOW_FAMILIES, FlowMatching
from trainer.losses import Objective
from trainer.quantize import parameter_count
from trainer.run import (
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


def train_dpo(cfg: TrainConfig, objective: Objective, *, on_steps_start: Callable[[], None] | None = None
              ) -> dict[str, Any]:
    """Run (or resume) one training run on pairs (`cfg` validated by the caller). Returns a summary: steps,
    last metrics, data and cache counters. `on_steps_start()` is called before the first step."""
    import torch

    # ---- 0. --plan / --max-memory: one step planned from the model's configs (trainer/plan/) ---------
    if cfg.plan:
        from trainer.plan.fit import plan_command

        return plan_command(cfg, objective_step)
    fitted = None
    if cfg.max_memory:
        from trainer.plan.fit import describe_change, fit

        chosen, fitted = fit(cfg, objective_step, log=_log_main)
        change = describe_change(cfg, chosen)
        _log_main(f"train: --max-memory {cfg.max_memory}: " + (f"fits with {change}" if change else "fits as configured"))
        cfg = chosen

    # ---- 1. options that need no model ----------------------------------------------------------------
    if cfg.candidates or cfg.labels or cfg.step_fraction != 1.0:
        raise PrefpipeError(
            f"--candidates, --labels and --step-fraction are for --objective d3po (trajectories); "
            f"--objective {cfg.objective} trains on pairs (--source / --pairs)"
        )
    hyper = hyperparameters(objective, cfg)
    sources = cfg.pairs_paths()
    what = "images" if objective.per_image else "pairs"  # an item: one labelled image (--feedback) or a pair
    if objective.per_image:  # per-image feedback: its rows, each image read where the row points (--images)
        images = ImageSource.open(cfg.images)
        units = list_feedback_units(sources, images, cfg.limit)
    else:
        units = list_units(sources, cfg.limit)  # a wrong path or a missing column stops here
    if not units:
        raise PrefpipeError(f"no rows in the {'feedback' if objective.per_image else 'pairs'} datasets "
                            f"{', '.join(map(str, sources))}")

    # ---- 2. the run: accelerator (one process or many), the checkpoint to resume -----------------------
    run = open_run(cfg)
    rank, world, device, accelerator = run.rank, run.world, run.device, run.accelerator
    # the training data by content (feedback: its tables and the image dataset)
    data_digest = (feedback_fingerprint(sources, images, cfg.limit) if objective.per_image
                   else sources_fingerprint(sources, cfg.limit))
    check_resumed_data(run, data_digest)

    # ---- 3. what the run needs, read from the configs (no weights yet) ---------------------------------
    from diffusers import DDPMScheduler

    from prefpipe.models import component_config, load_pipeline, model_family, text_encoder_names
    from trainer.conditioning import TextConditioner

    vae_config = component_config(cfg.vae or cfg.model, "vae")
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    denoiser = "transformer" if "transformer" in component_config(cfg.model, "model_index") else "unet"
    resolution = cfg.resolution or int(component_config(cfg.model, denoiser).get("sample_size", 128)) * vae_scale
    if denoiser == "transformer" and resolution % (2 * vae_scale):
        raise PrefpipeError(f"--resolution {resolution}: a flow transformer takes 2 x 2 latent patches, so the side "
                            f"must be a multiple of {2 * vae_scale}")
    cache_parts = {
        "pairs": data_digest,
        **model_identity(cfg.model, cfg.vae),
        "vae_dtype": cfg.vae_dtype,
        "resolution": resolution,
        "crop": f"random/{cfg.seed}" if cfg.random_crop else "center",
        "orientations": "both" if cfg.random_flip else "as stored",
    }
    if denoiser == "transformer":  # T5 embeddings are cached in the training dtype (fp16 can overflow in T5)
        cache_parts.update(text_dtype=cfg.mixed_precision, max_sequence_length=cfg.max_sequence_length)
    cache = None if cfg.no_cache else PairCache(cfg.cache_root(), cache_parts, len(units))
    encode = cache is None or not cache.complete()  # a complete cache needs neither the VAE nor the text encoders

    # ---- 4. models: each component read once, in its own dtype; the encoders only when they encode -----
    dtype = weight_dtype(cfg)
    dtype_name = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[cfg.mixed_precision]
    encoders = text_encoder_names(cfg.model)
    pipe = load_pipeline(
        cfg.model, dtype="fp32", device="cpu",
        dtypes={denoiser: "fp32" if cfg.full else dtype_name, "vae": cfg.vae_dtype, **dict.fromkeys(encoders, dtype_name)},
        without=tuple(["vae"] if cfg.vae or not encode else []) + tuple([] if encode else encoders),
    )
    family = model_family(pipe)
    vae = text = None
    if encode:
        vae_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.vae_dtype]
        vae = load_vae(cfg.vae) if cfg.vae else pipe.vae
        vae.requires_grad_(False).eval().to(device, vae_dtype)
        text = TextConditioner(pipe, device, dtype=dtype, max_sequence_length=cfg.max_sequence_length)
    if family in FLOW_FAMILIES:
        noise_scheduler = flow_matching(cfg, family, pipe)
        prediction_type = "flow-matching velocity"
    else:
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise PrefpipeError(f"--model {cfg.model}: prediction_type {prediction_type!r}; epsilon or v_prediction only")
    unet = getattr(pipe, denoiser)
    del pipe

    # ---- 5. data: scan, encode into the cache (once per dataset/model/resolution/crop), index ----------
    data = prepare_data(
        units=units, cache_root=None if cfg.no_cache else cfg.cache_root(), cache_parts=cache_parts,
        encoders=Encoders(vae, text, cfg.encode_batch_size) if encode else None, resolution=resolution,
        keep_ties=cfg.keep_ties, random_crop=cfg.random_crop, random_flip=cfg.random_flip, seed=cfg.seed,
        caption_dropout=cfg.caption_dropout, rank=rank, world=world, barrier=accelerator.wait_for_everyone,
        progress=run.main and not cfg.no_progress, per_image=objective.per_image,
    )
    if encode and not cfg.no_cache:  # training reads the cache: the encoders are no longer needed
        text.free()
        vae = None
        gc.collect()
    n_rows = data.stats.get("rows_read", 0)
    if len(data) == 0:
        raise PrefpipeError(
            f"no training {what} left: {n_rows} rows read from {', '.join(map(str, sources))}, "
            f"all dropped ({describe_drops(data.stats, PAIR_DROPS)})"
        )
    order = PairOrder(len(data), cfg.batch_size, world, cfg.seed, cfg.random_flip)
    accum = cfg.gradient_accumulation
    max_steps, effective_batch, lr = step_plan(cfg, order, len(data), world)

    # ---- 6. the UNet to train (LoRA or full, optionally --init-from), and the reference ----------------
    unet, ref_unet, params = prepare_unet(unet, cfg, objective, dtype, family, device=device)

    # ---- 7. optimizer and schedule (stepped once per optimizer step) ----------------------------------
    unet, optimizer, lr_scheduler = make_optimizer(run, unet, params, lr, max_steps, family)
    ref_unet = place_reference(run, ref_unet)  # whole on the device, or sharded like the policy (FSDP)

    # ---- 8. resume --------------------------------------------------------------------------------------
    state = resume(run)
    resolved = {"beta": hyper.get("beta"), "resolution": resolution, "lr": lr, "max_steps": max_steps,
                "effective_batch": effective_batch, "processes": world, "family": family,
                "prediction_type": prediction_type, what: len(data), "cache": data.stats.get("cache"),
                "data_digest": data_digest}
    start_run_folder(run, resolved, state["step"])

    # ---- 9. the plan -------------------------------------------------------------------------------------
    start_step = state["step"]
    n_unet = parameter_count(accelerator.unwrap_model(unet))
    n_train = sum(p.numel() for p in params)
    hyper_text = ", ".join(f"{k} {v:g}" for k, v in hyper.items())
    run.echo(
        f"train: {cfg.objective}{f' ({hyper_text})' if hyper_text else ''} on {len(data)} {what}"
        + (f" ({int((~data.index.swap).sum())} desirable, {int(data.index.swap.sum())} undesirable)" if objective.per_image
           else "") + " "
        f"({n_rows} rows read; dropped: {describe_drops(data.stats, PAIR_DROPS)}) | {family}, {resolution} px, "
        f"{prediction_type} target\n"
        f"  batch: {cfg.batch_size} {what}/process x {world} process(es) x {accum} accumulation = "
        f"{effective_batch} {what} per step (effective batch)\n"
        f"  steps: {max_steps} ({order.per_epoch // accum} per epoch of {len(data)} {what})"
        f"{f', resuming after step {start_step}' if start_step else ''}; "
        f"{cfg.lr_scheduler} schedule, {cfg.lr_warmup_steps} warm-up\n"
        f"  lr: {lr:g}" + (f" (= {cfg.learning_rate:g} x {effective_batch}, --scale-lr)" if cfg.scale_lr else "")
        + f", {cfg.optimizer}\n"
        f"  memory: {memory_plan(cfg, objective, n_train, n_unet, ref_unet, data, dtype)}"
    )
    if run.main:  # the planned peak beside it (trainer/plan/: traced when quick, else the static part)
        from trainer.plan.result import plan_at_start

        resident = [] if not cfg.no_cache else [("vae", vae), *(("text encoders", e) for e in text.encoders)]
        run.echo("  " + plan_at_start(
            cfg, objective_step, family=family, resolution=resolution, unet=accelerator.unwrap_model(unet),
            params=params, ref_unet=ref_unet, encoders=resident, needs_reference=objective.needs_reference,
            plan=fitted).replace("\n", "\n  "))

    # ---- 10. steps: micro-batch m of this process -> the objective's loss ------------------------------
    def micro_batch(m: int):
        items, flips, epoch = order.micro_batch(m, rank)
        generators = order.generators(m, rank)
        batch = data.batch(items, flips, generators)
        loss, metrics = objective_step(
            accelerator, unet, ref_unet, objective, hyper, batch, noise_scheduler, generators, device, dtype
        )
        return loss, metrics, epoch

    last, wall, state = run_steps(run, unet, params, optimizer, lr_scheduler, state, max_steps, micro_batches=accum,
                                  micro_batch=micro_batch, hint=f"--beta (now {hyper.get('beta', 'n/a')}) or ",
                                  on_start=on_steps_start)

    # ---- 11. export -------------------------------------------------------------------------------------
    exported = finish_run(run, unet, family)
    return run_summary(run, max_steps, start_step, wall, last, data.stats, state, exported)


def objective_step(accelerator, unet, ref_unet, objective: Objective, hyper: dict, batch, noise_scheduler,
                    generators, device, weight_dtype):
    """Noise winner (and loser) with the same noise and timestep, predict, and apply the objective.

    `noise_scheduler` says which process: a diffusers DDPM scheduler (UNet families: DDPM noising, the noise or
    the velocity as target) or a :class:`trainer.flow.FlowMatching` (SD3, FLUX: ``x_t = (1 - sigma) x_0 +
    sigma eps``, velocity target ``eps - x_0``, the family's transformer call). Returns the objective's
    ``(loss, metrics)``. Pair i draws its timestep (flow: its density sample), then its noise ``(C, h, w)``,
    from `generators[i]`, after the draws :meth:`PairData.batch` made.
    """
    import torch

    from trainer.conditioning import unet_kwargs
    from trainer.flow import FlowMatching, add_noise, velocity

    k = 2 if objective.needs_loser else 1
    flow = isinstance(noise_scheduler, FlowMatching)
    n_t = noise_scheduler.num_train_timesteps if flow else noise_scheduler.config.num_train_timesteps
    if flow:
        timesteps = noise_scheduler.draw_sigmas(generators)  # sigmas (B,)
    else:
        timesteps = torch.cat([torch.randint(0, n_t, (1,), generator=g) for g in generators])
    noise = torch.stack([torch.randn(batch.latents_w.shape[1:], generator=g) for g in generators])
    latents = torch.cat([batch.latents_w, batch.latents_l][:k]).to(device)
    noise, timesteps = noise.repeat(k, 1, 1, 1).to(device), timesteps.repeat(k).to(device)
    embeds = batch.embeds.to(device, weight_dtype)
    embeds = type(embeds)(embeds.prompt_embeds.repeat(k, 1, 1), None if embeds.pooled is None else embeds.pooled.repeat(k, 1))
    if flow:
        noisy, target = add_noise(latents, noise, timesteps), velocity(latents, noise)
        # sigma_sqrt / cosmap weight each squared error by w(sigma): errors of sqrt(w) x (prediction - target)
        root = noise_scheduler.loss_weight(timesteps).sqrt().reshape(-1, 1, 1, 1)
        target = target * root

        def denoise(model, x):
            pred = noise_scheduler.predict(model, x, timesteps, embeds.prompt_embeds, embeds.pooled)
            return pred * root.to(pred.dtype)
    else:
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        tids = None if batch.time_ids_w is None else torch.cat([batch.time_ids_w, batch.time_ids_l][:k]).to(device, weight_dtype)
        kwargs = unet_kwargs(embeds, tids)

        def denoise(model, x):
            return model(x, timesteps, **kwargs).sample
    pred = denoise(unet, noisy)
    inputs: dict = dict(hyper)
    if "num_train_timesteps" in inputs:  # MaPO's scale: the scheduler's, whatever the objective's default
        inputs["num_train_timesteps"] = n_t
    pred_w, *pred_l = pred.chunk(k)
    target_w, *target_l = target.chunk(k)
    inputs.update(model_pred_w=pred_w, target_w=target_w)
    if objective.needs_loser:
        inputs.update(model_pred_l=pred_l[0], target_l=target_l[0])
    if objective.needs_reference:
        with torch.no_grad(), accelerator.autocast():
            if ref_unet is not None:
                ref = denoise(ref_unet, noisy.to(weight_dtype))
            else:  # the same UNet with its adapters switched off: no second copy in memory
                policy = accelerator.unwrap_model(unet)
                with adapters_disabled(policy):
                    ref = denoise(policy, noisy)
        ref_w, *ref_l = ref.chunk(k)
        inputs.update(ref_pred_w=ref_w, **({"ref_pred_l": ref_l[0]} if ref_l else {}))
    if objective.per_image:  # per-image feedback: each item's label
        inputs["desirable"] = batch.desirable.to(device)
    if objective.reduces_kl and getattr(accelerator, "num_processes", 1) > 1:  # KTO: one KL estimate for all processes
        inputs["kl_reduce"] = lambda t: accelerator.reduce(t, reduction="mean")
    weight = batch.weight.to(device)
    if not bool((weight == 1).all()):
        inputs["weight"] = weight
    return objective(**inputs)


def flow_matching(cfg: TrainConfig, family: str, pipe) -> FlowMatching:
    """The flow-matching step of an SD3/FLUX run: --weighting-scheme and --flow-shift (default: the scheduler's,
    see `trainer/flow.py`), and --guidance when the transformer has a guidance embedding (FLUX.1-dev)."""
    config = dict(pipe.scheduler.config)
    guidance = cfg.guidance if getattr(pipe.transformer.config, "guidance_embeds", False) else None
    return FlowMatching(family, scheme=cfg.weighting_scheme, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                        mode_scale=cfg.mode_scale,
                        shift=cfg.flow_shift if cfg.flow_shift is not None else FlowMatching.default_shift(config),
                        num_train_timesteps=int(config.get("num_train_timesteps", 1000)), guidance=guidance)


def _log_main(msg: str) -> None:
    """Print on the first process only (before the accelerator exists)."""
    import os

    import click

    if os.environ.get("RANK", "0") == "0":
        click.echo(msg, err=True)


def load_vae(vae: str):
    from diffusers import AutoencoderKL

    path = Path(vae)
    try:
        if path.exists():
            sub = "vae" if (path / "vae" / "config.json").exists() else None
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub)
        return AutoencoderKL.from_pretrained(vae)
    except (OSError, ValueError) as e:
        raise PrefpipeError(f"--vae {vae}: could not load an AutoencoderKL: {str(e).splitlines()[0]}") from e


def memory_plan(cfg: TrainConfig, objective: Objective, n_train: int, n_unet: int, ref_unet, data, weight_dtype) -> str:
    dtype = str(weight_dtype).removeprefix("torch.")
    net = "transformer" if data.family in FLOW_FAMILIES else "UNet"
    if cfg.full:
        what = f"full {net}: {n_train:,} trainable params (fp32)"
    else:
        what = (f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {n_train:,} trainable of {n_unet:,} {net} params "
                f"({100 * n_train / max(n_unet, 1):.2f}%), base in {dtype}"
                + (f" with its linear weights in {cfg.quantize} (4-bit)" if cfg.quantize != "none" else ""))
    if not objective.needs_reference:
        ref = f"none ({cfg.objective} needs no reference)"
    elif ref_unet is not None:
        ref = f"frozen {net} copy in {dtype} ({sum(p.numel() for p in ref_unet.parameters()):,} params)"
    else:
        ref = f"the policy {net} with adapters disabled (no second {net})"
    if data.cache is not None:
        enc = (f"cached latents + text embeddings in {data.cache.folder} ({data.cache.size_bytes() / 2**20:.1f} MiB; "
               f"{data.stats.get('units_encoded', 0)} units "
               f"encoded now, {data.stats.get('units_reused', 0)} reused); VAE and text encoders "
               + ("freed" if data.stats.get("encoders_loaded") else "not loaded (the cache was complete)"))
    else:
        enc = "no cache: VAE and text encoder(s) stay resident and run every step"
    extras = f"mixed precision {cfg.mixed_precision}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
    return f"{what}; reference: {ref}; encoders: {enc}; {extras}"
