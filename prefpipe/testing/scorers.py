"""Tiny scorer checkpoints: the real architectures with small widths and seeded random weights, saved in the
real on-disk formats, so tests and the demo load them through the same code path as the real weights.

    write_tiny_scorer("pickscore", "tiny/pickscore")  -> folder: CLIPModel + preprocessor + tokenizer
    write_tiny_scorer("hpsv2", "tiny/hpsv2")          -> folder: HPS_v2.1_compressed.pt + open_clip_config.json
    write_tiny_scorer("clip", "tiny/clip")            -> folder: open_clip hub format (or flavour="transformers")
    write_tiny_scorer("aesthetic", "tiny/aesthetic")  -> folder: sac+logos+ava1-l14-linearMSE.pth + clip/
    write_tiny_scorer("imagereward", "tiny/ir")       -> folder: ImageReward.pt + med_config.json (+ vision_config.json,
                                                         tokenizer/: a BERT WordPiece trained on PartiPrompts)
    write_tiny_scorer("hpsv3", "tiny/hpsv3")          -> folder: HPSv3.safetensors + base/ (a tiny Qwen2-VL config and
                                                         processor: byte-level BPE on PartiPrompts, Qwen2-VL's specials)

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

TINY_KINDS = ("pickscore", "hpsv2", "clip", "aesthetic", "imagereward", "hpsv3")
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


# ImageReward: BLIP's ViT shrunk (224 px input and patch 16 kept); the BERT text encoder keeps width 768, the
# input width of the package's fixed MLP(768), with 2 layers.
TINY_IMAGEREWARD_VISION = {"image_size": 224, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2,
                           "mlp_ratio": 4.0}
TINY_IMAGEREWARD_TEXT_LAYERS = 2
BERT_WORDPIECE_VOCAB = 1000
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_bert_tokenizer(folder: str | Path, texts: list[str] | None = None, vocab_size: int = BERT_WORDPIECE_VOCAB) -> Path:
    """A real BERT uncased WordPiece tokenizer trained offline (with `tokenizers`) on PartiPrompts, saved as
    `BertTokenizer.from_pretrained` reads it: `vocab.txt` + `tokenizer_config.json` (lower-casing, accents
    stripped, 512 tokens). bert-base-uncased's own vocabulary (30,522) cannot be had offline; this one is smaller,
    with the same special tokens and `##` continuation pieces. Deterministic for the same texts."""
    from tokenizers import BertWordPieceTokenizer

    from prefpipe.core.tokenizer import parti_prompt_texts

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    tokenizer.train_from_iterator(parti_prompt_texts() if texts is None else texts, vocab_size=vocab_size,
                                  min_frequency=1, special_tokens=BERT_SPECIAL, show_progress=False)
    tokenizer.save_model(str(folder))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "strip_accents": None,
              "tokenize_chinese_chars": True, "model_max_length": 512, "unk_token": "[UNK]", "sep_token": "[SEP]",
              "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def _write_imagereward(out: Path, seed: int) -> Path:
    """The package's format: ImageReward.pt (a state dict under the package's module names, as on the hub) and
    med_config.json (BLIP's BERT config, tiny), plus prefpipe's vision_config.json and tokenizer/ folder."""
    import torch

    from labelers.imagereward import (
        CHECKPOINT,
        MED_CONFIG,
        TOKENIZER_SUBFOLDER,
        VISION_CONFIG,
        build_model,
        load_tokenizer,
        vision_keys,
    )

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(write_bert_tokenizer(out / TOKENIZER_SUBFOLDER))
    med = {  # BLIP's configs/med_config.json with the tiny sizes
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 256,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": TINY_IMAGEREWARD_TEXT_LAYERS, "pad_token_id": 0, "type_vocab_size": 2,
        "vocab_size": len(tokenizer), "encoder_width": TINY_IMAGEREWARD_VISION["embed_dim"], "add_cross_attention": True,
    }
    torch.manual_seed(seed)
    vision, text, mlp = build_model(med, TINY_IMAGEREWARD_VISION)
    for i, module in enumerate((vision, text, mlp)):
        randomize_(module, seed + i)
    to_theirs = {ours: theirs for theirs, ours in vision_keys(TINY_IMAGEREWARD_VISION["depth"]).items()}
    state = {f"blip.visual_encoder.{to_theirs[k]}": v for k, v in vision.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"]).expand((1, -1))
    generator = torch.Generator().manual_seed(seed + 3)  # BLIP's contrastive projections: in the file, unused
    for name, width in (("vision_proj", TINY_IMAGEREWARD_VISION["embed_dim"]), ("text_proj", med["hidden_size"])):
        state[f"blip.{name}.weight"] = torch.randn(256, width, generator=generator) / math.sqrt(width)
        state[f"blip.{name}.bias"] = torch.zeros(256)
    state.update({f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()})
    torch.save({k: v.contiguous() for k, v in state.items()}, out / CHECKPOINT)
    (out / MED_CONFIG).write_text(json.dumps(med, indent=2))
    (out / VISION_CONFIG).write_text(json.dumps(TINY_IMAGEREWARD_VISION, indent=2))
    return out


# Qwen2-VL-7B-Instruct's special tokens (ids 151643-151656 there, after the BPE vocabulary here) and chat template.
QWEN2_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen/Qwen2-VL-7B-Instruct's preprocessor_config.json
QWEN2_VL_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                         "merge_size": 2, "image_mean": OPENAI_MEAN, "image_std": OPENAI_STD,
                         "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
QWEN_BPE_VOCAB = 1000
# Qwen/Qwen2-VL-7B-Instruct's config.json, the sizes (HPSv3's backbone): used to plan and refuse, never built here.
QWEN2_VL_7B = {
    "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "vocab_size": 152064,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4},
}
# Qwen2-VL's structure shrunk: the vision tower keeps 14 px patches, 2x2 merge and 2-frame patches.
TINY_QWEN2_VL_VISION = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 4, "patch_size": 14,
                        "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "quick_gelu"}
TINY_QWEN2_VL_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}}


def write_qwen2_vl_processor(folder: str | Path, texts: list[str] | None = None, vocab_size: int = QWEN_BPE_VOCAB) -> Path:
    """A Qwen2-VL processor folder that `AutoProcessor.from_pretrained` loads offline: a byte-level BPE trained
    with `tokenizers` on PartiPrompts (Qwen2's pre-tokenizer regex and NFC, vocabulary `vocab_size`) with
    Qwen2-VL's special tokens added after it, Qwen2-VL-7B-Instruct's chat template and image processor config."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        AutoProcessor,
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from prefpipe.core.tokenizer import parti_prompt_texts

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    qwen2_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen2_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(parti_prompt_texts() if texts is None else texts, trainer)
    bpe.add_special_tokens(QWEN2_VL_SPECIAL)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        model_max_length=32768, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    image_processor = Qwen2VLImageProcessor(**{k: v for k, v in QWEN2_VL_PREPROCESSOR.items()
                                               if k not in ("image_processor_type", "processor_class")})
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=QWEN2_VL_CHAT_TEMPLATE).save_pretrained(folder)
    AutoProcessor.from_pretrained(folder)  # fail here, not in the scorer, if the folder does not load
    return folder


def _write_hpsv3(out: Path, seed: int) -> Path:
    """HPSv3's format: one HPSv3.safetensors holding the whole reward model under transformers 4.45 names
    (`model.*` decoder, `visual.*`, `lm_head.*`, `rm_head.{0,3,5}.*`, embeddings resized for `<|Reward|>`), and
    base/: the tiny Qwen2-VL's config.json and processor, as `Qwen/Qwen2-VL-7B-Instruct` is for the real one."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from labelers.hpsv3 import BASE_SUBFOLDER, CHECKPOINT, REWARD_TOKEN

    base = out / BASE_SUBFOLDER
    write_qwen2_vl_processor(base)
    tokenizer = AutoProcessor.from_pretrained(base).tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL}
    config = Qwen2VLConfig(
        vision_config={**TINY_QWEN2_VL_VISION, "hidden_size": TINY_QWEN2_VL_TEXT["hidden_size"]},
        text_config={**TINY_QWEN2_VL_TEXT, "vocab_size": len(tokenizer), "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    config.save_pretrained(base)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # as hpsv3/train.py does (its rows redrawn below)
    randomize_(model, seed)
    hidden = TINY_QWEN2_VL_TEXT["hidden_size"]
    head = torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    randomize_(head, seed + 1)
    state = {}
    for key, value in model.state_dict().items():  # transformers 5 names -> the 4.45 names HPSv3 saved
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("model.visual."):
            key = key.removeprefix("model.")
        state[key] = value
    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / CHECKPOINT))
    return out


def write_tiny_scorer(kind: str, out_dir: str | Path, seed: int = 0, flavour: str = "open_clip") -> Path:
    """Write a tiny checkpoint for scorer `kind` into `out_dir`; returns the path to pass as its weights.

    kind: pickscore | hpsv2 | clip | aesthetic | imagereward | hpsv3. flavour (clip only): "open_clip" (the default backend,
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
    if kind == "imagereward":
        return _write_imagereward(out, seed)
    if kind == "hpsv3":
        out.mkdir(parents=True, exist_ok=True)
        return _write_hpsv3(out, seed)
    if flavour == "transformers":
        return _write_hf_clip(out, seed, hidden_act="quick_gelu", logit_scale=math.log(1 / 0.07))
    return _write_open_clip(out, TINY_OPEN_CLIP_H, seed)
