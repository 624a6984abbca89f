"""What people judge: the pairs of a session, and the images they show, read by reference from the input.

- From candidates (`prefpipe generate`): per prompt, the pairs that `prefpipe label` would compare
  (`stages.pairs.choose_pairs`, `--strategy all|random-k`; position 0 drawn per pair), image uids
  `PROMPT_ID-CANDIDATE` as `prefpipe label` writes them (D3PO's trainer reads them too).
- From a pairs dataset (AI pairs, Pick-a-Pic, ...): every row, in order; a pair met again is kept once.

Each pair gets a stable id, 16 hex digits of a SHA-256 of its key; the server accepts no other name for a pair
or an image, so no request can name a file. Images are never held in memory: a pair keeps where its two images
lie (file, row group, row, column), and :class:`ImageStore` reads them on demand (a few row groups cached).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.identity import input_fingerprint
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import check_columns
from prefpipe.core.tables import parquet_file, parquet_files
from prefpipe.stages.pairs import PairOptions, choose_pairs

PAIR_ID = re.compile(r"[0-9a-f]{16}")  # the only names the server accepts for a pair
_CACHED_ROW_GROUPS = 8


@dataclass(frozen=True)
class ImageRef:
    """Where an image lies: file (index into the session's files), row group, row within it, column."""

    file: int
    row_group: int
    row: int
    column: str


@dataclass(frozen=True)
class Item:
    """One pair to judge, in the orientation of the output (`label_0` refers to image 0)."""

    pair_id: str
    prompt_id: str
    caption: str
    image_0_uid: str | None
    image_1_uid: str | None
    model_0: str | None
    model_1: str | None
    image_0: ImageRef
    image_1: ImageRef
    scorer: str | None = None  # pairs from AI labels: the scorer, and its scores of images 0 and 1
    score_0: float | None = None
    score_1: float | None = None

    def image(self, side: int) -> ImageRef:
        return self.image_0 if side == 0 else self.image_1


@dataclass
class SessionInput:
    """The pairs of a session and where their images are."""

    mode: str  # "candidates" | "pairs"
    source: str
    files: list[Path]
    items: list[Item]
    by_id: dict[str, Item]
    fingerprint: str  # the input dataset by content (`input_fingerprint`)
    repeated: int = 0  # pairs of a pairs dataset met again (kept once)


def pair_id_of(*parts: str | None) -> str:
    return hashlib.sha256("\0".join(p or "" for p in parts).encode("utf-8")).hexdigest()[:16]


def load_candidates(source: str | Path, strategy: str, k: int, seed: int, limit: int | None) -> SessionInput:
    """The pairs drawn per prompt from a candidates dataset (`--candidates`)."""
    if strategy not in ("all", "random-k"):
        raise PrefpipeError(f"--strategy {strategy}: annotate pairs candidates with all or random-k "
                            "(best-worst needs scores)")
    if not Path(source).exists():
        raise PrefpipeError(f"--candidates {source}: no such folder (make it with `prefpipe generate`)")
    files = parquet_files(source)
    check_columns(parquet_file(files[0]).schema_arrow, {"prompt_id": pa.string(), "prompt": pa.string(),
                  "candidate": pa.int32(), "image": pa.binary()}, f"--candidates {files[0]}")
    prompts: dict[str, dict] = {}  # prompt_id -> {"prompt", "cands": {candidate: (ref, model)}}, in order
    for fi, f in enumerate(files):
        pf = parquet_file(f)
        cols = ["prompt_id", "prompt", "candidate"] + (["model"] if "model" in pf.schema_arrow.names else [])
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=cols).to_pydict()
            models = t.get("model") or [None] * len(t["prompt_id"])
            for row, (pid, text, cand, model) in enumerate(zip(t["prompt_id"], t["prompt"], t["candidate"], models)):
                entry = prompts.setdefault(pid, {"prompt": text, "cands": {}})
                entry["cands"].setdefault(cand, (ImageRef(fi, rg, row, "image"), model))
    opts = PairOptions(strategy=strategy, k=k, seed=seed)
    items: list[Item] = []
    for pid, entry in prompts.items():
        cands = np.array(sorted(entry["cands"]))
        if len(cands) < 2:
            continue
        for a, b in choose_pairs(pid, cands, np.zeros(len(cands)), opts):
            (ref0, m0), (ref1, m1) = entry["cands"][int(cands[a])], entry["cands"][int(cands[b])]
            uid0, uid1 = f"{pid}-{cands[a]}", f"{pid}-{cands[b]}"
            items.append(Item(pair_id_of(uid0, uid1, entry["prompt"]), pid, entry["prompt"], uid0, uid1, m0, m1,
                              ref0, ref1))
    return _session("candidates", source, files, items, limit, 0)


def load_pairs(source: str | Path, limit: int | None) -> SessionInput:
    """Every pair of a pairs dataset (`--pairs`), in order, to judge again."""
    if not Path(source).exists():
        raise PrefpipeError(f"--pairs {source}: no such folder (AI pairs are WORKDIR/pairs/ai, from `prefpipe label`)")
    files = parquet_files(source)
    check_columns(parquet_file(files[0]).schema_arrow, {"caption": pa.string(), "jpg_0": pa.binary(),
                  "jpg_1": pa.binary()}, f"--pairs {files[0]}")
    optional = ("prompt_id", "image_0_uid", "image_1_uid", "model_0", "model_1", "scorer", "score_0", "score_1")
    items: list[Item] = []
    seen: set[str] = set()
    repeated = 0
    for fi, f in enumerate(files):
        pf = parquet_file(f)
        cols = ["caption"] + [c for c in optional if c in pf.schema_arrow.names]
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=cols).to_pydict()
            n = len(t["caption"])
            get = {c: t.get(c) or [None] * n for c in optional}
            for row in range(n):
                caption = t["caption"][row] or ""
                uid0, uid1 = get["image_0_uid"][row], get["image_1_uid"][row]
                # a pair is named by its images and caption; a row without uids by its place in the input
                key = (uid0, uid1, caption) if uid0 and uid1 else (f.name, str(rg), str(row), caption)
                pair = pair_id_of(*key)
                if pair in seen:
                    repeated += 1
                    continue
                seen.add(pair)
                s0, s1 = get["score_0"][row], get["score_1"][row]
                scored = s0 is not None and s1 is not None and np.isfinite(s0) and np.isfinite(s1)
                items.append(Item(pair, get["prompt_id"][row] or prompt_id(caption), caption, uid0, uid1,
                                  get["model_0"][row], get["model_1"][row], ImageRef(fi, rg, row, "jpg_0"),
                                  ImageRef(fi, rg, row, "jpg_1"), get["scorer"][row] if scored else None,
                                  s0 if scored else None, s1 if scored else None))
    return _session("pairs", source, files, items, limit, repeated)


def _session(mode: str, source, files: list[Path], items: list[Item], limit: int | None, repeated: int) -> SessionInput:
    if limit is not None:
        items = items[:limit]
    if not items:
        what = "no prompt has two candidates" if mode == "candidates" else "the dataset has no rows"
        raise PrefpipeError(f"--{mode} {source}: nothing to judge ({what})")
    return SessionInput(mode, str(source), files, items, {it.pair_id: it for it in items},
                        input_fingerprint(source), repeated)


class ImageStore:
    """Reads the images of a session's pairs on demand, a row group's column at a time (the last few cached).

    `reads` counts the row groups read from disk: a request that names no known image reads none.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self.reads = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int, str], pa.Array] = OrderedDict()

    def read(self, ref: ImageRef) -> bytes:
        key = (ref.file, ref.row_group, ref.column)
        with self._lock:
            column = self._cache.get(key)
            if column is None:
                self.reads += 1
                column = parquet_file(self.files[ref.file]).read_row_group(ref.row_group, columns=[ref.column]).column(0)
                self._cache[key] = column
                if len(self._cache) > _CACHED_ROW_GROUPS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        data = column[ref.row].as_py()
        if data is None:
            raise PrefpipeError(f"{self.files[ref.file]}: row {ref.row} of row group {ref.row_group} has no {ref.column}")
        return data
