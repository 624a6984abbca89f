"""CLIP score (Hessel et al., 2021, as torchmetrics computes it): `100 * max(cos(image, text), 0)`, in [0, 100].

Two model families, chosen by the weights location:
- open_clip (default: ViT-H-14 `laion2b_s32b_b79k`): a built-in architecture name plus `pretrained` tag or
  file, an `hf-hub:org/repo` / `local-dir:PATH` spec, or a local folder holding `open_clip_config.json`.
  Images go through the model's own open_clip eval transform (for CLIP models: shortest side to 224
  bicubic on the PIL image, centre crop, then RGB, OpenAI mean/std).
- transformers (torchmetrics' `CLIPScore`, e.g. `openai/clip-vit-large-patch14`): a hub id or a folder
  holding `config.json`; images go through the checkpoint's CLIP image processor (PIL backend), text is
  padded to the longest prompt and truncated at 77 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from PIL import Image

from labelers.base import TorchScorer, drop_alpha, from_pretrained, is_local, load_clip_processing, projected
from prefpipe.core.errors import PrefpipeError

DEFAULT_WEIGHTS = "ViT-H-14"
DEFAULT_PRETRAINED = "laion2b_s32b_b79k"
Backend = Literal["auto", "open_clip", "transformers"]


def open_clip_spec(weights: str | Path) -> str | None:
    """The open_clip model name for `weights`, or None when they are not an open_clip model."""
    import open_clip

    weights = str(weights)
    if weights.startswith(("hf-hub:", "local-dir:")) or weights in open_clip.list_models():
        return weights
    path = Path(weights).expanduser()
    if path.is_dir() and (path / "open_clip_config.json").exists():
        return f"local-dir:{path}"
    return None


def load_open_clip(weights: str | Path, pretrained: str | None):
    """(model, eval transform, tokenizer) of an open_clip model; `pretrained` counts only for built-in names."""
    import open_clip

    name = open_clip_spec(weights)
    if name is None:
        raise PrefpipeError(
            f"{weights!r} is not an open_clip model (built-in name, hf-hub:, or config folder)"
        )
    if name.startswith(("hf-hub:", "local-dir:")):
        pretrained = None  # the spec carries its weights
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except (RuntimeError, OSError, ValueError) as err:
        raise PrefpipeError(
            f"could not load open_clip model {name!r} (pretrained={pretrained!r}): {err}"
        ) from err
    return model, preprocess, open_clip.get_tokenizer(name)


class ClipScore(TorchScorer):
    """CLIP score of each (image, prompt) pair: `100 * max(cos, 0)`.

    weights: open_clip name / spec / folder, or transformers hub id / folder (see the module docstring).
    pretrained: open_clip tag or checkpoint file, used with a built-in open_clip name only.
    backend: "auto" picks from the weights; "open_clip" or "transformers" forces one.
    dtype: model weights and compute dtype (default fp16 on CUDA, fp32 on CPU).
    """

    name = "clip"
    default_weights = DEFAULT_WEIGHTS
    higher_is_better = True

    def __init__(
        self,
        weights: str | Path | None = None,
        pretrained: str | None = DEFAULT_PRETRAINED,
        backend: Backend = "auto",
        batch_size: int = 16,
        device: str = "auto",
        dtype=None,
    ) -> None:
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        weights = str(weights or DEFAULT_WEIGHTS)
        if backend == "auto":
            backend = "open_clip" if open_clip_spec(weights) is not None else "transformers"
        if backend == "open_clip":
            self.model, self.preprocess, self.tokenizer = load_open_clip(weights, pretrained)
            builtin = open_clip_spec(weights) == weights and ":" not in weights
            self.version = f"open_clip:{weights}" + (f"/{pretrained}" if builtin and pretrained else "")
        elif backend == "transformers":
            from transformers import CLIPModel

            if is_local(weights) and not (Path(weights) / "config.json").exists():
                raise PrefpipeError(
                    f"{weights} holds neither open_clip_config.json nor a transformers config.json"
                )
            self.image_processor, self.tokenizer = load_clip_processing(weights)
            self.model = from_pretrained(CLIPModel, weights, "CLIP model")
            self.version = f"transformers:{weights}"
        else:
            raise PrefpipeError(f"unknown CLIP backend {backend!r}: use auto, open_clip or transformers")
        self.backend = backend
        self.model.eval().to(self.device, self.dtype)

    def prepare_batch(self, images: list[Image.Image], prompts: list[str]) -> dict:
        import torch

        if self.backend == "open_clip":
            return {"pixels": torch.stack([self.preprocess(im) for im in images]), "tokens": self.tokenizer(prompts)}
        pixels = self.image_processor(images=drop_alpha(images), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return {"pixels": pixels, "text": text}

    def forward_batch(self, inputs: dict):
        import torch

        if self.backend == "open_clip":
            image_emb = self.model.encode_image(inputs["pixels"].to(self.device, self.dtype))
            text_emb = self.model.encode_text(inputs["tokens"].to(self.device))
        else:
            pixels, text = inputs["pixels"], inputs["text"]
            image_emb = projected(
                self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            )
            text_emb = projected(
                self.model.get_text_features(
                    input_ids=text["input_ids"].to(self.device),
                    attention_mask=text["attention_mask"].to(self.device),
                )
            )
        image_emb = image_emb / image_emb.norm(p=2, dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(p=2, dim=-1, keepdim=True)
        return torch.clamp(100 * (image_emb * text_emb).sum(dim=-1), min=0)
