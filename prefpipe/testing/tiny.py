"""Tiny offline models of the real architectures, saved in the real on-disk formats.

No hub is reachable here, so tests, the demo and users smoke-testing an install build small
pipelines of exactly the classes the real checkpoints use (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel / CLIPTextModelWithProjection, a real CLIP BPE tokenizer, the real scheduler config),
with small widths and seeded random weights, and `save_pretrained` them. They then load through
`DiffusionPipeline.from_pretrained(DIR)` and prefpipe's own loader, the same path as SDXL does.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from prefpipe.core.tokenizer import write_clip_tokenizer

# Real SD 1.5 / SDXL noise schedules (their scheduler_config.json), so tiny models sample like the real ones.
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)


def clip_text_config(hidden: int, layers: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,  # the real CLIP vocabulary: the tokenizer below is the real one
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 16),
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (open_clip's vocabulary) as a transformers `CLIPTokenizer`, loaded from a
    hub-format folder written to a temporary place (the only loading path that gives the real vocabulary)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="prefpipe-tok-") as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer", pad_token=pad_token))


def tiny_vae(channels: tuple[int, ...], groups: int, scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=groups,  # the default 32 would need every width divisible by 32
        sample_size=32,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def build_tiny_sd15(seed: int = 0, size: int = 64, width: int = 32):
    """A StableDiffusionPipeline of the SD 1.5 architecture with tiny widths and random weights.

    VAE: 4 blocks (downsampling x8, like the real one); UNet: 2 levels with cross-attention;
    text encoder: a 2-layer CLIPTextModel on the real vocabulary. `size` is the default image side.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text_hidden = 32
    unet = UNet2DConditionModel(
        sample_size=size // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(width, width * 2),
        layers_per_block=1,
        cross_attention_dim=text_hidden,
        attention_head_dim=8,
        norm_num_groups=min(32, width),
    )
    vae = tiny_vae((8, 16, 16, 16), groups=8, scaling_factor=0.18215, force_upcast=True)
    text_encoder = CLIPTextModel(clip_text_config(text_hidden, 2, 32))
    scheduler = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(seed: int = 0, size: int = 64, width: int = 32):
    """A StableDiffusionXLPipeline of the SDXL architecture with tiny widths and random weights.

    Two text encoders (CLIPTextModel, CLIPTextModelWithProjection) whose penultimate hidden states
    are concatenated (cross-attention dim 32 + 32), the pooled projection of the second plus the six
    micro-conditioning numbers as the "text_time" added embedding, as in the real UNet.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    hidden1, hidden2, proj2, time_dim = 32, 32, 32, 8
    unet = UNet2DConditionModel(
        sample_size=size // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(width, width * 2),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=hidden1 + hidden2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + proj2,
        norm_num_groups=min(32, width),
    )
    vae = tiny_vae((8, 16, 16, 16), groups=8, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(clip_text_config(hidden1, 2, 32))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(hidden2, 2, proj2))
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", interpolation_type="linear")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),  # OpenCLIP bigG pads with id 0
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def save_pipeline(pipe, out: str | Path) -> Path:
    """`save_pretrained`, then rewrite tokenizer folders in the hub's layout (vocab.json + merges.txt)."""
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        shutil.rmtree(out / name, ignore_errors=True)
        write_clip_tokenizer(out / name, pad_token=tok.pad_token)
    return out


BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl}


def write_tiny_pipeline(kind: str, out: str | Path, seed: int = 0, size: int = 64) -> Path:
    """Build and save a tiny pipeline (`sd15` or `sdxl`); returns the folder to pass as `--model`."""
    return save_pipeline(BUILDERS[kind](seed=seed, size=size), out)
