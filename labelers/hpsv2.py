"""HPS v2 / v2.1 (Wu et al., 2023): an OpenCLIP ViT-H/14 fine-tuned on Human Preference Dataset v2.

Reference (github.com/tgxs002/HPSv2, `hpsv2/img_score.py`): the checkpoint's `state_dict` loaded into
open_clip ViT-H-14; `score = <normalised image features, normalised text features>`, a plain cosine
(no logit scale), about 0.2-0.35 for real images.

Preprocessing is HPS's own, not open_clip's default, and is reproduced step for step:
convert to RGB, to a float tensor in [0, 1], resize the *tensor* so the longest side is 224 (bicubic,
antialiased, unclamped, sizes rounded with Python's `round`), zero-pad to 224x224 (left/top get the
smaller half), normalise with the OpenAI mean/std. Two departures, both where the reference cannot run:
RGBA images are scored on their RGB channels (the reference keeps the alpha channel and the model rejects
the 4-channel tensor), and an image whose longest side is already 224 is still padded to a square.

The architecture is built without downloading the LAION weights (`pretrained=None`); the HPS checkpoint
is then read with `torch.load(..., weights_only=True)` (or safetensors), so loading runs no pickled code.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from PIL import Image

from labelers.base import TorchScorer, hub_file, is_local, require_hub_id
from prefpipe.core.errors import PrefpipeError

DEFAULT_WEIGHTS = "xswu/HPSv2"
DEFAULT_ARCH = "ViT-H-14"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ARCH_CONFIG = "open_clip_config.json"  # beside a local checkpoint: the open_clip architecture to build
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def hps_preprocess(image: Image.Image, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD):
    """One PIL image -> float32 tensor (3, size, size), exactly as HPS's `ResizeMaxSize` pipeline."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = TF.to_tensor(image.convert("RGB"))
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = [round(height * scale), round(width * scale)]
        x = TF.resize(x, new_size, InterpolationMode.BICUBIC)
    pad_h, pad_w = size - x.shape[1], size - x.shape[2]
    x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, mean, std)


def resolve_checkpoint(weights: str | Path, version: str) -> Path:
    """Local `.pt`/`.safetensors` file, local folder holding the version's file, or hub repo id -> local file."""
    if version not in CHECKPOINTS:
        raise PrefpipeError(f"unknown HPS version {version!r}: use one of {', '.join(CHECKPOINTS)}")
    filename = CHECKPOINTS[version]
    if is_local(weights):
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / filename
            if not path.exists():
                raise PrefpipeError(f"{path.parent} holds no {filename} (the HPS {version} checkpoint)")
        return path
    return hub_file(require_hub_id(str(weights), "HPS weights"), filename)


def read_arch_config(arch: str | dict | Path | None, checkpoint: Path) -> str | dict:
    """The open_clip architecture: a built-in name, a model config dict, or a json file/folder holding one.

    None means `open_clip_config.json` beside the checkpoint when there is one (tiny test models), else ViT-H-14.
    """
    if arch is None:
        beside = checkpoint.parent / ARCH_CONFIG
        arch = beside if beside.exists() else DEFAULT_ARCH
    if isinstance(arch, dict):
        return arch.get("model_cfg", arch)
    path = Path(arch)
    if path.is_dir():
        path = path / ARCH_CONFIG
    if path.suffix == ".json" and path.exists():
        config = json.loads(path.read_text())
        return config.get("model_cfg", config)
    return str(arch)


def build_open_clip(arch: str | dict):
    """(model, tokenizer) of an open_clip architecture with random weights: nothing is downloaded."""
    import open_clip

    if isinstance(arch, str) and arch not in open_clip.list_models():
        raise PrefpipeError(f"unknown open_clip architecture {arch!r}; pass a built-in name or a config")
    # open_clip logs "initialized randomly" warnings here; the weights are loaded right after, so mute them.
    logging.disable(logging.WARNING)
    try:
        if isinstance(arch, str):
            return open_clip.create_model(arch, pretrained=None), open_clip.get_tokenizer(arch)
        # A config dict goes through open_clip's own builder via its local-folder schema (config, no weights).
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / ARCH_CONFIG).write_text(json.dumps({"model_cfg": arch}))
            name = f"local-dir:{folder}"
            return open_clip.create_model(name, load_weights=False), open_clip.get_tokenizer(name)
    finally:
        logging.disable(logging.NOTSET)


def load_state_dict(path: Path) -> dict:
    """A checkpoint's tensors, from `{"state_dict": ...}` or a bare state dict; never unpickles code."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


class HPSv2(TorchScorer):
    """HPS v2/v2.1 score of each (image, prompt) pair: cosine of normalised CLIP features.

    weights: hub repo id (default `xswu/HPSv2`), a local folder holding the version's checkpoint file,
      or the checkpoint file itself.
    version: "v2.1" (HPS_v2.1_compressed.pt, default) or "v2.0" (HPS_v2_compressed.pt).
    arch: open_clip architecture (built-in name, config dict, or json path); default: the
      `open_clip_config.json` beside a local checkpoint if any, else ViT-H-14.
    dtype: compute dtype. Weights stay float32; a half dtype runs under autocast, as the reference's
      `precision='amp'` does on GPU.
    """

    name = "hpsv2"
    default_weights = DEFAULT_WEIGHTS
    higher_is_better = True

    def __init__(
        self,
        weights: str | Path | None = None,
        version: str = "v2.1",
        arch: str | dict | Path | None = None,
        batch_size: int = 16,
        device: str = "auto",
        dtype=None,
    ) -> None:
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        weights = weights or DEFAULT_WEIGHTS
        checkpoint = resolve_checkpoint(weights, version)
        self.version = f"{weights}:{checkpoint.name}"
        self.model, self.tokenizer = build_open_clip(read_arch_config(arch, checkpoint))
        self.model.load_state_dict(load_state_dict(checkpoint), strict=True)
        self.model.eval().to(self.device)
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size

    def prepare_batch(self, images: list[Image.Image], prompts: list[str]) -> dict:
        import torch

        return {"pixels": torch.stack([hps_preprocess(im, self.image_size) for im in images]),
                "tokens": self.tokenizer(prompts)}

    def forward_batch(self, inputs: dict):
        import torch

        pixels, tokens = inputs["pixels"], inputs["tokens"]
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            image_features = self.model.encode_image(pixels.to(self.device), normalize=True)
            text_features = self.model.encode_text(tokens.to(self.device), normalize=True)
            return (image_features * text_features).sum(dim=-1)
