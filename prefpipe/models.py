"""Loading diffusers text-to-image pipelines by hub id or local folder, placed for the hardware.

SD 1.5, SDXL, SD3/SD3.5 and FLUX.1 are first-class; any diffusers text-to-image pipeline loads. Fine-tuned
weights from `prefpipe train` plug in: `lora=RUN` (pytorch_lora_weights.safetensors via the pipeline's own
`load_lora_weights`, for the UNet families and the flow transformers alike) or `unet=RUN` (a full run's
UNet2DConditionModel folder replacing the base UNet, or for SD3/FLUX.1 its transformer folder replacing the
base transformer). The flow-matching families (SD3, FLUX.1) sample with
their own FlowMatchEulerDiscreteScheduler, and `dtype="auto"` gives them bf16 on CUDA (their T5 encoder
overflows in fp16).
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
    if dtype in (None, "auto") and dev.type == "cuda" and model_family_of(source) in FLOW_FAMILIES:
        import torch

        if torch.cuda.is_bf16_supported():
            torch_dtype = torch.bfloat16  # fp16 overflows in T5 and the FLUX transformer (NaN, black images)
    per_component = {name: resolve_dtype(d, dev) for name, d in (dtypes or {}).items()}
    kwargs: dict = {"dtype": {"default": torch_dtype, **per_component} if per_component else torch_dtype}
    kwargs.update({name: None for name in without})
    if unet is not None:
        found = denoiser_folder(unet)
        if found is None:
            raise PrefpipeError(f"--unet {unet}: no UNet2DConditionModel folder (unet/config.json), nor an SD3/FLUX "
                                "transformer folder (transformer/config.json) there")
        folder, component = found
        family = model_family_of(source)
        if family is not None and (component == "transformer") != (family in FLOW_FAMILIES):
            raise PrefpipeError(f"--unet {unet}: holds a {component} ({folder}), which does not fit the {family} "
                                f"pipeline {model}")
        kwargs[component] = load_denoiser(folder, per_component.get(component, torch_dtype))
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


def _config_class(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        return ""
    try:
        return str(json.loads(config.read_text()).get("_class_name", ""))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return ""


def _is_unet_folder(folder: Path) -> bool:
    return "UNet" in _config_class(folder)


# the denoisers a full run may hold, by the pipeline component they replace
FLOW_TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def denoiser_folder(run: str | Path) -> tuple[Path, str] | None:
    """The denoiser of a full run and the pipeline component it replaces: (`RUN/unet`, "unet") for the UNet
    families, (`RUN/transformer`, "transformer") for SD3/FLUX.1 (an SD3Transformer2DModel or
    FluxTransformer2DModel folder), or RUN itself holding either's config.json; None if neither."""
    run = Path(run)
    for folder in (run / "unet", run / "transformer", run):
        cls = _config_class(folder)
        if "UNet" in cls:
            return folder, "unet"
        if cls in FLOW_TRANSFORMERS:
            return folder, "transformer"
    return None


def load_denoiser(folder: str | Path, dtype=None):
    """The UNet or flow transformer saved in `folder` (safetensors), of the class its config.json names."""
    import diffusers

    cls = _config_class(Path(folder))
    if cls not in ("UNet2DConditionModel", *FLOW_TRANSFORMERS):
        raise PrefpipeError(f"{folder}: config.json names {cls or 'no class'}, not a UNet or a flow transformer")
    return getattr(diffusers, cls).from_pretrained(folder, **({"dtype": dtype} if dtype is not None else {}))


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
    if is_flow_scheduler(pipe.scheduler):
        check_flow_scheduler(name, type(pipe).__name__)
        return  # `euler`: the flow model's own FlowMatchEulerDiscreteScheduler, kept
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


# the flow-matching transformer families (no DDPM noise schedule: x_t = (1 - sigma) x_0 + sigma noise)
FLOW_FAMILIES = ("sd3", "flux")


def is_flow_scheduler(scheduler) -> bool:
    """A flow-matching sampler (FlowMatchEulerDiscreteScheduler and its kin): sigmas, not a DDPM beta schedule."""
    return type(scheduler).__name__.startswith("FlowMatch")


def check_flow_scheduler(name: str | None, what: str) -> None:
    """Only `euler` (the model's own FlowMatchEulerDiscreteScheduler) samples a flow-matching model: the other
    --scheduler names are DDPM samplers, whose beta schedule and epsilon/v prediction the model was not trained for."""
    if name not in (None, "euler"):
        raise PrefpipeError(
            f"--scheduler {name}: {what} is a flow-matching model (SD3/FLUX.1): it samples with its own "
            "FlowMatchEulerDiscreteScheduler (`euler`, the default); DDPM samplers (ddim, dpm++, pndm, ddpm, "
            "euler-a) assume a noise schedule it was not trained with. Drop --scheduler or pass `euler`."
        )


def native_size(pipe) -> tuple[int, int] | None:
    """The model's native (width, height) in pixels: the UNet's or the SD3 transformer's `sample_size` times the
    VAE's factor, else the VAE's own `sample_size` (FLUX.1: 1024); None when the pipeline has none of them."""
    factor = getattr(pipe, "vae_scale_factor", None)
    for name in ("unet", "transformer"):
        sample = getattr(getattr(getattr(pipe, name, None), "config", None), "sample_size", None)
        if factor and isinstance(sample, int):
            return sample * factor, sample * factor
    side = getattr(getattr(getattr(pipe, "vae", None), "config", None), "sample_size", None)
    if isinstance(side, int):
        return side, side
    return None


def model_family(pipe) -> str:
    """`sdxl` for UNet pipelines with two text encoders and micro-conditioning, `sd15` for SD 1.x/2.x, `sd3` for
    SD3/SD3.5 (MMDiT transformer, two CLIP encoders and T5), `flux` for FLUX.1 (transformer, CLIP and T5), else
    `other`. Read from the pipeline's class and component names, so a pipeline loaded `without` its text
    encoders still says what it is."""
    return family_of_components(type(pipe).__name__, set(pipe.components))


def family_of_components(pipeline_class: str, names) -> str:
    """The family from a pipeline's class name and component names (a pipeline's, or model_index.json's keys)."""
    family = family_of_class(pipeline_class)
    if family in FLOW_FAMILIES and "transformer" in names:
        return family
    if "unet" not in names:
        return "other"
    if "text_encoder_2" in names:
        return "sdxl"
    return "sd15" if "text_encoder" in names else "other"


def family_of_class(pipeline_class: str) -> str | None:
    """`sd3` / `flux` from a diffusers pipeline class name (StableDiffusion3Pipeline, FluxPipeline, ...);
    None for any other (the UNet families are told apart by their components)."""
    if pipeline_class.startswith("StableDiffusion3"):
        return "sd3"
    if pipeline_class.startswith("Flux"):
        return "flux"
    return None


def model_family_of(model: str) -> str | None:
    """The family of a pipeline folder or hub id from its model_index.json alone (no weights read): `sd3`,
    `flux`, `sdxl`, `sd15` or `other`; None when the index cannot be read (offline hub id)."""
    try:
        index = component_config(model, "model_index")
    except (PrefpipeError, OSError, ValueError):
        return None
    return family_of_components(str(index.get("_class_name", "")), set(index))


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
