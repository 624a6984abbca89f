"""Duplicates: the same pair judged the same way (same caption, stripped; the same two images in either
order; the same outcome: winner, or tie). Two conflicting judgements of one pair are both kept.

The rule is global and deterministic: the first occurrence in (unit, row) order wins, whatever the ranks
and resumes. Two levels, both keyed by :func:`pair_key`:

- By image id (Pick-a-Pic uid, HPDv2 path), across the whole dataset: a light pass keeps a 64-bit hash of
  each surviving row's key plus its (unit, row): 16 bytes a row, about 15 MB for Pick-a-Pic v2 train (twice
  that while sorting), the only state that grows with the rows. :func:`plan_duplicates` turns it into the
  rows, per unit, that repeat an earlier one. Every rank computes the same answer; :func:`cached_plan`
  stores it in the output folder (`.ingest-duplicates-*.npz`), so a resume does not pass over the input again.
- By image bytes hash, within a unit only (:class:`RepeatedPairs`): a global byte-level pass would read
  every image twice (335 GB for Pick-a-Pic v2); the same id means the same image, so the id rule carries
  the global part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefpipe.core.files import atomic_output
from prefpipe.stages.ingest.options import IngestOptions


def digest(data: Any) -> bytes:
    """A 128-bit content hash of image bytes (xxh3 when available: ~10x faster than sha1)."""
    try:
        import xxhash

        return xxhash.xxh3_128_digest(data)
    except ImportError:  # pragma: no cover - xxhash comes with datasets
        return hashlib.sha1(data).digest()


def outcome(label_0: float, first: Any, second: Any) -> Any:
    """Who won a pair of `first` and `second` (either one), or "tie"."""
    return "tie" if label_0 == 0.5 else (first if label_0 == 1 else second)


def pair_key(caption: str, first: Any, second: Any, label_0: float) -> tuple:
    """The duplicate key of a pair: caption (stripped), the two images (ids or hashes) in either order, outcome."""
    return caption.strip(), min(first, second), max(first, second), outcome(label_0, first, second)


def key64(*parts: str) -> int:
    """A 64-bit hash of a duplicate key (collisions: ~1e-8 over a million keys)."""
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8).digest(), "little")


class RepeatedPairs:
    """The byte-level rule within one unit: `reason(caption, hash_0, hash_1, label_0)` is "same_images" (one
    image twice), "duplicate" (a key seen before in this unit) or None, as the options ask."""

    def __init__(self, opts: IngestOptions):
        self.same_images = opts.same_images == "drop"
        self.duplicates = opts.duplicates == "drop"
        self.seen: set[tuple] = set()

    def reason(self, caption: str, h0: bytes, h1: bytes, label_0: float) -> str | None:
        if self.same_images and h0 == h1:
            return "same_images"
        if self.duplicates:
            key = pair_key(caption, h0, h1, label_0)
            if key in self.seen:
                return "duplicate"
            self.seen.add(key)
        return None


def plan_duplicates(keyed: Iterator[tuple[int, Any, Any]]) -> dict[int, Any]:
    """Rows that repeat an earlier key, per unit: the first occurrence in (unit, row) order wins.

    `keyed` yields (unit, row indices, uint64 keys) in global order. Returns {unit: sorted row indices}.
    """
    import numpy as np

    units, rows, keys = [], [], []
    for unit, r, k in keyed:
        units.append(np.full(len(r), unit, np.int32))
        rows.append(np.asarray(r, np.int32))
        keys.append(np.asarray(k, np.uint64))
    if not keys:
        return {}
    units_a, rows_a, keys_a = np.concatenate(units), np.concatenate(rows), np.concatenate(keys)
    _, first = np.unique(keys_a, return_index=True)  # stable: the index of each key's first occurrence
    dup = np.ones(len(keys_a), bool)
    dup[first] = False
    d_units, d_rows = units_a[dup], rows_a[dup]  # in global order: units ascending, rows ascending within
    present, starts = np.unique(d_units, return_index=True)
    ends = list(starts[1:]) + [len(d_units)]
    return {int(u): d_rows[a:b] for u, a, b in zip(present, starts, ends)}


def cached_plan(folder: Path, key: str, compute: Callable[[], dict[int, Any]]) -> dict[int, Any]:
    """`compute()` once per input and options: cached atomically in the output folder (same for every rank)."""
    import numpy as np

    path = folder / f".ingest-duplicates-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            units, rows, offsets = z["units"], z["rows"], z["offsets"]
        return {int(u): rows[offsets[i]:offsets[i + 1]] for i, u in enumerate(units)}
    plan = compute()
    units = np.array(sorted(plan), np.int64)
    rows = np.concatenate([plan[int(u)] for u in units]) if len(units) else np.zeros(0, np.int32)
    offsets = np.cumsum([0] + [len(plan[int(u)]) for u in units])
    with atomic_output(path, suffix=".npz") as tmp:
        np.savez(tmp, units=units, rows=rows, offsets=offsets)
    return plan
