"""The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor): a linear MLP on
L2-normalised OpenAI CLIP ViT-L/14 image embeddings, trained on SAC + LAION-logos + AVA ratings (1-10 scale).

Reference (`simple_inference.py`): `clip.load("ViT-L/14")` with OpenAI's preprocessing (resize the PIL image,
shortest side to 224 bicubic, centre crop 224, then convert to RGB, OpenAI mean/std), `encode_image`,
divide by the L2 norm (a zero norm stays as is), then the MLP 768-1024-128-64-16-1 whose layers are
`Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear` with no activations. open_clip's
`ViT-L-14-quickgelu` with the `openai` tag is the same network with the same transform. The prompt is unused.

The MLP checkpoint `sac+logos+ava1-l14-linearMSE.pth` was saved from CUDA: it is read onto the CPU with
`weights_only=True`. The MLP always runs in float32, as in the reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from labelers.base import TorchScorer, hub_file, is_local, require_hub_id
from labelers.clip import load_open_clip
from prefpipe.core.errors import PrefpipeError

MLP_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_WEIGHTS = (
    f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{MLP_FILENAME}"
)
DEFAULT_CLIP = "ViT-L-14-quickgelu"
DEFAULT_CLIP_PRETRAINED = "openai"
CLIP_SUBFOLDER = "clip"  # in a local weights folder: the open_clip model (open_clip_config.json + weights)


class AestheticMLP(torch.nn.Module):
    """The predictor's MLP: `layers` = Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear,
    no activations (state dict keys layers.0/2/4/6/7), input_size -> 1."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        nn = torch.nn
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, input_size) L2-normalised embeddings -> (B, 1) scores."""
        return self.layers(embedding)


def load_mlp_state(weights: str | Path) -> dict:
    """The MLP's state dict from a URL, a local file, a local folder holding MLP_FILENAME, or a hub repo id."""
    weights = str(weights)
    if weights.startswith(("https://", "http://")):
        try:
            state = torch.hub.load_state_dict_from_url(
                weights, map_location="cpu", weights_only=True, file_name=MLP_FILENAME
            )
        except Exception as err:  # offline: say how to pass the file
            raise PrefpipeError(
                f"could not download {weights} ({err}); pass a local copy as the weights"
            ) from err
    else:
        path = Path(weights).expanduser()
        if is_local(path):
            path = path / MLP_FILENAME if path.is_dir() else path
            if not path.exists():
                raise PrefpipeError(f"{path.parent} holds no {MLP_FILENAME}")
        else:
            path = hub_file(require_hub_id(weights, "aesthetic weights"), MLP_FILENAME)
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    # Lightning checkpoints of the same MLP prefix every key with the module name.
    return {k.removeprefix("model."): v for k, v in state.items()}


class AestheticScore(TorchScorer):
    """LAION aesthetic score of each image (roughly 1-10; the prompt is ignored).

    weights: the MLP checkpoint: URL (default: the predictor's GitHub file), local `.pth` file, hub repo id
      holding `sac+logos+ava1-l14-linearMSE.pth`, or a local folder holding that file (and, optionally, a
      `clip/` open_clip model folder that then replaces the default CLIP).
    clip_model / clip_pretrained: the open_clip image encoder (default ViT-L-14-quickgelu / openai).
    dtype: CLIP weights and compute dtype (default fp16 on CUDA, as `clip.load` does, fp32 on CPU).
    """

    name = "aesthetic"
    default_weights = DEFAULT_WEIGHTS
    higher_is_better = True

    def __init__(
        self,
        weights: str | Path | None = None,
        clip_model: str | Path | None = None,
        clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        batch_size: int = 16,
        device: str = "auto",
        dtype=None,
    ) -> None:
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        weights = str(weights or DEFAULT_WEIGHTS)
        if clip_model is None:
            bundled = Path(weights).expanduser() / CLIP_SUBFOLDER
            clip_model = (
                bundled
                if is_local(weights) and (bundled / "open_clip_config.json").exists()
                else DEFAULT_CLIP
            )
        self.clip, self.preprocess, _ = load_open_clip(clip_model, clip_pretrained)
        self.clip.eval().to(self.device, self.dtype)
        state = load_mlp_state(weights)
        self.mlp = AestheticMLP(state["layers.0.weight"].shape[1])
        self.mlp.load_state_dict(state)
        self.mlp.eval().to(self.device)
        self.version = f"{weights} (clip {clip_model}" + (
            f"/{clip_pretrained})" if clip_model == DEFAULT_CLIP else ")"
        )

    def prepare_batch(self, images: list[Image.Image], prompts: list[str]) -> dict:
        return {"pixels": torch.stack([self.preprocess(im) for im in images])}

    def forward_batch(self, inputs: dict):
        pixels = inputs["pixels"].to(self.device, self.dtype)
        embedding = self.clip.encode_image(pixels).float()
        norm = torch.linalg.vector_norm(embedding, dim=-1, keepdim=True)
        embedding = embedding / torch.where(norm == 0, torch.ones_like(norm), norm)
        return self.mlp(embedding).squeeze(-1)
