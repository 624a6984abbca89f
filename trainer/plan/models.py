"""The models of a run built from their configs alone, with tensors that hold no data (or random data).

Each component is built on the meta device from its config.json (`prefpipe.models.component_config`: a local
folder or the hub's config files; a config-only folder is enough), made trainable exactly as a run does
(`trainer.unet.prepare_unet`: LoRA or full, the reference, the dtypes), then given CPU tensors by
:func:`materialize`: fake ones (`FakeTensorMode`: shapes, dtypes and storages, no data) to plan, real ones
(random values) to measure. CPU, not a faked CUDA device: a faked CUDA device fails in backward without a GPU;
CUDA's autocast lists are imitated instead (`trainer.plan.trace.cuda_autocast`).

Architectures: the denoiser is a diffusers `UNet2DConditionModel` (SD 1.x/2.x, SDXL) or a flow transformer
(`SD3Transformer2DModel`, `FluxTransformer2DModel`), conditioned as `trainer.conditioning` says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from prefpipe.core.errors import PrefpipeError
from prefpipe.models import component_config, quiet_libraries

# model_index.json component -> the diffusers class the trainer knows how to condition
DENOISERS = {"unet": ("UNet2DConditionModel",), "transformer": ("SD3Transformer2DModel", "FluxTransformer2DModel")}
FLOW_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def model_index(model: str) -> dict:
    return component_config(model, "model_index")


def denoiser_name(model: str) -> str:
    """`unet` or `transformer`: the pipeline's denoising component."""
    return "transformer" if "transformer" in model_index(model) else "unet"


def plan_family(model: str) -> str:
    """`sdxl`, `sd15`, `sd3` or `flux` from the pipeline's components (as `prefpipe.models.model_family`), or a
    message."""
    index = model_index(model)
    name = denoiser_name(model)
    denoiser = index.get(name)
    if not denoiser or denoiser[-1] not in DENOISERS[name]:
        found = {k: v[-1] for k, v in index.items() if isinstance(v, list) and k in ("unet", "transformer")}
        raise PrefpipeError(f"--model {model}: the planner knows UNet2DConditionModel (SD 1.x/2.x, SDXL), "
                            f"SD3Transformer2DModel and FluxTransformer2DModel pipelines; this one has "
                            f"{found or 'no denoiser'} (see trainer/plan/models.py to add one)")
    if name == "transformer":
        return FLOW_CLASSES[denoiser[-1]]
    if "text_encoder_2" in index:
        return "sdxl"
    if "text_encoder" in index:
        return "sd15"
    raise PrefpipeError(f"--model {model}: a UNet pipeline without a text encoder; the trainer needs one")


def scheduler_config(model: str) -> dict:
    """scheduler/scheduler_config.json (noise schedule, prediction type), or DDPM's defaults if absent."""
    path = Path(model).expanduser()
    try:
        if path.exists():
            file = path / "scheduler" / "scheduler_config.json"
            return json.loads(file.read_text()) if file.exists() else {}
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "scheduler/scheduler_config.json")).read_text())
    except Exception:  # noqa: BLE001 - the schedule does not change memory or FLOPs: defaults will do
        return {}


@dataclass
class BatchShapes:
    """What one micro-batch holds for the denoiser, per pair (see `trainer.data.pairs.PairBatch`)."""

    resolution: int
    latent: tuple[int, int, int]  # (C, h, w)
    text: tuple[int, int]  # (tokens, D): encoder_hidden_states
    pooled: int | None  # SDXL's text_embeds width, SD3/FLUX's pooled projections
    time_ids: bool  # SDXL micro-conditioning
    vae_scale: int
    t5_tokens: int = 0  # SD3/FLUX: T5 tokens per caption


def batch_shapes(model: str, vae: str | None, resolution: int | None, max_sequence_length: int | None = None
                 ) -> BatchShapes:
    if denoiser_name(model) == "transformer":
        return flow_shapes(model, vae, resolution, max_sequence_length)
    unet = component_config(model, "unet")
    vae_cfg = component_config(vae or model, "vae")
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    res = resolution or int(unet["sample_size"]) * scale
    encoders = [component_config(model, n) for n in text_encoder_names(model)]
    tokens = int(encoders[0].get("max_position_embeddings", 77)) if encoders else 77
    sdxl = unet.get("addition_embed_type") == "text_time"
    pooled = None
    if sdxl:
        pooled = int(unet["projection_class_embeddings_input_dim"]) - 6 * int(unet["addition_time_embed_dim"])
    return BatchShapes(res, (int(unet.get("in_channels", 4)), res // scale, res // scale),
                       (tokens, int(unet["cross_attention_dim"])), pooled, sdxl, scale)


def flow_shapes(model: str, vae: str | None, resolution: int | None, max_sequence_length: int | None) -> BatchShapes:
    """SD3: ``(77 + L, joint_attention_dim)`` text, pooled ``pooled_projection_dim``; FLUX: ``(L, joint_attention_dim)``,
    pooled ``pooled_projection_dim``; latents ``(16, R/8, R/8)`` (see `trainer.conditioning`)."""
    from trainer.conditioning import T5_LENGTH

    config = component_config(model, "transformer")
    family = plan_family(model)
    vae_cfg = component_config(vae or model, "vae")
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    res = resolution or int(config.get("sample_size", 128)) * scale
    tokens = max_sequence_length or T5_LENGTH[family]
    channels = int(vae_cfg.get("latent_channels", 16))
    text = (77 + tokens if family == "sd3" else tokens, int(config["joint_attention_dim"]))
    return BatchShapes(res, (channels, res // scale, res // scale), text, int(config["pooled_projection_dim"]), False,
                       scale, tokens)


def text_encoder_names(model: str) -> list[str]:
    return [name for name in model_index(model) if name.startswith("text_encoder")]


def build_unet(model: str):
    """The denoiser (UNet or flow transformer) on the meta device, float32, from its config."""
    import diffusers

    quiet_libraries()
    name = denoiser_name(model)
    config = component_config(model, name)
    cls = getattr(diffusers, config.get("_class_name") or DENOISERS[name][0])
    with torch.device("meta"):
        return cls.from_config(config)


def build_vae(model: str, vae: str | None):
    from diffusers import AutoencoderKL

    quiet_libraries()
    with torch.device("meta"):
        return AutoencoderKL.from_config(component_config(vae or model, "vae"))


def build_text_encoders(model: str) -> list:
    """The text encoders (transformers classes named in model_index.json) on the meta device."""
    import transformers

    quiet_libraries()
    out = []
    index = model_index(model)
    for name in text_encoder_names(model):
        cls = getattr(transformers, index[name][-1], None)
        if cls is None:
            raise PrefpipeError(f"--model {model}: {name} is a {index[name][-1]}, not a transformers class")
        config = cls.config_class.from_dict(component_config(model, name))
        with torch.device("meta"):
            out.append(cls(config))
    return out


def materialize(module, fake_mode=None, seed: int = 0):
    """Replace every meta parameter and buffer of `module` (in place) by a CPU tensor of the same shape, dtype
    and requires_grad: a fake one under `fake_mode`, else a real one with small random values (shared
    tensors stay shared). Returns `module`."""
    import contextlib

    gen = torch.Generator().manual_seed(seed)
    done: dict[int, torch.Tensor] = {}

    def fresh(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            if fake_mode is None:
                with torch.no_grad():
                    if new.is_floating_point():
                        new.normal_(0.0, 0.02, generator=gen)
                    else:
                        new.zero_()
            done[id(t)] = new
        return done[id(t)]

    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(fresh(p), requires_grad=p.requires_grad)
                setattr(sub, name, done[id(p)])
            for name, b in list(sub.named_buffers(recurse=False)):
                setattr(sub, name, fresh(b))
    return module


def storages(modules) -> dict[int, tuple[torch.Tensor, str]]:
    """Every distinct parameter/buffer storage of `modules` ({id: (tensor, 'trainable' or 'frozen')})."""
    out: dict[int, tuple[torch.Tensor, str]] = {}
    for m in modules:
        if m is None:
            continue
        for t in [*m.parameters(), *m.buffers()]:
            key = id(t.untyped_storage())
            kind = "trainable" if t.requires_grad else "frozen"
            if key not in out or kind == "trainable":
                out[key] = (t, kind)
    return out
