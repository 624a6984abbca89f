"""CLI name -> scorer class: the built-in scorers, then any a third-party package registers as a plugin.

scorer = build_scorer("pickscore")                          # hub default weights
scorer = build_scorer("hpsv2", weights="tiny/hpsv2", device="cpu")

Classes are imported on first use, so listing names never loads torch models. A plugin is a Python entry
point in the group `prefpipe.scorers`, named after the scorer and pointing at its class (see
`labelers.base.BaseScorer` for the contract), e.g. in the plugin's pyproject.toml:

    [project.entry-points."prefpipe.scorers"]
    brightness = "my_package.scorers:Brightness"
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from labelers.base import Scorer
from prefpipe.core.errors import PrefpipeError

ENTRY_POINT_GROUP = "prefpipe.scorers"
BUILT_IN = "built-in"

# name -> (module, class). Each class takes `weights` first, then `batch_size`, `device`, `dtype`.
SCORERS: dict[str, tuple[str, str]] = {
    "pickscore": ("labelers.pickscore", "PickScore"),
    "hpsv2": ("labelers.hpsv2", "HPSv2"),
    "imagereward": ("labelers.imagereward", "ImageReward"),
    "hpsv3": ("labelers.hpsv3", "HPSv3"),
    "clip": ("labelers.clip", "ClipScore"),
    "aesthetic": ("labelers.aesthetic", "AestheticScore"),
    "compressibility": ("labelers.compressibility", "Compressibility"),
    "incompressibility": ("labelers.compressibility", "Incompressibility"),
}


@dataclass(frozen=True)
class ScorerEntry:
    """Where a scorer name comes from: `source` is "built-in" or the distribution that registered it."""

    name: str
    target: str  # "module:Class"
    source: str
    version: str  # prefpipe's version for a built-in, else the plugin distribution's
    shadowed_by: str | None = None  # a plugin whose name is taken (by a built-in or an earlier plugin)


def _prefpipe_version() -> str:
    try:
        return metadata.version("prefpipe")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _plugin_entries() -> list[ScorerEntry]:
    """Every entry point of the group, in a stable order (by distribution, then name)."""
    out = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        source = dist.metadata["Name"] if dist is not None else "unknown distribution"
        version = dist.version if dist is not None else "unknown"
        out.append(ScorerEntry(ep.name, ep.value, source, version))
    return sorted(out, key=lambda e: (e.source.lower(), e.name))


def available_scorers() -> list[ScorerEntry]:
    """Built-ins first, then plugins. A plugin whose name is taken is listed with `shadowed_by` and not used."""
    version = _prefpipe_version()
    entries = [ScorerEntry(n, f"{m}:{c}", BUILT_IN, version) for n, (m, c) in SCORERS.items()]
    taken = {e.name: e.source for e in entries}
    for entry in _plugin_entries():
        if entry.name in taken:
            entries.append(ScorerEntry(entry.name, entry.target, entry.source, entry.version, taken[entry.name]))
        else:
            taken[entry.name] = entry.source
            entries.append(entry)
    return entries


def _active() -> dict[str, ScorerEntry]:
    return {e.name: e for e in available_scorers() if e.shadowed_by is None}


def scorer_names() -> list[str]:
    """The names `build_scorer` (and `prefpipe label --scorer`) accepts: built-ins, then plugins."""
    return list(_active())


def scorer_entry(name: str) -> ScorerEntry:
    """The entry registered under `name`; an unknown name stops with the list of known ones."""
    active = _active()
    if name not in active:
        raise PrefpipeError(
            f"unknown scorer {name!r}; known scorers: {', '.join(active)} "
            f"(a plugin package registers more under the entry-point group {ENTRY_POINT_GROUP!r})"
        )
    return active[name]


def scorer_class(name: str) -> type:
    """The class registered under `name` (a built-in or a plugin's entry point), imported now."""
    entry = scorer_entry(name)
    module, _, attr = entry.target.partition(":")
    if entry.source == BUILT_IN:
        return getattr(importlib.import_module(module), attr)
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as err:  # a broken plugin: one message naming it, never a traceback
        raise PrefpipeError(
            f"scorer {name!r} from plugin {entry.source} {entry.version} ({entry.target}) failed to load: "
            f"{type(err).__name__}: {err}; fix or uninstall that package"
        ) from err
    if not callable(obj):
        raise PrefpipeError(f"scorer {name!r} from plugin {entry.source}: {entry.target} is not a class")
    return obj


def check_scorer(scorer, name: str) -> Scorer:
    """Stop with a clear message when a built scorer misses the contract of `labelers.base.Scorer`."""
    missing = [a for a in ("name", "version", "higher_is_better", "score") if not hasattr(scorer, a)]
    if missing:
        raise PrefpipeError(
            f"scorer {name!r} ({type(scorer).__module__}.{type(scorer).__qualname__}) lacks {', '.join(missing)}: "
            "a scorer needs name, version, higher_is_better and score(images, prompts) (see labelers.base.BaseScorer)"
        )
    if scorer.name != name:
        raise PrefpipeError(
            f"scorer registered as {name!r} calls itself {scorer.name!r}: its `name` must equal the registered name"
        )
    return scorer


def build_scorer(name: str, weights: str | Path | None = None, **kwargs) -> Scorer:
    """Build scorer `name` from `weights` (hub id or local path; None = the scorer's real default).

    kwargs go to the scorer's constructor: `batch_size`, `device` ("auto"), `dtype` (None = fp16 on CUDA,
    fp32 on CPU), and scorer-specific options (`processor` for pickscore, `version`/`arch` for hpsv2,
    `pretrained`/`backend` for clip, `clip_model`/`clip_pretrained` for aesthetic, `quality` for the
    JPEG scorers, `tokenizer` for imagereward, `base` for hpsv3). A plugin's class gets the same keywords.
    """
    return check_scorer(scorer_class(name)(weights=weights, **kwargs), name)


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
