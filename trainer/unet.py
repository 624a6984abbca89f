"""The UNet a recipe trains, and its reference (for SD3/FLUX the transformer: the same code, "unet" below).

- LoRA (default): adapters on the target modules, B at zero so the policy starts as the reference; the
  reference is the same UNet with its adapters switched off (:func:`adapters_disabled`), no second copy.
- `--full`: every weight trains (fp32); the reference is a frozen copy in the weight dtype, put on the
  run's device by :func:`place_reference`: whole, or under FSDP sharded like the policy (each process holds
  1/N of it and all-gathers one block at a time in its no-grad forward).
- `--reference-copy`: LoRA with a separate frozen reference (the paper's layout, for comparison).
- `--init-from RUN`: an earlier run's LoRA (or UNet) loaded into the policy only; the reference stays the base.
- `--quantize nf4`: LoRA over a base whose linear weights are 4-bit (`trainer.quantize`); the reference is that
  quantized base with the adapters off.
"""

from __future__ import annotations

import contextlib
import copy
import json
import weakref
from pathlib import Path

from prefpipe.core.errors import PrefpipeError
from prefpipe.models import load_unet, unet_folder
from trainer.config import TrainConfig
from trainer.flow import FLOW_FAMILIES
from trainer.losses import Objective
from trainer.run import Run


def prepare_unet(unet, cfg: TrainConfig, objective: Objective, weight_dtype, family: str, device=None):
    """Make `unet` trainable: LoRA adapters (B = 0, so the policy starts as the reference) or every weight;
    the reference (a frozen copy, only for --full or --reference-copy; otherwise the adapters are switched
    off; it stays where the base was loaded until :func:`place_reference`); then --init-from loads an
    earlier run's weights into the policy only. With --quantize nf4 the base's linear layers are quantized
    first, one at a time on `device` (the run's; default where the UNet is: `trainer.quantize`), and the
    adapters wrap them. Returns (unet, ref_unet or None, trainable params)."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the LoRA initialisation (A gaussian, B zero): the same in every process and run
    unet.requires_grad_(False)
    ref_unet = None
    if (cfg.full or cfg.reference_copy) and objective.needs_reference:
        ref_unet = copy.deepcopy(unet).to(weight_dtype).eval()  # the base model, before --init-from
    if cfg.full:
        unet.requires_grad_(True)  # trainable weights stay float32; autocast runs the forward in weight_dtype
    else:
        from peft import LoraConfig

        unet.to(weight_dtype)
        if cfg.quantize == "nf4":
            from trainer.quantize import quantize_linears

            quantize_linears(unet, weight_dtype, device)
        unet.add_adapter(LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights="gaussian",
            target_modules=cfg.lora_target_modules(family),
        ))
        for p in unet.parameters():  # LoRA B starts at zero: the policy equals the reference at step 0
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.init_from:
        load_init_weights(unet, cfg, family)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise PrefpipeError(f"--lora-targets {cfg.lora_targets}: no module of this UNet matches")
    return unet, ref_unet, params


def place_reference(run: Run, ref_unet):
    """The frozen reference on the run's device (after `make_optimizer` prepared the policy): whole, or when
    the run is sharded (FSDP2), sharded by accelerate's own `fsdp2_prepare_model` with the launcher's plugin
    (same wrap policy, offload and mixed precision as the policy). It is not registered with the accelerator,
    so checkpoints do not hold it: a resumed run rebuilds it from the base model. None stays None."""
    if ref_unet is None:
        return None
    if not run.sharded:
        return ref_unet.to(run.device)
    from accelerate.utils import fsdp2_prepare_model

    ref_unet = fsdp2_prepare_model(run.accelerator, ref_unet)
    run.echo(f"train: FSDP2: the frozen reference is sharded over {run.world} processes too")
    return ref_unet.eval()


def load_init_weights(unet, cfg: TrainConfig, family: str) -> None:
    """--init-from RUN: its LoRA into the (same-shaped) adapters, or with --full its UNet's weights."""
    from trainer import export

    run = Path(cfg.init_from)
    if cfg.full and family in FLOW_FAMILIES:
        if not (run / "transformer" / "config.json").is_file():
            raise PrefpipeError(f"--init-from {run}: no full-run transformer there (RUN/transformer/config.json); "
                                "drop --full for a LoRA run")
        unet.load_state_dict(type(unet).from_pretrained(run / "transformer").state_dict())
        return
    if cfg.full:
        folder = unet_folder(run)
        if folder is None:
            raise PrefpipeError(f"--init-from {run}: no full-run UNet there (RUN/unet/config.json); drop --full for a LoRA run")
        unet.load_state_dict(load_unet(folder).state_dict())
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


_LORA_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # UNet -> its LoRA layers, found once


@contextlib.contextmanager
def adapters_disabled(unet):
    """The base UNet for the duration: every LoRA layer off, then on again (what `unet.disable_adapters()` /
    `enable_adapters()` do, with the layer list found once per UNet instead of at every call)."""
    layers = _LORA_LAYERS.get(unet)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = _LORA_LAYERS[unet] = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(enabled=False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(enabled=True)
