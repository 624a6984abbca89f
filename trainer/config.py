"""`TrainConfig`: the single source of truth for `prefpipe train`'s options, defaults and help text.

Each dataclass field is one CLI option (`lora_rank` -> `--lora-rank`); its `metadata["help"]` is the help
line and its default is the CLI default. `trainer/cli.py` turns the fields into click options with
:func:`click_options`, so `prefpipe train --help`, the Python API (`train(TrainConfig(...))`) and
`RUN/train_config.json` can never disagree. Choices come from `Literal[...]` annotations, repeatable
options from `tuple[str, ...]`, flags from `bool`.

The arithmetic every run prints at start (ddpo-pytorch style)::

    effective batch = batch_size x gradient_accumulation x processes        (pairs per optimizer step)
    lr              = learning_rate x effective batch      with --scale-lr, else learning_rate
    max_steps       = epochs x (pairs // (batch_size x processes)) // gradient_accumulation   when not given

D3PO (`--objective d3po`, trainer/d3po.py) trains on recorded trajectories: each optimizer step is
``batch_size x processes x gradient_accumulation`` pairs, each at ``max(1, int(T x step_fraction))`` of its
T recorded DDIM steps (one UNet micro-batch per step, as D3PO accumulates over timesteps).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefpipe.errors import PrefpipeError

# Settings that may change between a run and its --resume without changing what is computed per step.
RESUMABLE_CHANGES = ("max_steps", "epochs", "resume", "checkpoint_every", "checkpoints_keep", "no_progress", "log_every")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Every option of `prefpipe train` (see the module docstring for the derived numbers)."""

    # -- what to train on and where to write -----------------------------------------------------------
    model: str = _opt(None, "Base diffusers pipeline: hub id (stabilityai/stable-diffusion-xl-base-1.0) or local folder.", required=True)
    out: str = _opt(None, "Run folder: checkpoints, metrics.jsonl, curves.png, train_config.json and the exported weights.", required=True)
    source: tuple[Literal["ai", "human"], ...] = _opt(
        (), "Our pairs datasets: ai = WORKDIR/pairs/ai, human = WORKDIR/pairs/human (repeatable, mixes with --pairs)."
    )
    pairs: tuple[str, ...] = _opt(
        (), "A pairs dataset folder, Parquet file or glob: ours or Pick-a-Pic shards as published (repeatable)."
    )
    workdir: str = _opt(".", "Project work folder: --source reads WORKDIR/pairs/SOURCE; the default cache is WORKDIR/cache.")
    limit: int | None = _opt(None, "Use only the first N rows of the pairs (after concatenating the sources).", min=1)
    candidates: str | None = _opt(
        None, "d3po: the trajectories dataset (`prefpipe generate --trajectories`) that the pairs or --labels refer to."
    )
    labels: tuple[str, ...] = _opt(
        (), "d3po: human labels in D3PO's format: a JSON list, per prompt of --candidates in order, of per-candidate "
        "scores (higher preferred); a folder means its *.json files; several files (annotators) are averaged (repeatable)."
    )

    # -- objective ---------------------------------------------------------------------------------------
    objective: Literal["dpo", "hinge", "ipo", "sft", "d3po"] = _opt(
        "dpo", "Objective from trainer/losses.py: dpo (Diffusion-DPO), hinge, ipo, sft (winners only); d3po needs trajectories."
    )
    beta: float | None = _opt(None, "KL strength of dpo/hinge/ipo/d3po [default: the objective's own, 5000 for dpo, 0.1 for d3po].")
    eps: float | None = _opt(
        None, "d3po: each step's probability ratio (policy / reference) is clipped to [1 - eps, 1 + eps] [default: 0.1]."
    )
    step_fraction: float = _opt(
        1.0, "d3po: fraction of each trajectory's steps trained per pair and epoch, drawn shuffled (D3PO's timestep_fraction).",
        min=0.0, max=1.0,
    )

    # -- data --------------------------------------------------------------------------------------------
    resolution: int | None = _opt(None, "Training image side in pixels (short side resized to it, then a square crop) [default: the model's native size].", min=8)
    random_crop: bool = _opt(False, "Random square crop (one per pair, drawn from the seed and the pair) instead of the centre crop.")
    random_flip: bool = _opt(False, "Flip both images of a pair horizontally with probability 0.5 per step (the cache stores both orientations).")
    keep_ties: Literal["skip", "half"] = _opt(
        "skip", "Ties (label_0 = 0.5): skip drops them; half trains each tie in both orders at weight 0.5 each."
    )
    caption_dropout: float = _opt(
        0.0, "Probability of training on the empty prompt instead of the caption (the Diffusion-DPO paper used 0.2).", min=0.0, max=1.0
    )
    cache_dir: str | None = _opt(None, "Where VAE latents and text embeddings are cached [default: WORKDIR/cache].")
    no_cache: bool = _opt(False, "Encode images and captions at every step (VAE and text encoders stay in memory).")
    encode_batch_size: int = _opt(8, "Images per VAE / text-encoder call when encoding.", min=1)
    vae: str | None = _opt(None, "A replacement VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix.")
    vae_dtype: Literal["fp32", "fp16", "bf16"] = _opt("fp32", "VAE precision for encoding (fp16 needs an fp16-safe VAE such as the fp16-fix).")

    # -- model and adapters ------------------------------------------------------------------------------
    full: bool = _opt(False, "Fine-tune the whole UNet (the reference is a frozen copy) instead of LoRA adapters.")
    init_from: str | None = _opt(
        None, "Start from an earlier run's weights (its LoRA, or its UNet with --full), e.g. the last D3PO round; "
        "the reference stays the base --model."
    )
    lora_rank: int = _opt(8, "LoRA rank.", min=1)
    lora_alpha: float | None = _opt(None, "LoRA alpha (scale = alpha / rank) [default: the rank, scale 1].")
    lora_targets: str = _opt(
        "attn", "Comma list of LoRA target modules: presets attn (to_q,to_k,to_v,to_out.0), ff (ff.net.0.proj,ff.net.2), "
        "conv (resnet conv1,conv2,conv_shortcut), or module names."
    )
    reference_copy: bool = _opt(
        False, "With LoRA, keep a separate frozen reference UNet instead of disabling the adapters "
        "(the paper's layout: one more UNet in memory; for comparison)."
    )
    gradient_checkpointing: bool = _opt(False, "Recompute UNet activations in the backward pass (less memory, ~30% slower).")
    mixed_precision: Literal["no", "fp16", "bf16"] = _opt(
        "no", "Autocast precision of the UNet; frozen weights are stored in it, trainable ones stay fp32."
    )

    # -- optimisation ------------------------------------------------------------------------------------
    optimizer: Literal["adamw", "adafactor"] = _opt("adamw", "adamw (torch) or adafactor (transformers, less optimizer memory).")
    learning_rate: float = _opt(1e-5, "Peak learning rate (per pair of the effective batch with --scale-lr).")
    scale_lr: bool = _opt(False, "Multiply the learning rate by the effective batch (batch x accumulation x processes), as the references do.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = _opt(
        "constant_with_warmup", "Learning-rate schedule (diffusers.optimization.get_scheduler)."
    )
    lr_warmup_steps: int = _opt(0, "Linear warm-up steps.", min=0)
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    weight_decay: float = _opt(1e-2, "Weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0: no clipping).", min=0.0)
    batch_size: int = _opt(2, "Pairs per process per micro-batch (each pair is two UNet inputs).", min=1)
    gradient_accumulation: int = _opt(1, "Micro-batches per optimizer step.", min=1)
    max_steps: int | None = _opt(None, "Optimizer steps [default: --epochs over the pairs].", min=1)
    epochs: int = _opt(1, "Passes over the pairs when --max-steps is not given.", min=1)
    seed: int = _opt(0, "Seed of the data order, noise, timesteps, crops, flips and caption dropout (one stream per process).")

    # -- run control -------------------------------------------------------------------------------------
    checkpoint_every: int = _opt(500, "Save a resumable checkpoint (RUN/checkpoint-STEP) every N steps (0: only at the end).", min=0)
    checkpoints_keep: int | None = _opt(None, "Keep only the newest N checkpoints.", min=1)
    resume: str | None = _opt(None, "Continue a run: 'latest' (newest RUN/checkpoint-*) or a checkpoint folder.")
    max_nonfinite: int = _opt(5, "Stop after this many consecutive steps with a non-finite loss (each is skipped).", min=1)
    log_every: int = _opt(1, "Write metrics every N steps.", min=1)
    no_progress: bool = _opt(False, "No progress bar.")

    # -- derived ----------------------------------------------------------------------------------------
    def pairs_paths(self) -> list[Path]:
        """The pairs datasets to read, in order: every --source (WORKDIR/pairs/SOURCE), then every --pairs."""
        paths = [Path(self.workdir) / "pairs" / s for s in self.source] + [Path(p) for p in self.pairs]
        if not paths:
            raise PrefpipeError("no training data: give --source ai|human (with --workdir) or --pairs PATH")
        return paths

    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.workdir) / "cache"

    def lora_target_modules(self) -> list[str]:
        """--lora-targets with presets expanded, in order, without duplicates."""
        out: list[str] = []
        for token in (t.strip() for t in self.lora_targets.split(",")):
            for name in LORA_PRESETS.get(token, [token] if token else []):
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
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("required") and value in (None, ""):
                raise PrefpipeError(f"--{cli_name(f.name)} is required")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = f.metadata.get("min"), f.metadata.get("max")
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                    raise PrefpipeError(f"--{cli_name(f.name)} {value}: must be {bounds}")
            choices = _literal_choices(_field_types()[f.name])
            if choices:
                values = value if isinstance(value, tuple) else (value,)
                for v in values:
                    if v not in choices:
                        raise PrefpipeError(f"--{cli_name(f.name)} {v}: choose one of {', '.join(choices)}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise PrefpipeError(f"--lora-alpha {self.lora_alpha}: must be > 0")
        if self.step_fraction <= 0:
            raise PrefpipeError(f"--step-fraction {self.step_fraction}: must be > 0")
        if self.resolution is not None and self.resolution % 8:
            raise PrefpipeError(f"--resolution {self.resolution}: must be a multiple of 8 (the VAE downsamples by 8)")


LORA_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "ff": ["ff.net.0.proj", "ff.net.2"],
    "conv": ["conv1", "conv2", "conv_shortcut"],
}


def cli_name(name: str) -> str:
    """The option spelling of a field: `lora_rank` -> `lora-rank`."""
    return name.replace("_", "-")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _literal_choices(tp: Any) -> tuple[str, ...]:
    """The choices of `Literal[...]`, `Literal[...] | None` or `tuple[Literal[...], ...]`; () otherwise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return tuple(typing.get_args(tp))
    if origin in (typing.Union, types.UnionType, tuple):
        for arg in typing.get_args(tp):
            if arg is not type(None) and arg is not Ellipsis:
                found = _literal_choices(arg)
                if found:
                    return found
    return ()


def _base_type(tp: Any) -> Any:
    """int / float / str for `X`, `X | None`, `tuple[X, ...]` and Literals of strings."""
    if typing.get_origin(tp) is Literal:
        return str
    if typing.get_origin(tp) in (typing.Union, types.UnionType, tuple):
        args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
        return _base_type(args[0])
    return tp


def click_options(func):
    """Decorate a click command with one option per TrainConfig field (in field order)."""
    import click

    hints = _field_types()
    for f in reversed(dataclasses.fields(TrainConfig)):
        tp = hints[f.name]
        name = "--" + cli_name(f.name)
        help_text = f.metadata["help"]
        kwargs: dict[str, Any] = {"help": help_text}
        choices = _literal_choices(tp)
        base = _base_type(tp)
        if base is bool:
            kwargs.update(is_flag=True, default=False)
        else:
            if choices:
                kwargs["type"] = click.Choice(list(choices))
            elif base in (int, float):
                lo, hi = f.metadata.get("min"), f.metadata.get("max")
                ranged = click.IntRange if base is int else click.FloatRange
                kwargs["type"] = ranged(min=lo, max=hi) if lo is not None or hi is not None else base
            else:
                kwargs["type"] = str
            if typing.get_origin(tp) is tuple:
                kwargs.update(multiple=True, default=())
            else:
                kwargs["default"] = f.default
                kwargs["show_default"] = f.default is not None
            if f.metadata.get("required"):
                kwargs["required"] = True
        func = click.option(name, f.name, **kwargs)(func)
    return func
