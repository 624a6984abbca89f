"""PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

Reference (github.com/yuvalkirstain/PickScore, README): transformers `CLIPModel`
`yuvalkirstain/PickScore_v1` with the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`;

    score = logit_scale.exp() * cos(text_embedding, image_embedding)

Images go through CLIP's PIL preprocessing (`convert("RGB")`, which drops alpha, then shortest side to
224 with PIL bicubic, centre crop at floor((side - 224) / 2), scale to [0, 1], OpenAI mean/std): the
numbers the reference's 2023 transformers processor produced. transformers 5 would pick a torchvision
backend and composite transparency onto white, so the PIL backend is forced and images are converted
first. Text is tokenized with padding to the longest prompt, truncated at 77 tokens.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from labelers.base import TorchScorer, drop_alpha, from_pretrained, is_local, load_clip_processing, projected

DEFAULT_WEIGHTS = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(TorchScorer):
    """PickScore of each (image, prompt) pair: `logit_scale.exp() * cos`, about 18-23 for real images.

    weights: hub id or local folder of a transformers `CLIPModel` (default `yuvalkirstain/PickScore_v1`).
    processor: hub id or folder with the image processor config and tokenizer; default: the weights
      folder when it holds `preprocessor_config.json`, else `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.
    dtype: model weights and compute dtype (default fp16 on CUDA, fp32 on CPU; the reference ran fp32).
    """

    name = "pickscore"
    default_weights = DEFAULT_WEIGHTS
    higher_is_better = True

    def __init__(
        self,
        weights: str | Path | None = None,
        processor: str | Path | None = None,
        batch_size: int = 16,
        device: str = "auto",
        dtype=None,
    ) -> None:
        from transformers import CLIPModel

        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        weights = str(weights or DEFAULT_WEIGHTS)
        if processor is None:
            local_processor = is_local(weights) and (Path(weights) / "preprocessor_config.json").exists()
            processor = weights if local_processor else DEFAULT_PROCESSOR
        self.version = f"{weights} (processor {processor})"
        self.model = from_pretrained(CLIPModel, weights, "PickScore model").eval().to(self.device, self.dtype)
        self.image_processor, self.tokenizer = load_clip_processing(str(processor))

    def prepare_batch(self, images: list[Image.Image], prompts: list[str]) -> dict:
        pixels = self.image_processor(images=drop_alpha(images), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return {"pixels": pixels, "text": text}

    def forward_batch(self, inputs: dict):
        import torch

        pixels, text = inputs["pixels"], inputs["text"]
        image_emb = projected(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        text_emb = projected(
            self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            )
        )
        image_emb = image_emb / torch.norm(image_emb, dim=-1, keepdim=True)
        text_emb = text_emb / torch.norm(text_emb, dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (text_emb * image_emb).sum(dim=-1)
