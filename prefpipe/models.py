"""Loading diffusers text-to-image pipelines by hub id or local folder, placed for the hardware.

SD 1.5 and SDXL are first-class; any diffusers text-to-image pipeline loads. Fine-tuned weights
from `prefpipe train` plug in: `lora=RUN` (pytorch_lora_weights.safetensors via `load_lora_weights`)
or `unet=RUN` (a UNet2DConditionModel folder replacing the base UNet).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefpipe.core.devices import resolve_device, resolve_dtype
from prefpipe.core.errors import PrefpipeError

OFFLOAD = ("none", "model", "sequential")
# --scheduler names -> diffusers classes (built from the pipeline's own scheduler config)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep + os.sep in model or model.count("/") > 1


def resolve_model(model: str) -> str:
    """A local pipeline folder (checked) or a hub id (passed through); a clear error otherwise."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise PrefpipeError(
                f"--model {model}: folder has no model_index.json, so it is not a diffusers pipeline "
                "(make one with `prefpipe tiny sd15 --out DIR`, or `pipe.save_pretrained(DIR)`)"
            )
        return str(path)
    if _looks_local(model):
        raise PrefpipeError(f"--model {model}: no such folder")
    return model


def load_pipeline(
    model: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    offload: str = "none",
    scheduler: str | None = None,
    lora: str | None = None,
    unet: str | None = None,
    dtypes: dict[str, str] | None = None,
    without: tuple[str, ...] = (),
):
    """Load a text-to-image pipeline ready to call: weights, dtype, device/offload, scheduler, LoRA.

    Each component is read once, straight in its dtype (diffusers' low-memory loading): `dtypes` gives some
    components another dtype than `dtype` (the trainer's VAE in fp32 beside a bf16 UNet); the components in
    `without` are not loaded at all (None: a stage that does not use them does not hold them), nor is the
    base UNet when `unet` replaces it. Returns the pipeline with `pipe.prefpipe_device` set to where inputs
    should go.
    """
    from diffusers import DiffusionPipeline

    quiet_libraries()
    source = resolve_model(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    per_component = {name: resolve_dtype(d, dev) for name, d in (dtypes or {}).items()}
    kwargs: dict = {"dtype": {"default": torch_dtype, **per_component} if per_component else torch_dtype}
    kwargs.update({name: None for name in without})
    if unet is not None:
        unet_dir = unet_folder(unet)
        if unet_dir is None:
            raise PrefpipeError(f"--unet {unet}: no UNet2DConditionModel folder (config.json) there")
        kwargs["unet"] = load_unet(unet_dir, per_component.get("unet", torch_dtype))
    index = Path(source) / "model_index.json"
    if index.exists() and '"safety_checker"' in index.read_text():
        # Research use: generated candidates are judged by scorers, not filtered to black squares.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        where = "local folder" if Path(source).exists() else "hub id (is the network reachable and the id right?)"
        raise PrefpipeError(
            f"--model {model}: could not load a diffusers pipeline from this {where}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if lora is not None:
        if not Path(lora).exists():
            raise PrefpipeError(f"--lora {lora}: no such folder or file")
        try:
            pipe.load_lora_weights(lora)
        except (OSError, ValueError) as e:
            raise PrefpipeError(f"--lora {lora}: could not load LoRA weights: {e}") from e
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    if offload not in OFFLOAD:
        raise PrefpipeError(f"--offload {offload}: choose one of {', '.join(OFFLOAD)}")
    if offload != "none" and dev.type != "cuda":
        raise PrefpipeError(f"--offload {offload} needs a CUDA device; this run uses {dev}")
    if offload == "model":
        pipe.enable_model_cpu_offload(gpu_id=dev.index or 0)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(gpu_id=dev.index or 0)
    else:
        pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    pipe.prefpipe_device = dev
    return pipe


def _is_unet_folder(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        cls = json.loads(config.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return "UNet" in str(cls)


def unet_folder(run: str | Path) -> Path | None:
    """The UNet folder of a full run (`RUN/unet`, or RUN itself holding a UNet's config.json); None if neither."""
    run = Path(run)
    for folder in (run / "unet", run):
        if _is_unet_folder(folder):
            return folder
    return None


def load_unet(folder: str | Path, dtype=None):
    """A `UNet2DConditionModel` from a folder written by `save_pretrained` (safetensors)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, **({"dtype": dtype} if dtype is not None else {}))


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's sampler for a named one, keeping the model's noise schedule config."""
    import diffusers

    if name not in SCHEDULERS:
        raise PrefpipeError(f"--scheduler {name}: choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def model_family(pipe) -> str:
    """`sdxl` for UNet pipelines with two text encoders and micro-conditioning, `sd15` for SD 1.x/2.x, else
    `other`. Read from the pipeline's component names, so a pipeline loaded `without` its text encoders
    still says what it is."""
    names = set(pipe.components)
    if "unet" not in names:
        return "other"
    if "text_encoder_2" in names:
        return "sdxl"
    return "sd15" if "text_encoder" in names else "other"


def text_encoder_names(model: str) -> list[str]:
    """The text encoders of a pipeline (`text_encoder`, `text_encoder_2`, ...), from its model_index.json."""
    return [name for name in component_config(model, "model_index") if name.startswith("text_encoder")]


def component_config(model: str, component: str) -> dict:
    """The `config.json` of one component (`unet`, `vae`, ...) of a pipeline folder or hub id, without loading
    its weights. A folder holding the component's own config.json (a `--vae` replacement) is read as it is;
    `model_index` reads the pipeline's model_index.json."""
    path = Path(model).expanduser()
    if component == "model_index" and path.exists():
        return json.loads((Path(resolve_model(model)) / "model_index.json").read_text())
    if path.exists():
        for folder in (path / component, path):
            if (folder / "config.json").is_file():
                return json.loads((folder / "config.json").read_text())
        raise PrefpipeError(f"{model}: no {component}/config.json there")
    from huggingface_hub import hf_hub_download

    source = resolve_model(model)
    errors = []
    names = ["model_index.json"] if component == "model_index" else [f"{component}/config.json", "config.json"]
    for name in names:
        try:
            return json.loads(Path(hf_hub_download(source, name)).read_text())
        except Exception as e:  # noqa: BLE001 - offline, missing repo or file: try the next name, then one message
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise PrefpipeError(f"{model}: could not read the {component} config from the hub ({'; '.join(errors)})")


def quiet_libraries() -> None:
    """Silence the libraries' own loading bars and info logs: prefpipe shows one progress bar per stage."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
