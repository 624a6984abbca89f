"""One optimizer step of a run, simulated: the models from their configs, the recipe's own step function.

What runs, in the order a step of `trainer/recipes/dpo.py` runs it on one process (`trainer.steps.run_steps`):

1. without the cache (`--no-cache`): the VAE encodes the micro-batch's images (`--encode-batch-size` at a time)
   and the text encoders its captions, under no_grad, as `trainer.data.pairs.PairData` does live;
2. the recipe's step function (`trainer.recipes.dpo.objective_step`, passed in by the caller): the policy
   forward under autocast, the reference forward (adapters off, or the frozen copy) under no_grad, the loss;
3. backward (`loss / accumulation`), gradient clipping, the optimizer step, `zero_grad(set_to_none=True)`.

It is the steady state: the optimizer states exist from the start (created by a step on zero gradients
beforehand), and with `--gradient-accumulation` above 1 the gradients of earlier micro-batches are resident
during this one (its worst micro-batch). Libraries are configured as a CUDA run would have them: CUDA's
autocast op lists (`trainer.plan.trace.cuda_autocast`), AdamW and clipping with `foreach` kernels (CUDA's default,
whose step holds one moment-sized temporary), accelerate's autocast around the prepared UNet's forward with
its output converted to float32. Differences from `trainer.steps.make_optimizer` must be mirrored here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import TrainConfig, hyperparameters
from trainer.flow import FLOW_FAMILIES, FlowMatching
from trainer.losses import Objective, get_objective
from trainer.plan.models import (
    BatchShapes,
    batch_shapes,
    build_text_encoders,
    build_unet,
    build_vae,
    materialize,
    plan_family,
    scheduler_config,
)
from trainer.plan.trace import StepTracer, checkpoint_func, cuda_autocast
from trainer.run import weight_dtype
from trainer.unet import prepare_unet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StepModels:
    """The models of one planned run, with data-less (or random) CPU tensors."""

    unet: Any  # the policy
    ref_unet: Any  # the frozen copy, or None (adapters off)
    params: list  # trainable parameters
    vae: Any  # resident only without the cache
    text_encoders: list
    shapes: BatchShapes
    family: str
    dtype: torch.dtype
    objective: Objective
    hyper: dict
    scheduler: Any


class PlanAccelerator:
    """What the step function uses of accelerate's `Accelerator`, as one CUDA process would have it (autocast on
    `device_type`: CPU when planning, with CUDA's op lists; CUDA itself in benchmarks/gpu_check.py)."""

    def __init__(self, dtype: torch.dtype, device_type: str = "cpu"):
        self.dtype, self.device_type = dtype, device_type

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def unwrap_model(self, model):
        return getattr(model, "module", model)


class Prepared(torch.nn.Module):
    """The policy as `accelerator.prepare` leaves it on one process: autocast around its forward, and its
    output converted to float32 (accelerate's `convert_outputs_to_fp32`)."""

    def __init__(self, module, dtype: torch.dtype, device_type: str = "cpu"):
        super().__init__()
        self.module, self.dtype, self.device_type = module, dtype, device_type

    def forward(self, *args, **kwargs):
        with PlanAccelerator(self.dtype, self.device_type).autocast():
            out = self.module(*args, **kwargs)
        if isinstance(out, tuple):  # a flow transformer called with return_dict=False
            return tuple(o.float() for o in out)
        return type(out)(sample=out.sample.float())


@contextlib.contextmanager
def preserved_rng():
    """Planning inside a run must not move its random streams (`prepare_unet` seeds them)."""
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def build_models(cfg: TrainConfig, tracer: StepTracer, fake_mode=None) -> StepModels:
    """The run's models from their configs (no weights read), trainable as the run makes them, on CPU tensors
    (fake under `fake_mode`)."""
    from diffusers import DDPMScheduler

    objective = get_objective(cfg.objective, per_image=bool(cfg.feedback))  # --feedback: one image per item
    hyper = hyperparameters(objective, cfg)
    family = plan_family(cfg.model)
    shapes = batch_shapes(cfg.model, cfg.vae, cfg.resolution, cfg.max_sequence_length)
    dtype = weight_dtype(cfg)
    with preserved_rng():
        unet, ref_unet, params = prepare_unet(build_unet(cfg.model), dataclasses.replace(cfg, init_from=None),
                                              objective, dtype, family)
    if cfg.gradient_checkpointing:  # diffusers' default function, with the recomputation made visible
        unet.enable_gradient_checkpointing(checkpoint_func(
            lambda: tracer.phase("activations", "recomputed", "backward (recomputing)", "recompute")))
    vae, encoders = None, []
    if cfg.no_cache:  # the encoders stay resident and run at every step
        vae = build_vae(cfg.model, cfg.vae).requires_grad_(False).eval().to(DTYPES[cfg.vae_dtype])
        encoders = [e.requires_grad_(False).eval().to(dtype) for e in build_text_encoders(cfg.model)]
    for module in (unet, ref_unet, vae, *encoders):
        if module is not None:
            materialize(module, fake_mode, seed=cfg.seed)
    params = [p for p in unet.parameters() if p.requires_grad]
    if family in FLOW_FAMILIES:  # the run's FlowMatching (trainer/recipes/dpo.py's flow_matching)
        config = scheduler_config(cfg.model)
        scheduler = FlowMatching(family, scheme=cfg.weighting_scheme, shift=FlowMatching.default_shift(config),
                                 guidance=cfg.guidance if getattr(unet.config, "guidance_embeds", False) else None)
    else:
        scheduler = DDPMScheduler.from_config({k: v for k, v in scheduler_config(cfg.model).items()
                                               if not k.startswith("_")})
    return StepModels(unet, ref_unet, params, vae, encoders, shapes, family, dtype, objective, hyper, scheduler)


def make_optimizer(cfg: TrainConfig, params: list):
    """`trainer.steps.make_optimizer`'s optimizer, with the foreach kernels a CUDA run uses by default."""
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, foreach=True)


def register_weights(tracer: StepTracer, m: StepModels, cfg: TrainConfig) -> None:
    trainable = "unet" if cfg.full else "lora"
    for p in [*m.unet.parameters(), *m.unet.buffers()]:
        tracer.register([p], "weights", trainable if p.requires_grad else "unet")
    for name, module in (("reference unet", m.ref_unet), ("vae", m.vae)):
        if module is not None:
            tracer.register([*module.parameters(), *module.buffers()], "weights", name)
    for enc in m.text_encoders:
        tracer.register([*enc.parameters(), *enc.buffers()], "weights", "text encoders")


def optimizer_states(optimizer) -> list:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def warm_up(cfg: TrainConfig, m: StepModels, optimizer, tracer: StepTracer) -> None:
    """The state of a step after the first: optimizer states (one step on zero gradients), and with
    accumulation the earlier micro-batches' gradients."""
    for p in m.params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=cfg.gradient_accumulation == 1)
    tracer.register(optimizer_states(optimizer), "optimizer states", cfg.optimizer)
    if cfg.gradient_accumulation > 1:
        tracer.register([p.grad for p in m.params], "gradients", "unet" if cfg.full else "lora")


def encode_live(cfg: TrainConfig, m: StepModels, tracer: StepTracer, device: torch.device) -> None:
    """`--no-cache`: one micro-batch's images through the VAE and captions through the text encoders (their
    outputs go to the host, as `trainer.data.cache.Encoders` sends them)."""
    s, b = m.shapes, cfg.batch_size
    images = 2 * b
    with torch.no_grad():
        with tracer.phase("activations", "vae", "vae encode", "vae"):
            for start in range(0, images, cfg.encode_batch_size):
                n = min(cfg.encode_batch_size, images - start)
                pixels = torch.zeros(n, 3, s.resolution, s.resolution, dtype=DTYPES[cfg.vae_dtype], device=device)
                dist = m.vae.encode(pixels).latent_dist
                del pixels, dist
        with tracer.phase("activations", "text encoders", "text encode", "text encoders"):
            for start in range(0, b, cfg.encode_batch_size):
                n = min(cfg.encode_batch_size, b - start)
                for enc in m.text_encoders:
                    t5 = type(enc).__name__.startswith("T5")
                    tokens = s.t5_tokens if t5 else (77 if m.family in FLOW_FAMILIES else s.text[0])
                    ids = torch.zeros(n, tokens, dtype=torch.long, device=device)
                    out = enc(ids) if t5 else enc(ids, output_hidden_states=m.family in ("sdxl", "sd3"))
                    del out, ids


def make_batch(cfg: TrainConfig, m: StepModels):
    """A micro-batch as `PairData.batch` gives it (latents float32, embeddings in the cache's float16)."""
    from trainer.conditioning import PromptEmbeds
    from trainer.data.cache import text_store_dtype
    from trainer.data.pairs import PairBatch

    b, s = cfg.batch_size, m.shapes
    store = text_store_dtype(m.family, m.dtype)
    pooled = torch.zeros(b, s.pooled, dtype=store) if s.pooled else None
    tids = (lambda: torch.zeros(b, 6)) if s.time_ids else (lambda: None)
    return PairBatch(torch.zeros(b, *s.latent), torch.zeros(b, *s.latent),
                     PromptEmbeds(torch.zeros(b, *s.text, dtype=store), pooled), tids(), tids(),
                     torch.ones(b), [str(i) for i in range(b)], torch.ones(b, dtype=torch.bool))


def phase_hooks(m: StepModels, tracer: StepTracer) -> list:
    """Forward hooks naming what runs: the policy (grad enabled) or the reference (no grad, or the copy)."""
    def policy_pre(module, args):
        if torch.is_grad_enabled():
            tracer.enter("activations", "policy", "policy forward")
        else:
            tracer.enter("activations", "reference", "reference forward")

    def ref_pre(module, args):
        tracer.enter("activations", "reference", "reference forward")

    def post(module, args, out):
        tracer.leave()

    handles = [m.unet.register_forward_pre_hook(policy_pre), m.unet.register_forward_hook(post, always_call=True)]
    if m.ref_unet is not None:
        handles += [m.ref_unet.register_forward_pre_hook(ref_pre),
                    m.ref_unet.register_forward_hook(post, always_call=True)]
    return handles


def run_step(cfg: TrainConfig, m: StepModels, step_fn, tracer: StepTracer, fake_mode=None,
             device: torch.device | str = "cpu", optimizer=None):
    """One steady-state optimizer step inside `tracer` (see the module docstring), on `device` (CPU to plan and
    validate; benchmarks/gpu_check.py runs it on CUDA). The optimizer and its warm-up are made unless given
    (`optimizer`: from an earlier call, to time several steps). Returns the optimizer."""
    device = torch.device(device)
    fake = fake_mode if fake_mode is not None else contextlib.nullcontext()
    if optimizer is None:
        with fake:
            optimizer = make_optimizer(cfg, m.params)
            warm_up(cfg, m, optimizer, tracer)
    register_weights(tracer, m, cfg)
    handles = tracer.watch_gradients(m.params, "unet" if cfg.full else "lora") + phase_hooks(m, tracer)
    policy = Prepared(m.unet, m.dtype, device.type)
    accelerator = PlanAccelerator(m.dtype, device.type)
    generators = [torch.Generator().manual_seed(cfg.seed + i) for i in range(cfg.batch_size)]
    autocast_lists = cuda_autocast() if device.type == "cpu" else contextlib.nullcontext()
    try:
        with autocast_lists, fake, tracer:
            if cfg.no_cache:
                encode_live(cfg, m, tracer, device)
            with tracer.phase("temporaries", "loss", "loss"):
                batch = make_batch(cfg, m)
                loss, metrics = step_fn(accelerator, policy, m.ref_unet, m.objective, m.hyper, batch, m.scheduler,
                                        generators, device, m.dtype)
                del batch, metrics
            with tracer.phase("temporaries", "backward", "backward", "policy backward"):
                (loss / cfg.gradient_accumulation).backward()
                del loss
            with tracer.phase("temporaries", "optimizer step", "optimizer step", "optimizer"):
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(m.params, cfg.max_grad_norm, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return optimizer


def simulate(cfg: TrainConfig, step_fn, *, real: bool = False, granularity: int = 512) -> tuple[StepTracer, StepModels, float]:
    """Build the run's models and trace one step: fake tensors (no data, no weights read), or with
    `real=True` random CPU tensors that really compute (to measure against). Returns (tracer, models, seconds)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    fake_mode = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    tracer = StepTracer(granularity=granularity, fake_conditions=not real)
    m = build_models(cfg, tracer, fake_mode)
    run_step(cfg, m, step_fn, tracer, fake_mode)
    return tracer, m, time.perf_counter() - t0
