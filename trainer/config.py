"""`TrainConfig`: the single source of truth for `prefpipe train`'s options, defaults and help text.

Each dataclass field is one CLI option (`lora_rank` -> `--lora-rank`); its `metadata["help"]` is the help
line and its default is the CLI default. `trainer/cli.py` turns the fields into click options with
`prefpipe.core.options.click_options` (the one adapter every command uses), so `prefpipe train --help`,
the Python API (`train(TrainConfig(...))`) and `RUN/train_config.json` can never disagree. Choices come
from `Literal[...]` annotations, repeatable options from `tuple[str, ...]`, flags from `bool`.

The arithmetic every run prints at start (ddpo-pytorch style)::

    effective batch = batch_size x gradient_accumulation x processes        (pairs per optimizer step)
    lr              = learning_rate x effective batch      with --scale-lr, else learning_rate
    max_steps       = epochs x (pairs // (batch_size x processes)) // gradient_accumulation   when not given

D3PO (`--objective d3po`, trainer/recipes/d3po.py) trains on recorded trajectories: each optimizer step is
``batch_size x processes x gradient_accumulation`` pairs, each at ``max(1, int(T x step_fraction))`` of its
T recorded DDIM steps (one UNet micro-batch per step, as D3PO accumulates over timesteps).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.options import option, validate_fields

if TYPE_CHECKING:
    from trainer.losses import Objective

# Settings that may change between a run and its --resume without changing what is computed per step.
RESUMABLE_CHANGES = ("max_steps", "epochs", "resume", "checkpoint_every", "checkpoints_keep", "no_progress", "log_every",
                     "plan", "max_memory")
RESUMABLE_CHANGES += ("report_to",)  # where metrics are also sent changes nothing a step computes


@dataclass
class TrainConfig:
    """Every option of `prefpipe train` (see the module docstring for the derived numbers)."""

    # -- what to train on and where to write -----------------------------------------------------------
    model: str = option(None, "Base diffusers pipeline: hub id (stabilityai/stable-diffusion-xl-base-1.0) or local folder.", required=True)
    out: str | None = option(None, "Run folder: checkpoints, metrics.jsonl, curves.png, train_config.json and the exported "
                             "weights (required unless --plan).")
    source: tuple[Literal["ai", "human"], ...] = option(
        (), "Our pairs datasets: ai = WORKDIR/pairs/ai, human = WORKDIR/pairs/human (repeatable, mixes with --pairs)."
    )
    pairs: tuple[str, ...] = option(
        (), "A pairs dataset folder, Parquet file or glob: ours or Pick-a-Pic shards as published (repeatable)."
    )
    workdir: str = option(".", "Project work folder: --source reads WORKDIR/pairs/SOURCE; the default cache is WORKDIR/cache.")
    limit: int | None = option(None, "Use only the first N rows of the pairs (after concatenating the sources).", min=1)
    feedback: tuple[str, ...] = option(
        (), "kto: per-image feedback datasets (`prefpipe feedback`: desirable / undesirable images from scores, thumbs "
        "or pairs) to train on image by image, instead of pairs; with --images (repeatable)."
    )
    images: str | None = option(
        None, "kto --feedback: the dataset its rows point into: the candidates dataset (feedback from scores or thumbs) "
        "or the pairs dataset the feedback was derived from (feedback from pairs)."
    )
    candidates: str | None = option(
        None, "d3po: the trajectories dataset (`prefpipe generate --trajectories`) that the pairs or --labels refer to."
    )
    labels: tuple[str, ...] = option(
        (), "d3po: human labels in D3PO's format: a JSON list, per prompt of --candidates in order, of per-candidate "
        "scores (higher preferred); a folder means its *.json files; several files (annotators) are averaged (repeatable)."
    )

    # -- objective ---------------------------------------------------------------------------------------
    objective: Literal["dpo", "hinge", "ipo", "sft", "mapo", "kto", "d3po"] = option(
        "dpo", "Objective from trainer/losses.py: dpo (Diffusion-DPO), hinge, ipo, sft (winners only), mapo (MaPO: no "
        "reference model), kto (Diffusion-KTO: winners desirable, losers undesirable, or per-image --feedback); d3po "
        "needs trajectories."
    )
    beta: float | None = option(None, "KL strength of dpo/hinge/ipo/kto/d3po, margin weight of mapo [default: the objective's "
                                "own, 5000 for dpo, 1000 for kto, 0.1 for mapo and d3po].")
    snr_value: float | None = option(None, "mapo: the constant c of its error transform c*m/(exp(c*m)-1) [default: 0.5].")
    desirable_weight: float | None = option(None, "kto: weight of the desirable images' loss (lambda_D) [default: 1].")
    undesirable_weight: float | None = option(None, "kto: weight of the undesirable images' loss (lambda_U) [default: 1].")
    eps: float | None = option(
        None, "d3po: each step's probability ratio (policy / reference) is clipped to [1 - eps, 1 + eps] [default: 0.1]."
    )
    step_fraction: float = option(
        1.0, "d3po: fraction of each trajectory's steps trained per pair and epoch, drawn shuffled (D3PO's timestep_fraction).",
        min=0.0, max=1.0,
    )

    # -- data --------------------------------------------------------------------------------------------
    resolution: int | None = option(None, "Training image side in pixels (short side resized to it, then a square crop) [default: the model's native size].", min=8)
    random_crop: bool = option(False, "Random square crop (one per pair, drawn from the seed and the pair) instead of the centre crop.")
    random_flip: bool = option(False, "Flip both images of a pair horizontally with probability 0.5 per step (the cache stores both orientations).")
    keep_ties: Literal["skip", "half"] = option(
        "skip", "Ties (label_0 = 0.5): skip drops them; half trains each tie in both orders at weight 0.5 each."
    )
    caption_dropout: float = option(
        0.0, "Probability of training on the empty prompt instead of the caption (the Diffusion-DPO paper used 0.2).", min=0.0, max=1.0
    )
    cache_dir: str | None = option(None, "Where VAE latents and text embeddings are cached [default: WORKDIR/cache].")
    no_cache: bool = option(False, "Encode images and captions at every step (VAE and text encoders stay in memory).")
    encode_batch_size: int = option(8, "Images per VAE / text-encoder call when encoding.", min=1)
    vae: str | None = option(None, "A replacement VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix.")
    vae_dtype: Literal["fp32", "fp16", "bf16"] = option("fp32", "VAE precision for encoding (fp16 needs an fp16-safe VAE such as the fp16-fix).")

    # -- model and adapters ------------------------------------------------------------------------------
    full: bool = option(False, "Fine-tune the whole UNet (the reference is a frozen copy) instead of LoRA adapters.")
    init_from: str | None = option(
        None, "Start from an earlier run's weights (its LoRA, or its UNet with --full), e.g. the last D3PO round; "
        "the reference stays the base --model."
    )
    lora_rank: int = option(8, "LoRA rank.", min=1)
    lora_alpha: float | None = option(None, "LoRA alpha (scale = alpha / rank) [default: the rank, scale 1].")
    lora_targets: str = option(
        "attn", "Comma list of LoRA target modules: presets attn (to_q,to_k,to_v,to_out.0), ff (ff.net.0.proj,ff.net.2), "
        "conv (resnet conv1,conv2,conv_shortcut), or module names."
    )
    reference_copy: bool = option(
        False, "With LoRA, keep a separate frozen reference UNet instead of disabling the adapters "
        "(the paper's layout: one more UNet in memory; for comparison)."
    )
    quantize: Literal["none", "nf4"] = option(
        "none", "nf4: store the frozen base's linear weights in 4-bit NormalFloat with double-quantized scales "
        "(bitsandbytes; QLoRA's layout, about 4.1 bits per weight instead of 16), LoRA adapters trained on top; the "
        "reference is the quantized base with the adapters off. LoRA only (FLUX.1-dev at 1024 px within 24 GiB)."
    )
    gradient_checkpointing: bool = option(False, "Recompute UNet activations in the backward pass (less memory, ~30% slower).")
    mixed_precision: Literal["no", "fp16", "bf16"] = option(
        "no", "Autocast precision of the UNet; frozen weights are stored in it, trainable ones stay fp32."
    )

    # -- flow models (SD3.x, FLUX.1; trainer/flow.py) ----------------------------------------------------
    weighting_scheme: Literal["logit_normal", "mode", "none", "sigma_sqrt", "cosmap"] = option(
        "logit_normal", "Flow models: diffusers' SD3/FLUX --weighting_scheme: the training sigmas' density (logit_normal: "
        "sigmoid of N(--logit-mean, --logit-std), the SD3 paper's choice; mode) or uniform sigmas (none) with the "
        "errors weighted by sigma^-2 (sigma_sqrt) or 2 / (pi (1 - 2 sigma + 2 sigma^2)) (cosmap)."
    )
    logit_mean: float = option(0.0, "Flow models, logit_normal: mean of the normal.")
    logit_std: float = option(1.0, "Flow models, logit_normal: standard deviation of the normal.", min=0.0)
    mode_scale: float = option(1.29, "Flow models, mode: the density's scale s.")
    flow_shift: float | None = option(
        None, "Flow models: sigma shift s (sigma = s t / (1 + (s - 1) t)) [default: the scheduler's shift, 1 with its "
        "dynamic shifting (FLUX.1)].", min=0.0
    )
    guidance: float = option(3.5, "FLUX.1-dev: the distilled guidance fed to the transformer's guidance embedding in "
                             "training (its training scripts' 3.5); unused by models without one.", min=0.0)
    max_sequence_length: int | None = option(
        None, "Flow models: T5 tokens per caption [default: the pipeline's own, 256 for SD3, 512 for FLUX].", min=1
    )

    # -- optimisation ------------------------------------------------------------------------------------
    optimizer: Literal["adamw", "adafactor"] = option("adamw", "adamw (torch) or adafactor (transformers, less optimizer memory).")
    learning_rate: float = option(1e-5, "Peak learning rate (per pair of the effective batch with --scale-lr).")
    scale_lr: bool = option(False, "Multiply the learning rate by the effective batch (batch x accumulation x processes), as the references do.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = option(
        "constant_with_warmup", "Learning-rate schedule (diffusers.optimization.get_scheduler)."
    )
    lr_warmup_steps: int = option(0, "Linear warm-up steps.", min=0)
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    weight_decay: float = option(1e-2, "Weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: no clipping).", min=0.0)
    batch_size: int = option(2, "Pairs per process per micro-batch (each pair is two UNet inputs).", min=1)
    gradient_accumulation: int = option(1, "Micro-batches per optimizer step.", min=1)
    max_steps: int | None = option(None, "Optimizer steps [default: --epochs over the pairs].", min=1)
    epochs: int = option(1, "Passes over the pairs when --max-steps is not given.", min=1)
    seed: int = option(0, "Seed of the data order, noise, timesteps, crops, flips and caption dropout (one stream per process).")

    # -- memory plan (trainer/plan/) ------------------------------------------------------------------
    plan: bool = option(
        False, "Print the planned peak accelerator memory (weights, gradients, optimizer states, activations) and FLOPs "
        "of one step, then stop: no weights read, no data, no GPU (needs only the model's config files)."
    )
    max_memory: str | None = option(
        None, "Accelerator memory budget, e.g. 12GiB: pick the micro-batch (with accumulation), gradient checkpointing "
        "and optimizer that fit, or say why nothing does. With --plan, a comma list (12GiB,24GiB) prints a table."
    )

    # -- run control -------------------------------------------------------------------------------------
    checkpoint_every: int = option(500, "Save a resumable checkpoint (RUN/checkpoint-STEP) every N steps (0: only at the end).", min=0)
    checkpoints_keep: int | None = option(None, "Keep only the newest N checkpoints.", min=1)
    resume: str | None = option(None, "Continue a run: 'latest' (newest RUN/checkpoint-*) or a checkpoint folder.")
    max_nonfinite: int = option(5, "Stop after this many consecutive steps with a non-finite loss (each is skipped).", min=1)
    log_every: int = option(1, "Write metrics every N steps.", min=1)
    no_progress: bool = option(False, "No progress bar.")
    report_to: Literal["none", "tensorboard", "wandb", "all"] = option(
        "none", "Also send the metrics to experiment trackers through accelerate: tensorboard (RUN/logs), wandb "
        "(Weights & Biases; files in RUN/logs/wandb, WANDB_MODE=offline for no network) or all; metrics.jsonl is "
        "always written."
    )

    # -- derived ----------------------------------------------------------------------------------------
    def pairs_paths(self) -> list[Path]:
        """The pairs datasets to read, in order: every --source (WORKDIR/pairs/SOURCE), then every --pairs (with
        --feedback: the feedback datasets)."""
        if self.feedback:
            return [Path(p) for p in self.feedback]
        paths = [Path(self.workdir) / "pairs" / s for s in self.source] + [Path(p) for p in self.pairs]
        if not paths:
            raise PrefpipeError("no training data: give --source ai|human (with --workdir) or --pairs PATH")
        return paths

    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.workdir) / "cache"

    def lora_target_modules(self, family: str = "sd15") -> list[str]:
        """--lora-targets with presets expanded, in order, without duplicates. For the joint-attention transformers
        (family sd3, flux) `attn` also covers the text stream's projections, as diffusers' LoRA examples do."""
        out: list[str] = []
        presets = {**LORA_PRESETS, "attn": LORA_PRESETS["attn"] + JOINT_ATTN} if family in ("sd3", "flux") else LORA_PRESETS
        for token in (t.strip() for t in self.lora_targets.split(",")):
            for name in presets.get(token, [token] if token else []):
                if name not in out:
                    out.append(name)
        if not out:
            raise PrefpipeError(f"--lora-targets {self.lora_targets!r}: no module names")
        return out

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kwargs)

    def validate(self) -> None:
        """Bounds and combinations that no single field can check (raises PrefpipeError)."""
        validate_fields(self)
        if not self.out and not self.plan:
            raise PrefpipeError("--out is required (the run folder), unless --plan")
        if (self.plan or self.max_memory) and self.objective == "d3po":
            raise PrefpipeError("--plan and --max-memory cover the objectives on pairs (dpo, hinge, ipo, sft), not yet d3po")
        if self.quantize != "none" and (self.full or self.reference_copy):
            raise PrefpipeError(f"--quantize {self.quantize} stores the frozen base in 4 bits under LoRA adapters; "
                                f"{'--full trains every weight' if self.full else '--reference-copy keeps a second base'}: "
                                "drop one of the two")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise PrefpipeError(f"--lora-alpha {self.lora_alpha}: must be > 0")
        if self.step_fraction <= 0:
            raise PrefpipeError(f"--step-fraction {self.step_fraction}: must be > 0")
        if self.feedback or self.images:
            if self.objective != "kto":
                raise PrefpipeError(f"--feedback (per-image labels) trains --objective kto, not {self.objective}")
            if not self.feedback or not self.images:
                raise PrefpipeError("--feedback and --images go together: the feedback rows (`prefpipe feedback`) and "
                                    "the candidates or pairs dataset holding their images")
            if self.source or self.pairs:
                raise PrefpipeError("--feedback trains on per-image labels; --source/--pairs train on pairs: give one kind "
                                    "(`prefpipe feedback --from pairs` turns pairs into per-image labels)")
            if self.keep_ties != "skip":
                raise PrefpipeError("--keep-ties is for pairs; per-image feedback has no ties (`prefpipe feedback --ties`)")
        if self.resolution is not None and self.resolution % 8:
            raise PrefpipeError(f"--resolution {self.resolution}: must be a multiple of 8 (the VAE downsamples by 8)")


LORA_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "ff": ["ff.net.0.proj", "ff.net.2"],
    "conv": ["conv1", "conv2", "conv_shortcut"],
}
JOINT_ATTN = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]  # SD3/FLUX attention's text-stream projections


def hyperparameters(objective: Objective, cfg: TrainConfig) -> dict[str, float]:
    """The objective's own defaults (beta 5000 for dpo; beta 0.1, eps 0.1 for d3po; beta 0.1, snr_value 0.5 for
    mapo; beta 1000 for kto), overridden by the options of the same name (--beta, --eps, --snr-value, ...)."""
    hyper = dict(objective.hyperparameters)
    for name in ("beta", "eps", "snr_value", "desirable_weight", "undesirable_weight"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if name not in hyper:
            raise PrefpipeError(f"--{name.replace('_', '-')}: --objective {cfg.objective} has no {name}")
        if value <= 0 or (name == "eps" and value >= 1):
            raise PrefpipeError(f"--{name.replace('_', '-')} {value}: must be {'in (0, 1)' if name == 'eps' else '> 0'}")
        hyper[name] = float(value)
    return hyper
