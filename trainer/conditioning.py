"""What the UNet is conditioned on, for SD 1.x/2.x and SDXL, in one place.

- **SD 1.x/2.x**: one CLIP text encoder; the conditioning is its last hidden state (after the final layer
  norm), ``(B, 77, D)``, exactly as ``StableDiffusionPipeline.encode_prompt`` without ``clip_skip``.
- **SDXL**: two text encoders; the penultimate hidden states of both are concatenated,
  ``(B, 77, D1 + D2)``, and the pooled projection of the second (``text_embeds``, ``(B, P)``) goes to the
  added embedding together with six micro-conditioning numbers per image, ``time_ids (B, 6)`` =
  ``(original height, original width, crop top, crop left, target height, target width)``, as in
  ``StableDiffusionXLPipeline`` and diffusers' ``train_diffusion_dpo_sdxl.py`` (which, unlike the paper's
  ``train.py``, passes each image's real original size and crop).
- **Caption dropout** replaces a caption by the *unconditional* embedding the pipeline itself uses for
  classifier-free guidance: ``encode("")`` for SD 1.x, and zeros (prompt and pooled) for SDXL pipelines with
  ``force_zeros_for_empty_prompt`` (SDXL base), so training teaches the unconditional branch the model
  actually samples with. (The paper's ``train.py`` encodes ``""`` for SDXL too; diffusers' DPO scripts have
  no caption dropout.)
- **SD3.x**: as ``StableDiffusion3Pipeline.encode_prompt`` (clip_skip None): the penultimate hidden states of
  both CLIP encoders concatenated, ``(B, 77, D1 + D2)``, zero-padded to T5's width and followed by T5's last
  hidden state, ``(B, 77 + L, D_t5)``; pooled = both CLIP projections concatenated, ``(B, P1 + P2)``. L is
  `max_sequence_length` (the pipeline's 256). Dropped captions use ``encode("")`` (the pipeline's negative prompt).
- **FLUX.1**: as ``FluxPipeline.encode_prompt``: T5's last hidden state ``(B, L, D_t5)`` (L: 512) and the CLIP
  text model's pooled output ``(B, 768)``; the text ids are zeros ``(L, 3)``, made at the call
  (`trainer/flow.py`). Dropped captions use ``encode("")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefpipe.core.errors import PrefpipeError

T5_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch of captions."""

    prompt_embeds: Tensor  # (B, 77, D): encoder_hidden_states (SD3: (B, 77 + L, D_t5); FLUX: (B, L, D_t5))
    pooled: Tensor | None  # (B, P): SDXL's text_embeds, SD3/FLUX's pooled projections; None for SD 1.x/2.x

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return PromptEmbeds(self.prompt_embeds.to(device, dtype), pooled)


class TextConditioner:
    """The tokenizers and frozen text encoders of a pipeline, and its unconditional embedding.

    family: ``sd15`` (SD 1.x/2.x), ``sdxl``, ``sd3`` or ``flux`` (see ``prefpipe.models.model_family``).
    max_sequence_length: T5 tokens per caption for sd3/flux (None: the pipeline's default).
    """

    def __init__(self, pipe, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int | None = None):
        from prefpipe.models import model_family

        self.family = model_family(pipe)
        if self.family not in ("sd15", "sdxl", "sd3", "flux"):
            raise PrefpipeError(
                f"{type(pipe).__name__}: prefpipe train supports SD 1.x/2.x, SDXL, SD3.x and FLUX.1 pipelines"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length or T5_LENGTH.get(self.family, 0)
        if self.family in ("sd3", "flux"):
            names = ("tokenizer", "tokenizer_2", "tokenizer_3") if self.family == "sd3" else ("tokenizer", "tokenizer_2")
            self.tokenizers = [getattr(pipe, n) for n in names]
            self.encoders = [getattr(pipe, n.replace("tokenizer", "text_encoder")) for n in names]
            if any(e is None for e in self.encoders):
                raise PrefpipeError(f"{type(pipe).__name__}: training needs every text encoder, T5 included")
            self.force_zeros = False
        elif self.family == "sdxl":
            self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
            self.encoders = [pipe.text_encoder, pipe.text_encoder_2]
            self.force_zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        else:
            self.tokenizers = [pipe.tokenizer]
            self.encoders = [pipe.text_encoder]
            self.force_zeros = False
        for enc in self.encoders:
            enc.requires_grad_(False).eval().to(self.device, dtype)
        self._empty: PromptEmbeds | None = None

    def _t5(self, tokenizer, encoder, captions: list[str]) -> Tensor:
        ids = tokenizer(captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(self.device))[0]

    def _flow(self, captions: list[str]) -> PromptEmbeds:
        """SD3 / FLUX conditioning (see the module docstring)."""
        *clips, t5 = list(zip(self.tokenizers, self.encoders))
        hidden, pooled = [], []
        for tokenizer, encoder in clips:
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=self.family == "sd3")
            pooled.append(out[0] if self.family == "sd3" else out.pooler_output)  # text_embeds / pooled output
            if self.family == "sd3":
                hidden.append(out.hidden_states[-2])
        t5_embeds = self._t5(*t5, captions)
        if self.family == "flux":
            return PromptEmbeds(t5_embeds, pooled[0])
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return PromptEmbeds(torch.cat([clip, t5_embeds], dim=-2), torch.cat(pooled, dim=-1))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> PromptEmbeds:
        """Captions -> conditioning, computed in the encoders' dtype. Shapes as in :class:`PromptEmbeds`."""
        if self.family in ("sd3", "flux"):
            return self._flow(captions)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(
                captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            )
            if self.family == "sd15":
                use_mask = getattr(encoder.config, "use_attention_mask", False)
                mask = ids.attention_mask.to(self.device) if use_mask else None
                hidden.append(encoder(ids.input_ids.to(self.device), attention_mask=mask)[0])
            else:
                out = encoder(ids.input_ids.to(self.device), output_hidden_states=True)
                if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (the last one wins)
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)
        if self.family == "sdxl" and pooled is None:
            raise PrefpipeError("SDXL pipeline: the second text encoder gives no pooled projection (text_embeds)")
        return PromptEmbeds(embeds, pooled)

    def empty(self) -> PromptEmbeds:
        """The unconditional embedding used for dropped captions, batch 1 (see the module docstring)."""
        if self._empty is None:
            e = self.encode([""])
            if self.force_zeros:
                e = PromptEmbeds(torch.zeros_like(e.prompt_embeds), torch.zeros_like(e.pooled))
            self._empty = e
        return self._empty

    def free(self) -> None:
        """Drop the encoders (after caching, training needs only :meth:`empty`, computed here first)."""
        self.empty()
        self.encoders = []


def time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: tuple[int, int]) -> Tensor:
    """SDXL micro-conditioning, one row per image.

    original_size: ``(B, 2)`` (height, width) of each image as stored; crop_top_left: ``(B, 2)`` (top, left)
    of the crop in the resized image; target_size: (height, width) trained at. Returns ``(B, 6)`` float32.
    """
    b = original_size.shape[0]
    target = torch.tensor(target_size, dtype=torch.float32).expand(b, 2)
    return torch.cat([original_size.float(), crop_top_left.float(), target], dim=1)


def unet_kwargs(embeds: PromptEmbeds, add_time_ids: Tensor | None) -> dict:
    """Keyword arguments of ``UNet2DConditionModel.forward`` besides the sample and the timestep."""
    kwargs: dict = {"encoder_hidden_states": embeds.prompt_embeds}
    if embeds.pooled is not None:
        if add_time_ids is None:
            raise ValueError("SDXL conditioning needs time_ids")
        kwargs["added_cond_kwargs"] = {"text_embeds": embeds.pooled, "time_ids": add_time_ids}
    return kwargs
