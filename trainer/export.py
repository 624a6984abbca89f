"""Outputs diffusers loads directly; nothing here is a prefpipe format.

- **LoRA runs**: `RUN/pytorch_lora_weights.safetensors`, written by the pipeline class's own
  `save_lora_weights` (the diffusers keys of `get_peft_model_state_dict` after
  `convert_state_dict_to_diffusers`, as diffusers' `train_dreambooth_lora*.py` scripts write them), with the
  adapter's `LoraConfig` as metadata so a `lora_alpha` other than the rank keeps its scale. Load with
  `pipe.load_lora_weights(RUN)` or `prefpipe generate --model BASE --lora RUN`.
- **Full runs**: `RUN/unet`, a `UNet2DConditionModel` folder that replaces the base pipeline's UNet
  (`UNet2DConditionModel.from_pretrained(RUN / "unet")`, or `prefpipe generate --unet RUN`). A run sharded
  with FSDP writes the same folder, from the full state dict gathered into the main process.

Checkpoints (`RUN/checkpoint-STEP`, trainer/checkpoints.py) hold LoRA weights in the same format, so any
checkpoint of a LoRA run also loads into a pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft-adapted UNet as float32 CPU tensors, in diffusers' key format.

    `convert_state_dict_to_diffusers` renames attention adapters only (`to_q.lora_A` -> `to_q.lora.down`);
    with feed-forward or conv targets it would leave a mixed file that `load_lora_weights` (0.42) loads
    only partly (it decides the format from the first key), so such adapters keep peft's own keys,
    which diffusers loads as they are.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(unet)
    state = convert_state_dict_to_diffusers(dict(peft_state))
    if any(".lora_A." in k or ".lora_B." in k for k in state):
        state = peft_state
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_lora(unet, folder: str | Path, family: str) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(folder)`."""
    metadata = unet.peft_config["default"].to_dict()
    _pipeline_class(family).save_lora_weights(
        save_directory=str(folder), unet_lora_layers=lora_state_dict(unet), unet_lora_adapter_metadata=metadata,
        weight_name=LORA_FILE,
    )
    return Path(folder) / LORA_FILE


def load_lora(unet, folder: str | Path, family: str) -> None:
    """Load weights written by :func:`save_lora` into a UNet that already carries the same adapter (from the
    safetensors file only: diffusers would otherwise fall back to a pickled `.bin` when it fails to read)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    state, _ = _pipeline_class(family).lora_state_dict(str(folder), weight_name=LORA_FILE, use_safetensors=True)
    state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{folder}: LoRA weights do not match the adapter (unexpected keys {unexpected[:3]})")


def save_full_unet(unet, run: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `run/unet` (config.json + safetensors) in float32.

    `state_dict`: the full weights of a sharded `unet` (FSDP2's `accelerator.get_state_dict`, gathered into
    this process); they are loaded into a fresh, unsharded model of the same class and config (built on the
    meta device, so no second set of weights is allocated), which is what gets saved.
    """
    folder = Path(run) / "unet"
    if state_dict is not None:
        from accelerate import init_empty_weights

        with init_empty_weights():
            plain = unsharded_class(unet).from_config(unet.config)
        plain.load_state_dict(state_dict, strict=True, assign=True)
        unet = plain
    unet.save_pretrained(folder, safe_serialization=True)
    return folder


def unsharded_class(module) -> type:
    """The model's own class: FSDP2's `fully_shard` swaps a module's class for a subclass of (FSDPModule, it)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
