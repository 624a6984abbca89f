"""ImageReward v1.0 (Xu et al., 2023): BLIP fine-tuned on 137k expert comparisons; the reward of ReFL.

Reference: the `image-reward` package 1.5 (github.com/THUDM/ImageReward), `ImageReward/ImageReward.py`
(`ImageReward.score`, lines 95-135 and `inference_rank`, 138-170) and `ImageReward/models/BLIP/` (`vit.py`,
`med.py`, `blip_pretrain.py`): for each (image, prompt)

    image  -> Resize(224, bicubic) on the shorter side, CenterCrop(224), RGB, [0, 1], OpenAI mean/std
    tokens -> bert-base-uncased WordPiece (+ [DEC] bos and [ENC] special tokens, vocabulary 30,524),
              padded and truncated to 35 tokens
    h      = BLIP ViT-L/16 image tokens (post LayerNorm, eps 1e-6)
    t      = BERT text encoder with cross-attention to h in every layer; t = its [CLS] hidden state (768)
    score  = (MLP(t) - 0.16717362830052426) / 1.0333394966054072    (MLP: 768-1024-128-64-16-1, no activation)

Written with transformers' BLIP building blocks, which are ports of the same code: `BlipVisionModel` (BLIP's
timm ViT; keys renamed on load) and `BlipTextModel` (BLIP's `med.py` BERT, cross-attention width = the ViT
width; same keys). The reference loads with `strict=False`; we refuse a checkpoint that misses a weight.

Weights: the hub repo `THUDM/ImageReward` holds `ImageReward.pt` (a torch pickle of the state dict) and
`med_config.json` (the BERT config). The .pt is read with `torch.load(weights_only=True)`, which runs no
pickled code; to convert it once to safetensors:

    from safetensors.torch import save_file; import torch
    save_file(torch.load("ImageReward.pt", weights_only=True), "ImageReward.safetensors")

A folder holding `ImageReward.safetensors` (preferred) or `ImageReward.pt`, plus `med_config.json`, works
as weights. The tokenizer is `bert-base-uncased` from the hub, as in the package, unless the folder has a
`tokenizer/` subfolder or `tokenizer=` is given. `vision_config.json` beside the checkpoint (prefpipe's, for
tiny test models) changes the ViT's size; without it the ViT is BLIP's ViT-L/16 at 224 px.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from labelers.base import TorchScorer, from_pretrained, hub_file, is_local, require_hub_id
from prefpipe.core.errors import PrefpipeError

DEFAULT_WEIGHTS = "THUDM/ImageReward"
DEFAULT_TOKENIZER = "bert-base-uncased"
CHECKPOINT = "ImageReward.pt"
CHECKPOINT_SAFETENSORS = "ImageReward.safetensors"
MED_CONFIG = "med_config.json"
VISION_CONFIG = "vision_config.json"
TOKENIZER_SUBFOLDER = "tokenizer"
MAX_TOKENS = 35
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# BLIP's create_vit('large', 224): ViT-L/16.
VIT_LARGE = {"image_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0}


def imagereward_preprocess(image: Image.Image, size: int = 224):
    """One PIL image -> float32 tensor (3, size, size), the package's `_transform(224)` step for step:
    bicubic resize of the shorter side (on the PIL image), centre crop, then RGB, to tensor, normalise."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    image = TF.center_crop(image, size)
    return TF.normalize(TF.to_tensor(image.convert("RGB")), OPENAI_MEAN, OPENAI_STD)


def resolve_files(weights: str | Path) -> tuple[Path, Path]:
    """(checkpoint, med_config.json) of a local file, a local folder or a hub repo id."""
    if is_local(weights):
        path = Path(weights).expanduser()
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            path = next((folder / n for n in (CHECKPOINT_SAFETENSORS, CHECKPOINT) if (folder / n).exists()), None)
            if path is None:
                raise PrefpipeError(f"{folder} holds neither {CHECKPOINT_SAFETENSORS} nor {CHECKPOINT} (ImageReward weights)")
        config = folder / MED_CONFIG
        if not config.exists():
            raise PrefpipeError(f"{folder} holds no {MED_CONFIG}: put the BERT config of {DEFAULT_WEIGHTS} beside the weights")
        return path, config
    repo = require_hub_id(str(weights), "ImageReward weights")
    return hub_file(repo, CHECKPOINT), hub_file(repo, MED_CONFIG)


def read_state_dict(path: Path) -> dict:
    """The checkpoint's tensors (safetensors, or a torch state dict read with weights_only); never runs pickled code."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PrefpipeError(f"{path}: not a readable torch state dict ({type(err).__name__}: {err})") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise PrefpipeError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def vision_keys(depth: int) -> dict[str, str]:
    """BLIP timm-ViT key (under `blip.visual_encoder.`) -> transformers BlipVisionModel key."""
    out = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
           "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
           "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
           "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    parts = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
             "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        for theirs, ours in parts.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{p}"] = f"encoder.layers.{i}.{ours}.{p}"
    return out


def build_model(med_config: dict, vision: dict):
    """(vision model, text model, MLP head) with random weights, shaped by the BERT and ViT configs."""
    import torch
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision_config = BlipVisionConfig(
        hidden_size=vision["embed_dim"], intermediate_size=int(vision["embed_dim"] * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["depth"], num_attention_heads=vision["num_heads"], image_size=vision["image_size"],
        patch_size=vision["patch_size"], hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0,
    )
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        encoder_hidden_size=vision["embed_dim"], intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"], num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"], bos_token_id=None, hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12), pad_token_id=med_config.get("pad_token_id", 0),
        is_decoder=True,  # transformers builds the cross-attention layers only for a decoder config
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    vision_model = BlipVisionModel(vision_config)
    text_model = BlipTextModel(text_config, add_pooling_layer=False)
    width = med_config["hidden_size"]
    mlp = torch.nn.Sequential(  # the package's MLP: indices 0, 2, 4, 6, 7 hold the Linear layers
        torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )
    return vision_model, text_model, mlp


def split_state_dict(state: dict, depth: int, source: Path) -> tuple[dict, dict, dict]:
    """The reference state dict -> (vision, text, mlp) state dicts under transformers' names.

    BLIP's `vision_proj`/`text_proj` (unused by the reward) and the text `position_ids` buffer are dropped.
    """
    vision_map = vision_keys(depth)
    vision, text, mlp, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            if name in vision_map:
                vision[vision_map[name]] = value
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            name = key.removeprefix("blip.text_encoder.")
            if not name.endswith("position_ids"):
                text[name] = value
        elif key.startswith("mlp.layers."):
            mlp[key.removeprefix("mlp.layers.")] = value
        elif not key.startswith(("blip.vision_proj.", "blip.text_proj.")):
            unknown.append(key)
    if unknown:
        raise PrefpipeError(f"{source}: unexpected weights {unknown[:5]}: not an ImageReward checkpoint of this size")
    return vision, text, mlp


def load_strict(module, state: dict, what: str, source: Path) -> None:
    """`module.load_state_dict(state)`, every weight required; a mismatch names the file and the keys."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise PrefpipeError(f"{source}: {what} weights do not fit the config ({err})") from err
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise PrefpipeError(
            f"{source}: {what} weights do not match (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}); "
            f"check {MED_CONFIG} / {VISION_CONFIG} beside it"
        )


def load_tokenizer(location: str | Path):
    """The package's `init_tokenizer`: BertTokenizer + bos '[DEC]' + additional special token '[ENC]'."""
    from transformers import BertTokenizer

    tokenizer = from_pretrained(BertTokenizer, str(location), "ImageReward (BERT) tokenizer")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(TorchScorer):
    """ImageReward v1.0 reward of each (image, prompt) pair (z-scored on the authors' data: about -2 to 2).

    weights: hub repo id (default `THUDM/ImageReward`), a local folder holding ImageReward.pt (or
      .safetensors) and med_config.json, or the checkpoint file itself (med_config.json beside it).
    tokenizer: a BertTokenizer folder or hub id; default the weights folder's `tokenizer/`, else bert-base-uncased.
    dtype: compute dtype. Weights stay float32; a half dtype runs the encoders under autocast, the MLP in fp32.
    """

    name = "imagereward"
    default_weights = DEFAULT_WEIGHTS
    higher_is_better = True

    def __init__(
        self,
        weights: str | Path | None = None,
        tokenizer: str | Path | None = None,
        batch_size: int = 16,
        device: str = "auto",
        dtype=None,
    ) -> None:
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        weights = weights or DEFAULT_WEIGHTS
        checkpoint, med_path = resolve_files(weights)
        self.version = f"{weights}:{checkpoint.name}"
        med_config = json.loads(med_path.read_text())
        vision_path = checkpoint.parent / VISION_CONFIG
        vision = {**VIT_LARGE, **json.loads(vision_path.read_text())} if vision_path.exists() else dict(VIT_LARGE)
        self.vision, self.text, self.mlp = build_model(med_config, vision)
        parts = split_state_dict(read_state_dict(checkpoint), vision["depth"], checkpoint)
        for module, state, what in zip((self.vision, self.text, self.mlp), parts, ("vision", "text", "MLP")):
            load_strict(module, state, what, checkpoint)
        for module in (self.vision, self.text, self.mlp):
            module.eval().to(self.device)
        self.image_size = vision["image_size"]
        if tokenizer is None:
            beside = checkpoint.parent / TOKENIZER_SUBFOLDER
            tokenizer = beside if beside.is_dir() else DEFAULT_TOKENIZER
        self.tokenizer = load_tokenizer(tokenizer)
        if len(self.tokenizer) > med_config["vocab_size"]:
            raise PrefpipeError(
                f"tokenizer {tokenizer} has {len(self.tokenizer)} tokens but {med_path} says vocab_size "
                f"{med_config['vocab_size']}: use the tokenizer the weights were trained with"
            )

    def prepare_batch(self, images: list[Image.Image], prompts: list[str]) -> dict:
        import torch

        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt")
        return {"pixels": torch.stack([imagereward_preprocess(im, self.image_size) for im in images]),
                "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def forward_batch(self, inputs: dict):
        import torch

        pixels = inputs["pixels"].to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            image_embeds = self.vision(pixel_values=pixels).last_hidden_state
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            text = self.text(
                input_ids=inputs["input_ids"].to(self.device),
                attention_mask=inputs["attention_mask"].to(self.device),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                is_decoder=False,
            ).last_hidden_state
        features = text[:, 0, :].float()
        return ((self.mlp(features) - REWARD_MEAN) / REWARD_STD).squeeze(-1)
