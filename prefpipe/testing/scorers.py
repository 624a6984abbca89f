"""Tiny scorer checkpoints: the real architectures with small widths and seeded random weights, saved in the
real on-disk formats, so tests and the demo load them through the same code path as the real weights.

    write_tiny_scorer("pickscore", "tiny/pickscore")  -> folder: CLIPModel + preprocessor + tokenizer
    write_tiny_scorer("hpsv2", "tiny/hpsv2")          -> folder: HPS_v2.1_compressed.pt + open_clip_config.json
    write_tiny_scorer("clip", "tiny/clip")            -> folder: open_clip hub format (or flavour="transformers")
    write_tiny_scorer("aesthetic", "tiny/aesthetic")  -> folder: sac+logos+ava1-l14-linearMSE.pth + clip/

Each returns the path to pass as the scorer's `weights`. Images stay 224x224 (the real input size); the
patch size is 32, the towers 2 layers of width 32, and the real 49,408-token CLIP vocabulary is kept so the
real tokenizer applies. Weights are redrawn with unit-scale variance per layer so scores vary visibly
between images (a default 0.02-std init makes every embedding nearly the same).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.tokenizer import write_clip_tokenizer

TINY_KINDS = ("pickscore", "hpsv2", "clip", "aesthetic")
CLIP_FLAVOURS = ("open_clip", "transformers")
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

# ViT-H-14's structure (GELU, separate text tower), shrunk.
TINY_OPEN_CLIP_H = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# OpenAI ViT-L-14's structure (QuickGELU), shrunk; embed_dim stays 768, the aesthetic MLP's input.
TINY_OPEN_CLIP_L_OPENAI = {**TINY_OPEN_CLIP_H, "embed_dim": 768, "quick_gelu": True}

# The hub's preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K and openai/clip-vit-large-patch14
# (the legacy feature-extractor format the real files still use).
CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": OPENAI_MEAN,
    "image_std": OPENAI_STD,
    "resample": 3,
    "size": 224,
}

_NORM_WEIGHT = re.compile(r"(^|\.)(ln\w*|\w*norm\w*|pre_layrnorm)\.weight$")


def randomize_(model, seed: int) -> None:
    """Redraw every parameter from a seeded generator: matrices N(0, 1/fan_in), norm gains 1 +- 0.1,
    other vectors N(0, 0.1); `logit_scale` is left as initialised."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("logit_scale") or name.endswith("logit_bias"):
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                value = noise / math.sqrt(param[0].numel())
            elif _NORM_WEIGHT.search(name):
                value = 1 + 0.1 * noise
            else:
                value = 0.1 * noise
            param.copy_(value)


def _tiny_hf_clip(seed: int, hidden_act: str, logit_scale: float):
    """A transformers CLIPModel with the real vocabulary and 224 px input, tiny widths."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    common = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        # eos_token_id 2 is what the real (2022-2023) PickScore / OpenAI configs say; pooling then takes
        # the argmax token id, which is <|endoftext|>.
        text_config={
            **common,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "hidden_act": hidden_act,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
        vision_config={**common, "image_size": 224, "patch_size": 32, "hidden_act": hidden_act},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    randomize_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    return model


def _write_hf_clip(out: Path, seed: int, hidden_act: str, logit_scale: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _tiny_hf_clip(seed, hidden_act, logit_scale).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR_CONFIG, indent=2))
    write_clip_tokenizer(out)
    return out


def tiny_open_clip(config: dict, seed: int):
    """An open_clip model of `config` (a model_cfg dict), built by open_clip itself, seeded random weights."""
    import torch

    from labelers.hpsv2 import build_open_clip

    torch.manual_seed(seed)
    model, _ = build_open_clip(config)
    randomize_(model, seed)
    return model.eval()


def _write_open_clip(out: Path, config: dict, seed: int) -> Path:
    """open_clip's hub format: open_clip_config.json + open_clip_model.safetensors."""
    return save_open_clip(tiny_open_clip(config, seed), config, out)


def save_open_clip(model, config: dict, out: str | Path) -> Path:
    """Save an open_clip model of `config` (its model_cfg) in open_clip's hub format: open_clip_config.json
    (model_cfg and the OpenAI preprocess_cfg) + open_clip_model.safetensors. Also the demo's trained CLIP."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = {
        "mean": OPENAI_MEAN,
        "std": OPENAI_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=2)
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors")
    )
    return out


def _write_hpsv2(out: Path, seed: int) -> Path:
    """HPS's format: `{"state_dict": ...}` in HPS_v2.1_compressed.pt (half precision, like the hub files),
    plus the open_clip_config.json the scorer needs to rebuild the tiny architecture."""
    import torch

    from labelers.hpsv2 import ARCH_CONFIG, CHECKPOINTS

    out.mkdir(parents=True, exist_ok=True)
    model = tiny_open_clip(TINY_OPEN_CLIP_H, seed)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, out / CHECKPOINTS["v2.1"])
    (out / ARCH_CONFIG).write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_H}, indent=2))
    return out


def _write_aesthetic(out: Path, seed: int) -> Path:
    """The real MLP (768 -> 1) as sac+logos+ava1-l14-linearMSE.pth, and a tiny OpenAI-style CLIP in clip/."""
    import torch

    from labelers.aesthetic import CLIP_SUBFOLDER, MLP_FILENAME, AestheticMLP

    out.mkdir(parents=True, exist_ok=True)
    _write_open_clip(out / CLIP_SUBFOLDER, TINY_OPEN_CLIP_L_OPENAI, seed)
    torch.manual_seed(seed + 1)
    mlp = AestheticMLP(TINY_OPEN_CLIP_L_OPENAI["embed_dim"])
    randomize_(mlp, seed + 1)
    torch.save(mlp.state_dict(), out / MLP_FILENAME)
    return out


def write_tiny_scorer(kind: str, out_dir: str | Path, seed: int = 0, flavour: str = "open_clip") -> Path:
    """Write a tiny checkpoint for scorer `kind` into `out_dir`; returns the path to pass as its weights.

    kind: pickscore | hpsv2 | clip | aesthetic. flavour (clip only): "open_clip" (the default backend,
    open_clip hub format) or "transformers" (a CLIPModel folder like openai/clip-vit-large-patch14).
    """
    out = Path(out_dir)
    if kind not in TINY_KINDS:
        raise PrefpipeError(f"unknown tiny scorer {kind!r}; known: {', '.join(TINY_KINDS)}")
    if flavour not in CLIP_FLAVOURS:
        raise PrefpipeError(f"unknown CLIP flavour {flavour!r}; known: {', '.join(CLIP_FLAVOURS)}")
    if kind == "pickscore":
        return _write_hf_clip(out, seed, hidden_act="gelu", logit_scale=math.log(100.0))
    if kind == "hpsv2":
        return _write_hpsv2(out, seed)
    if kind == "aesthetic":
        return _write_aesthetic(out, seed)
    if flavour == "transformers":
        return _write_hf_clip(out, seed, hidden_act="quick_gelu", logit_scale=math.log(1 / 0.07))
    return _write_open_clip(out, TINY_OPEN_CLIP_H, seed)
