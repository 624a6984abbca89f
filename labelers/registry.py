"""CLI name -> scorer class. Classes are imported on first use, so listing names never loads torch models.

scorer = build_scorer("pickscore")                          # hub default weights
scorer = build_scorer("hpsv2", weights="tiny/hpsv2", device="cpu")
"""

from __future__ import annotations

import importlib
from pathlib import Path

from labelers.base import Scorer
from prefpipe.core.errors import PrefpipeError

# name -> (module, class). Each class takes `weights` first, then `batch_size`, `device`, `dtype`.
SCORERS: dict[str, tuple[str, str]] = {
    "pickscore": ("labelers.pickscore", "PickScore"),
    "hpsv2": ("labelers.hpsv2", "HPSv2"),
    "clip": ("labelers.clip", "ClipScore"),
    "aesthetic": ("labelers.aesthetic", "AestheticScore"),
    "compressibility": ("labelers.compressibility", "Compressibility"),
    "incompressibility": ("labelers.compressibility", "Incompressibility"),
}


def scorer_names() -> list[str]:
    """The names `build_scorer` (and `prefpipe label --scorer`) accepts."""
    return list(SCORERS)


def scorer_class(name: str) -> type:
    """The class registered under `name`; an unknown name stops with the list of known ones."""
    if name not in SCORERS:
        raise PrefpipeError(f"unknown scorer {name!r}; known scorers: {', '.join(scorer_names())}")
    module, cls = SCORERS[name]
    return getattr(importlib.import_module(module), cls)


def build_scorer(name: str, weights: str | Path | None = None, **kwargs) -> Scorer:
    """Build scorer `name` from `weights` (hub id or local path; None = the scorer's real default).

    kwargs go to the scorer's constructor: `batch_size`, `device` ("auto"), `dtype` (None = fp16 on CUDA,
    fp32 on CPU), and scorer-specific options (`processor` for pickscore, `version`/`arch` for hpsv2,
    `pretrained`/`backend` for clip, `clip_model`/`clip_pretrained` for aesthetic, `quality` for the
    JPEG scorers).
    """
    return scorer_class(name)(weights=weights, **kwargs)


def parse_weights(items: tuple[str, ...] | list[str], scorers: list[str]) -> dict[str, str]:
    """`--weights SCORER=PATH_OR_HUB_ID` items -> {scorer: location}; every SCORER must be among `scorers`."""
    out = {}
    for item in items:
        name, sep, location = item.partition("=")
        if not sep or not name or not location:
            raise PrefpipeError(
                f"--weights {item}: write SCORER=PATH_OR_HUB_ID (a local path or hub id), e.g. pickscore=models/pickscore"
            )
        if name not in scorers:
            raise PrefpipeError(f"--weights {item}: '{name}' is not one of the --scorer names ({', '.join(scorers)})")
        out[name] = location
    return out
