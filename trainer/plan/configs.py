"""The published configs of SD 1.5 and SDXL, to plan a run without the hub and without weights.

`write_config_folder("sdxl", DIR)` writes what `prefpipe train --plan --model DIR` reads: model_index.json and
the config.json of the UNet, the VAE and the text encoder(s) (and the scheduler's), no weights, no tokenizer.
The values are those of `stable-diffusion-v1-5/stable-diffusion-v1-5` and
`stabilityai/stable-diffusion-xl-base-1.0` (859.5 M and 2.567 B UNet parameters, VAE 83.7 M, CLIP ViT-L/14
text 123.1 M, OpenCLIP bigG text 694.7 M); a few keys at their library defaults are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False}

VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
}

CLIP_L = {  # openai/clip-vit-large-patch14's text tower (SD 1.5's and SDXL's first text encoder)
    "model_type": "clip_text_model", "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "projection_dim": 768, "layer_norm_eps": 1e-5, "bos_token_id": 0,
    "eos_token_id": 2, "pad_token_id": 1,
}

CLIP_BIGG = {  # OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's second text encoder)
    **CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280, "intermediate_size": 5120,
    "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280,
}

UNET_COMMON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}

MODELS = {
    "sd15": {
        "model_index": {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
                        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                        "safety_checker": [None, None], "feature_extractor": [None, None],
                        "requires_safety_checker": False},
        "unet": {**UNET_COMMON, "sample_size": 64, "attention_head_dim": 8, "cross_attention_dim": 768,
                 "block_out_channels": [320, 640, 1280, 1280],
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae": {**VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": CLIP_L,
        "scheduler": {"_class_name": "PNDMScheduler", **SCHEDULE, "skip_prk_steps": True},
    },
    "sdxl": {
        "model_index": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                        "text_encoder": ["transformers", "CLIPTextModel"],
                        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
        "unet": {**UNET_COMMON, "sample_size": 128, "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
                 "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816},
        "vae": {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": CLIP_L,
        "text_encoder_2": CLIP_BIGG,
        "scheduler": {"_class_name": "EulerDiscreteScheduler", **SCHEDULE, "timestep_spacing": "leading",
                      "interpolation_type": "linear"},
    },
}


def write_config_folder(kind: str, out: str | Path, overrides: dict[str, dict] | None = None) -> Path:
    """A config-only pipeline folder of `kind` (`sd15` or `sdxl`) under `out`: enough for `--plan`, nothing to
    train with. `overrides` replace keys of a component's config ({"unet": {"block_out_channels": [...]}}: a
    smaller variant of the same architecture, for tests)."""
    out = Path(out)
    spec = MODELS[kind]
    unknown = set(overrides or {}) - set(spec)
    if unknown:
        raise ValueError(f"no component {sorted(unknown)} in {kind} (has {sorted(spec)})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(spec["model_index"], indent=1))
    for name, config in spec.items():
        if name == "model_index":
            continue
        (out / name).mkdir(exist_ok=True)
        config = {**config, **(overrides or {}).get(name, {})}
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        (out / name / filename).write_text(json.dumps(config, indent=1))
    return out
