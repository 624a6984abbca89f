"""The scorer protocol and what every model-backed scorer shares: device, dtype, batching, weights lookup.

A scorer turns images and their prompts into one float per image:

    scores = scorer.score(images, prompts)   # list[PIL.Image] (N), list[str] (N) -> float32 array, shape (N,)

Scores of one scorer are comparable only with each other; `higher_is_better` says which way is preferred
(every scorer here is higher-is-better: compressibility carries its sign in the value).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from prefpipe.core.errors import PrefpipeError


@runtime_checkable
class Scorer(Protocol):
    """What the label stage needs from a scorer."""

    name: str
    version: str
    higher_is_better: bool

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """One float32 score per (image, prompt) pair, shape (N,)."""
        ...


def check_inputs(images: list[Image.Image], prompts: list[str]) -> None:
    """Stop with a clear message when images and prompts do not pair up one to one."""
    if len(images) != len(prompts):
        raise PrefpipeError(f"got {len(images)} images but {len(prompts)} prompts: pass one prompt per image")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_local(location: str | Path) -> bool:
    """True when `location` names an existing file or folder on this machine."""
    return Path(location).expanduser().exists()


def require_hub_id(location: str, what: str) -> str:
    """`location` is not a local path: it must look like a hub id ('org/name'), else say what is missing."""
    if not _HUB_ID.match(str(location)):
        raise PrefpipeError(
            f"{what} {location!r} is neither an existing file or folder nor a hub id (org/name)"
        )
    return str(location)


def hub_file(repo_id: str, filename: str) -> Path:
    """Download (or find in the local cache) one file of a hub repo; a PrefpipeError says how to go offline."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:  # offline, missing repo or file: one message, with the way out
        raise PrefpipeError(
            f"could not get {filename!r} from hub repo {repo_id!r} ({type(err).__name__}: {err}); "
            "download it where the hub is reachable and pass its local path as the weights"
        ) from err


def from_pretrained(cls, location: str, what: str, **kwargs):
    """`cls.from_pretrained(location)` for a local folder or hub id, with a PrefpipeError on failure."""
    if not is_local(location):
        require_hub_id(location, what)
    try:
        return cls.from_pretrained(
            str(Path(location).expanduser()) if is_local(location) else location, **kwargs
        )
    except OSError as err:
        raise PrefpipeError(f"could not load {what} from {location!r}: {err}") from err


class BaseScorer(ABC):
    """The documented base of a scorer, built-in or plugin: what `prefpipe label --scorer NAME` relies on.

    A subclass sets three class attributes and implements one method:

        class Brightness(BaseScorer):
            name = "brightness"            # the name it is registered under (entry point name for a plugin)
            higher_is_better = True        # which way is preferred
            default_weights = None         # hub id or path used when no --weights is given (None: no weights)

            def score_batch(self, images, prompts):   # at most `batch_size` pairs -> B floats
                return [np.asarray(im.convert("L")).mean() / 255 for im in images]

    The constructor is called as `cls(weights=..., batch_size=..., device=..., dtype=...)` (`weights` None
    means `default_weights`; `device`/`dtype` are the CLI's strings, "auto" and None by default) and sets
    `self.weights` (where the weights are) and `self.version` (default: "NAME:WEIGHTS", or the class's
    `version` attribute if it has one; it is recorded in every scores dataset, so make it identify the
    weights). `score` checks the inputs, cuts them into batches and checks that each batch gives one finite
    float per image. To register a plugin, name the class in the package's entry points:

        [project.entry-points."prefpipe.scorers"]
        brightness = "my_package.scorers:Brightness"

    `prefpipe scorers` then lists it with the distribution and version that registered it.
    """

    name: str
    version: str
    higher_is_better: bool = True
    default_weights: str | None = None

    def __init__(self, weights: str | Path | None = None, batch_size: int = 32, device: str = "auto",
                 dtype=None) -> None:
        if batch_size < 1:
            raise PrefpipeError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        chosen = weights if weights not in (None, "") else self.default_weights
        self.weights = None if chosen is None else str(chosen)
        if not hasattr(self, "version"):  # a class attribute `version` wins
            self.version = f"{self.name}:{self.weights}" if self.weights else self.name

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """Score N (image, prompt) pairs -> float32 array of shape (N,)."""
        check_inputs(images, prompts)
        out = []
        for i in range(0, len(images), self.batch_size):
            batch_images, batch_prompts = list(images[i : i + self.batch_size]), list(prompts[i : i + self.batch_size])
            values = np.asarray(self.score_batch(batch_images, batch_prompts), dtype=np.float32).reshape(-1)
            if values.shape != (len(batch_images),):
                raise PrefpipeError(
                    f"scorer {self.name!r} returned {values.size} scores for {len(batch_images)} images: "
                    "score_batch must give one float per image"
                )
            if not np.isfinite(values).all():
                raise PrefpipeError(f"scorer {self.name!r} returned a non-finite score (NaN or inf)")
            out.append(values)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    @abstractmethod
    def score_batch(self, images: list[Image.Image], prompts: list[str]):
        """At most `batch_size` (image, prompt) pairs -> one float per pair (a sequence or array of length B)."""


class TorchScorer(ABC):
    """Base of the model-backed scorers: resolves device/dtype and feeds the model `batch_size` pairs at a time.

    Subclasses set `name`, `version`, `higher_is_better` and implement two halves of a batch: `prepare_batch`
    (images and prompts of at most `batch_size` pairs -> the model's CPU inputs: the reference preprocessing
    and tokenization) and `forward_batch` (those inputs -> a tensor or array of shape (B,)). `score` prepares the
    next batches in worker threads (`prefpipe.core.background.default_workers`) while the model runs this one,
    so the accelerator waits on PIL as little as the CPU allows.
    """

    name: str
    version: str
    higher_is_better: bool = True
    default_weights: str | None = None  # hub id or path used when no weights are given

    def __init__(self, batch_size: int = 16, device: str = "auto", dtype=None) -> None:
        if batch_size < 1:
            raise PrefpipeError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        from prefpipe.core.devices import (  # torch, imported when a scorer is built
            resolve_device,
            resolve_dtype,
        )

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """Score N (image, prompt) pairs -> float32 array of shape (N,)."""
        import torch

        from prefpipe.core.background import default_workers, prefetch

        check_inputs(images, prompts)
        chunks = [(list(images[i : i + self.batch_size]), list(prompts[i : i + self.batch_size]))
                  for i in range(0, len(images), self.batch_size)]
        out = []
        for inputs in prefetch(chunks, lambda chunk: self.prepare_batch(*chunk), workers=default_workers(self.device)):
            with torch.inference_mode():
                batch = self.forward_batch(inputs)
            if isinstance(batch, torch.Tensor):
                batch = batch.detach().float().cpu().numpy()
            out.append(np.asarray(batch, dtype=np.float32).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    @abstractmethod
    def prepare_batch(self, images: list[Image.Image], prompts: list[str]) -> dict:
        """The model's inputs for one batch, on the CPU (runs in a background thread)."""

    @abstractmethod
    def forward_batch(self, inputs: dict):
        """Scores of one batch from `prepare_batch`'s inputs, shape (B,)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.version!r}, device={self.device}, dtype={self.dtype})"


def projected(output):
    """The projected embedding of a transformers CLIP `get_*_features` call.

    transformers < 5 returns the tensor itself; transformers 5 returns an output object whose
    `pooler_output` holds the projection.
    """
    return output if hasattr(output, "shape") else output.pooler_output


def load_clip_processing(location: str):
    """(image processor, tokenizer) of a hub-format CLIP folder or hub id.

    The image processor is forced onto transformers' PIL backend: the reference numbers were computed
    with PIL resizing, and transformers 5 would otherwise pick its torchvision backend.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    images = from_pretrained(AutoImageProcessor, location, "CLIP image processor", backend="pil")
    tokenizer = from_pretrained(AutoTokenizer, location, "CLIP tokenizer")
    return images, tokenizer


def drop_alpha(images: list[Image.Image]) -> list[Image.Image]:
    """`image.convert("RGB")` for every non-RGB image: alpha is dropped, grayscale replicated.

    This is what transformers' CLIP processor did when PickScore and torchmetrics' CLIPScore were
    published; transformers 5 composites transparent pixels onto white instead, so we convert first.
    """
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]
