"""The published configs of SD 1.5, SDXL, SD3.5-medium/large and FLUX.1-dev, to plan a run without the hub and
without weights.

`write_config_folder("sdxl", DIR)` writes what `prefpipe train --plan --model DIR` reads: model_index.json and
the config.json of the UNet, the VAE and the text encoder(s) (and the scheduler's), no weights, no tokenizer.
The values are those of `stable-diffusion-v1-5/stable-diffusion-v1-5` and
`stabilityai/stable-diffusion-xl-base-1.0` (859.5 M and 2.567 B UNet parameters, VAE 83.7 M, CLIP ViT-L/14
text 123.1 M, OpenCLIP bigG text 694.7 M); a few keys at their library defaults are left out. `sd35-medium`,
`sd35-large` and `flux-dev` are the config.json values of `stabilityai/stable-diffusion-3.5-medium`, `-large` and
`black-forest-labs/FLUX.1-dev` (transformers of 2.24 B, 8.06 B and 11.90 B parameters; T5-XXL encoder 4.76 B).
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


# -- flow-matching transformers (SD3.5, FLUX.1) --------------------------------------------------------------
FLOW_VAE = {**VAE, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False,
            "force_upcast": True}
CLIP_L_PROJ = {**CLIP_L, "architectures": ["CLIPTextModelWithProjection"]}  # SD3's first encoder: with projection
T5_XXL = {  # google/t5-v1_1-xxl's encoder (SD3's text_encoder_3, FLUX's text_encoder_2)
    "model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": 32128, "d_model": 4096, "d_kv": 64,
    "d_ff": 10240, "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "tie_word_embeddings": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}
SD3_INDEX = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
SD3_TRANSFORMER = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
                   "out_channels": 16, "attention_head_dim": 64, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 2048, "qk_norm": "rms_norm"}
SD3_VAE = {**FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

MODELS.update({
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, 24 layers of 24 heads, dual attention in layers 0-12
    "sd35-medium": {
        "model_index": SD3_INDEX,
        "transformer": {**SD3_TRANSFORMER, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                        "pos_embed_max_size": 384, "dual_attention_layers": list(range(13))},
        "vae": SD3_VAE, "text_encoder": CLIP_L_PROJ, "text_encoder_2": CLIP_BIGG, "text_encoder_3": T5_XXL,
        "scheduler": SD3_SCHEDULER,
    },
    # stabilityai/stable-diffusion-3.5-large: MMDiT, 38 layers of 38 heads
    "sd35-large": {
        "model_index": SD3_INDEX,
        "transformer": {**SD3_TRANSFORMER, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                        "pos_embed_max_size": 192, "dual_attention_layers": []},
        "vae": SD3_VAE, "text_encoder": CLIP_L_PROJ, "text_encoder_2": CLIP_BIGG, "text_encoder_3": T5_XXL,
        "scheduler": SD3_SCHEDULER,
    },
    # black-forest-labs/FLUX.1-dev: 19 double-stream + 38 single-stream blocks of 24 heads, guidance embedding
    "flux-dev": {
        "model_index": {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
                        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
        "transformer": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
                        "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                        "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
                        "axes_dims_rope": [16, 56, 56]},
        "vae": {**FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
        "text_encoder": CLIP_L, "text_encoder_2": T5_XXL,
        "scheduler": {**SD3_SCHEDULER, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096},
    },
})


def write_config_folder(kind: str, out: str | Path, overrides: dict[str, dict] | None = None) -> Path:
    """A config-only pipeline folder of `kind` (`sd15`, `sdxl`, `sd35-medium`, `sd35-large`, `flux-dev`) under `out`: enough for `--plan`, nothing to
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
