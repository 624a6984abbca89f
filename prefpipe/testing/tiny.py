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

from prefpipe.core.tokenizer import write_clip_tokenizer, write_t5_tokenizer

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


def tiny_vae(
    channels: tuple[int, ...],
    groups: int,
    scaling_factor: float,
    force_upcast: bool,
    *,
    latent_channels: int = 4,
    shift_factor: float | None = None,
    quant_conv: bool = True,
    sample_size: int = 32,
):
    """A tiny `AutoencoderKL`. SD3 and FLUX.1's VAEs: 16 latent channels, a `shift_factor`, no quant convs."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=groups,  # the default 32 would need every width divisible by 32
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        force_upcast=force_upcast,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
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


# SD3 / SD3.5 and FLUX.1: flow-matching transformers. Their scheduler configs as published
# (stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json),
# and their VAE's latent normalisation ((z - shift_factor) * scaling_factor, 16 channels).
SD3_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)
FLUX_DEV_SCHEDULE = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)
SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159)
T5_WIDTH = 64  # the tiny T5's d_model: the joint attention dim of both tiny transformers (4096 in the real ones)


def t5_tokenizer():
    """The T5 tokenizer trained offline on PartiPrompts (prefpipe.core.tokenizer), as a `T5TokenizerFast`."""
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory(prefix="prefpipe-t5tok-") as tmp:
        return T5TokenizerFast.from_pretrained(write_t5_tokenizer(Path(tmp) / "tokenizer"))


def tiny_t5(vocab: int, width: int = T5_WIDTH):
    """A `T5EncoderModel` of the T5 v1.1 architecture (gated-GELU feed-forward, untied embeddings, as the
    `google/t5-v1_1-xxl` encoder SD3 and FLUX.1 use), 2 layers; the vocabulary rounded up to 128 like T5's."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=-(-vocab // 128) * 128,
        d_model=width,
        d_kv=width // 4,
        d_ff=width * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def flow_vae(size: int, normalisation: dict):
    """SD3 / FLUX.1's VAE layout: 4 blocks (x8), 16 latent channels, no quant convs, a shift factor."""
    return tiny_vae(
        (8, 16, 16, 16), groups=8, force_upcast=True, latent_channels=16, quant_conv=False, sample_size=size,
        **normalisation,
    )


def build_tiny_sd3(seed: int = 0, size: int = 64):
    """A StableDiffusion3Pipeline of the SD3.5 architecture with tiny widths and random weights.

    Text: two CLIPTextModelWithProjection (penultimate hidden states 32 + 32 concatenated, zero-padded to the
    T5 width 64 and joined with T5's tokens; pooled projections 32 + 32 = `pooled_projection_dim` 64) and a
    T5EncoderModel (width 64 = `joint_attention_dim`). Transformer: MMDiT with patch 2, 2 layers of 4 heads of
    8 (caption projection 32), SD3.5-medium's dual attention in the first layer and RMS q/k norm.
    VAE: x8, 16 latent channels, SD3's scaling/shift. `size` is the native image side (VAE `sample_size`).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    clip_hidden, clip_proj = 32, 32
    transformer = SD3Transformer2DModel(
        sample_size=size // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_proj,
        pos_embed_max_size=96,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = flow_vae(size, SD3_VAE)
    text_encoder = CLIPTextModelWithProjection(clip_text_config(clip_hidden, 2, clip_proj))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(clip_hidden, 2, clip_proj))
    tokenizer_3 = t5_tokenizer()
    text_encoder_3 = tiny_t5(len(tokenizer_3))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(pad_token="!"),  # OpenCLIP bigG pads with id 0
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_tiny_flux(seed: int = 0, size: int = 64):
    """A FluxPipeline of the FLUX.1-dev architecture with tiny widths and random weights.

    Text: a CLIPTextModel (pooled output, width 32 = `pooled_projection_dim`) and a T5EncoderModel (width
    64 = `joint_attention_dim`). Transformer: 1 double-stream and 1 single-stream block of 2 heads of 16,
    rotary axes (4, 6, 6), `guidance_embeds=True` (FLUX.1-dev's distilled guidance). Latents: 16 channels
    packed 2x2 into 64 (`in_channels`). VAE: x8, FLUX's scaling/shift. `size`: native side, a multiple of 16.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    clip_hidden = 32
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=clip_hidden,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = flow_vae(size, FLUX_VAE)
    text_encoder = CLIPTextModel(clip_text_config(clip_hidden, 2, 32))
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = tiny_t5(len(tokenizer_2))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULE),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def save_pipeline(pipe, out: str | Path) -> Path:
    """`save_pretrained`, then rewrite tokenizer folders in the hub's layout (CLIP: vocab.json + merges.txt;
    T5: spiece.model + tokenizer.json)."""
    from transformers import CLIPTokenizer

    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        shutil.rmtree(out / name, ignore_errors=True)
        if isinstance(tok, CLIPTokenizer):
            write_clip_tokenizer(out / name, pad_token=tok.pad_token)
        else:
            write_t5_tokenizer(out / name)
    return out


BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}


def write_tiny_pipeline(kind: str, out: str | Path, seed: int = 0, size: int = 64) -> Path:
    """Build and save a tiny pipeline (`sd15`, `sdxl`, `sd3` or `flux`); returns the folder to pass as `--model`."""
    return save_pipeline(BUILDERS[kind](seed=seed, size=size), out)
