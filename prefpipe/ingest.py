"""The ingest stage: human preference datasets in, pairs out (`WORKDIR/pairs/human`, PAIRS schema).

    prefpipe ingest pickapic --from data/ --out WORKDIR      Pick-a-Pic v2 Parquet shards (or the hub id)
    prefpipe ingest hpdv2 --from HPD/ --out WORKDIR          HPDv2 train.json/test.json + images beside them

Pick-a-Pic
- Input: the published layout (`data/<split>-NNNNN-of-NNNNN-<hash>.parquet`), from a folder, a glob or one
  file, or a hub id streamed with `datasets` (units are then the hub's data files). The `*_no_images`
  variant (every column but `jpg_0`/`jpg_1`) gives pairs with null images: captions and labels only.
- One unit per input file; output shard k holds what survived of input file k. Rank r of w takes files
  r, r+w, ... (`rank_world()`); a shard is written to a temporary name and renamed, so a re-run resumes.
- Every published column is kept; `__index_level_0__` is dropped; `source=human`, `prompt_id` added.

Each dropped row gets one reason, the first that applies in this order (cheap checks first, decoding last):
unlabeled (`has_label` false) · bad_label (labels not (1,0), (0,1) or (0.5,0.5)) · tie · same_images
(`are_different` false) · empty_caption · duplicate · same_images (identical bytes) · duplicate (identical
bytes) · bad_image (null, empty or undecodable). Every filter but bad_label can be switched off.

Duplicates: the same pair judged the same way: same caption (stripped), same two images in either order,
same outcome (winner, or tie). Two conflicting judgements of one pair are both kept. The rule is global
and deterministic: the first occurrence in (file, row) order wins, whatever the ranks and resumes.
- By image uid, across the whole dataset: a first pass reads only the light columns (caption, uids, labels,
  flags) of every file and keeps a 64-bit key hash plus its (file, row) per surviving row: 16 bytes a row,
  about 15 MB for Pick-a-Pic v2 train (twice that while sorting), the only state that grows with the rows.
  It yields, per unit, the rows that repeat an earlier one. Every rank computes the same answer; it is
  cached in the output folder (`.ingest-duplicates-*.npz`), so a resume does not read the light columns again.
- By image bytes hash, within a unit only: a global byte-level pass would read every image twice
  (335 GB for Pick-a-Pic v2); the same uid means the same image, so the uid rule carries the global part.

Memory: the image columns are read one row group at a time (pyarrow decodes a whole column chunk), so the
peak is set by the largest input row group, not by the number of rows or files (benchmarks/ingest.py: the
same peak RSS at 1x and 10x). Beyond the duplicate plan, only the summary's distinct-prompt count (a set
of prompt ids, read back from the output once every shard is done) grows with the data.

HPDv2 (`train.json`: prompt, file_path or image_path, human_preference 1 = preferred; `test.json`: prompt,
image_path, rank 1 = best) is streamed entry by entry (the JSON array is never loaded whole), images are
read from `<split>/` beside it, and each entry's ranking becomes pairs: `--pairs all` (every two images
with different scores; equal scores are ties) or `best-worst` (one pair).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import pyarrow as pa

from prefpipe.dataset import ShardedDataset, fingerprint, parquet_files, rank_world
from prefpipe.errors import PrefpipeError, PrefpipeGroup
from prefpipe.prompts import prompt_id
from prefpipe.schema import PAIRS, check_columns, conform

log = logging.getLogger("prefpipe.ingest")

HUMAN_PAIRS = Path("pairs") / "human"
REASONS = ("unlabeled", "bad_label", "tie", "same_images", "empty_caption", "duplicate", "bad_image")
_CODE = {r: i + 1 for i, r in enumerate(REASONS)}  # 0 = kept
_LOG_LIMIT = 50  # bad rows logged per reason and process; the counters hold them all
_SPLIT_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)-\d{5}-of-\d{5}")

_STR = (pa.string(), pa.large_string())
_INT = (pa.int64(), pa.int32())
_TIMESTAMP = tuple(pa.timestamp(u) for u in ("ns", "us", "ms", "s"))
# The published Pick-a-Pic v2 columns and the types accepted for each (the published one first).
PICKAPIC_COLUMNS: dict[str, tuple[pa.DataType, ...]] = {
    "are_different": (pa.bool_(),),
    "best_image_uid": _STR,
    "caption": _STR,
    "created_at": _TIMESTAMP,
    "has_label": (pa.bool_(),),
    "image_0_uid": _STR,
    "image_0_url": _STR,
    "image_1_uid": _STR,
    "image_1_url": _STR,
    "label_0": (pa.float64(), pa.float32()),
    "label_1": (pa.float64(), pa.float32()),
    "model_0": _STR,
    "model_1": _STR,
    "ranking_id": _INT,
    "user_id": _INT,
    "num_example_per_prompt": _INT,
}
IMAGE_COLUMNS: dict[str, tuple[pa.DataType, ...]] = {"jpg_0": (pa.binary(), pa.large_binary()),
                                                      "jpg_1": (pa.binary(), pa.large_binary())}
LIGHT_COLUMNS = ["caption", "image_0_uid", "image_1_uid", "label_0", "label_1", "has_label", "are_different"]


# -- options -------------------------------------------------------------------------------------
@dataclass
class IngestOptions:
    """Options that decide the output (recorded in `_prefpipe.json`; a resume must match them)."""

    split: str = "train"
    ties: str = "drop"  # drop | keep (as label 0.5 / 0.5)
    unlabeled: str = "drop"  # Pick-a-Pic rows with has_label false
    same_images: str = "drop"  # are_different false, or identical image bytes
    empty_captions: str = "drop"
    duplicates: str = "drop"
    verify_images: str = "header"  # full: decode every image | header: parse + end marker | none
    max_side: int | None = None  # re-encode (JPEG) images whose longer side exceeds this, keeping aspect
    jpeg_quality: int = 90
    limit: int | None = None  # first N input rows (Pick-a-Pic) or entries (HPDv2)
    pairs: str = "all"  # HPDv2: all | best-worst
    entries_per_shard: int = 2000  # HPDv2: entries of the JSON file per unit

    def identity(self, kind: str) -> dict[str, Any]:
        """The options that apply to `kind` (pickapic | hpdv2), as recorded in `_prefpipe.json`."""
        skip = {"pickapic": ("pairs", "entries_per_shard"), "hpdv2": ("unlabeled",)}[kind]
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def validate(self) -> None:
        for name in ("ties", "unlabeled", "same_images", "empty_captions", "duplicates"):
            if getattr(self, name) not in ("drop", "keep"):
                raise PrefpipeError(f"--{name.replace('_', '-')} {getattr(self, name)}: choose drop or keep")
        if self.verify_images not in ("full", "header", "none"):
            raise PrefpipeError(f"--verify-images {self.verify_images}: choose full, header or none")
        if self.pairs not in ("all", "best-worst"):
            raise PrefpipeError(f"--pairs {self.pairs}: choose all or best-worst")
        if self.max_side is not None and self.max_side < 8:
            raise PrefpipeError(f"--max-side {self.max_side}: must be at least 8 pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrefpipeError(f"--jpeg-quality {self.jpeg_quality}: must be 1..100")
        if self.limit is not None and self.limit < 1:
            raise PrefpipeError(f"--limit {self.limit}: must be at least 1")
        if self.entries_per_shard < 1:
            raise PrefpipeError(f"--entries-per-shard {self.entries_per_shard}: must be at least 1")


# -- hashing and images --------------------------------------------------------------------------
def _digest(data: Any) -> bytes:
    """A 128-bit content hash of image bytes (xxh3 when available: ~10x faster than sha1)."""
    try:
        import xxhash

        return xxhash.xxh3_128_digest(data)
    except ImportError:  # pragma: no cover - xxhash comes with datasets
        import hashlib

        return hashlib.sha1(data).digest()


def _key64(*parts: str) -> int:
    """A 64-bit hash of a duplicate key (collisions: ~1e-8 over a million keys)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8).digest(), "little")


class ImageChecker:
    """Checks (and optionally shrinks) encoded images; `check` returns (bytes to store, None) or (None, why).

    - `header`: parse the header (`Image.open` + `verify`) and, for JPEG, require the end-of-image marker;
      a JPEG without it (truncated, or trailing bytes) gets a full decode to decide.
    - `full`: decode every image (`load`), about 30x the cost of `header` (see benchmarks/ingest.py).
    - `none`: trust the bytes (null and empty images are still bad rows).
    """

    def __init__(self, mode: str = "header", max_side: int | None = None, jpeg_quality: int = 90):
        self.mode, self.max_side, self.jpeg_quality = mode, max_side, jpeg_quality
        self.resized = 0

    def check(self, data: bytes | None) -> tuple[bytes | None, str | None]:
        if data is None:
            return None, "image is null"
        if len(data) == 0:
            return None, "image is empty (0 bytes)"
        if self.mode == "none" and self.max_side is None:
            return data, None
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                size, fmt = im.size, im.format
                if self.mode == "full" or (self.max_side and max(size) > self.max_side):
                    im.load()
                    if self.max_side and max(size) > self.max_side:
                        return self._shrink(im), None
                elif self.mode == "header":
                    im.verify()
            if self.mode == "header" and fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
                with Image.open(io.BytesIO(data)) as im:  # no end marker: decode to decide
                    im.load()
        except Exception as e:  # PIL raises many types for bad data; each is a bad row
            if type(e).__name__ == "UnidentifiedImageError":
                return None, "not an image PIL can identify"
            return None, f"{type(e).__name__}: {e}"
        return data, None

    def _shrink(self, im) -> bytes:
        from PIL import Image

        scale = self.max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        small = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=self.jpeg_quality)
        self.resized += 1
        return buf.getvalue()


class _BadRows:
    """Logs bad rows with their key (up to `_LOG_LIMIT` per reason) and keeps a few examples."""

    def __init__(self):
        self.logged: dict[str, int] = {}
        self.examples: list[str] = []

    def __call__(self, reason: str, key: str, why: str) -> None:
        n = self.logged.get(reason, 0)
        self.logged[reason] = n + 1
        if len(self.examples) < 20:
            self.examples.append(f"{reason}: {key}: {why}")
        if n < _LOG_LIMIT:
            log.warning("skipped %s: %s: %s", reason, key, why)
        elif n == _LOG_LIMIT:
            log.warning("more %s rows are not logged (see the counts in the summary)", reason)


# -- Pick-a-Pic sources ----------------------------------------------------------------------------
class ParquetSource:
    """Local Parquet files, one unit per file (in sorted path order)."""

    def __init__(self, files: list[Path], label: str):
        import pyarrow.parquet as pq

        self.files = files
        self.label = label
        self.rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
        self.schema = pq.read_schema(files[0])
        for f in files[1:]:
            other = pq.read_schema(f)
            if not other.equals(self.schema):
                missing = sorted(set(self.schema.names) ^ set(other.names))
                raise PrefpipeError(
                    f"{f}: its columns differ from {files[0].name}'s"
                    + (f" ({', '.join(missing)})" if missing else " (types)") + "; give files of one dataset"
                )
        self.fingerprint = fingerprint([(f.name, f.stat().st_size) for f in files])

    @property
    def n_units(self) -> int:
        return len(self.files)

    def where(self, unit: int) -> str:
        return self.files[unit].name

    def unit_rows(self, unit: int) -> int | None:
        return self.rows[unit]

    def batches(self, unit: int, columns: list[str] | None, batch_size: int) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        # pre_buffer off: the reader holds one column chunk at a time instead of a whole row group's
        pf = pq.ParquetFile(self.files[unit], pre_buffer=False, buffer_size=1 << 20)
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=False):
            yield pa.Table.from_batches([batch])


class StreamingSource:
    """A dataset read with `datasets` streaming, one unit per data file of the split.

    `builder_for(columns)` returns a `datasets` builder (the hub id's, or the packaged `parquet` one over
    local files), reading only `columns` when given (Parquet column projection: only those bytes move).
    """

    def __init__(self, builder_for: Callable[[list[str] | None], Any], split: str, label: str):
        builder = builder_for(None)
        files = builder.config.data_files or {}
        if split not in files:
            raise PrefpipeError(f"--from {label}: no split '{split}'; splits present: {', '.join(files) or 'none'}")
        self.builder_for, self.split, self.label = builder_for, split, label
        self.fingerprint = fingerprint(label, split, [str(f) for f in files[split]])
        self._ds = builder.as_streaming_dataset(split=split)
        self.files = [str(f) for f in files[split]]
        if self._ds.features is not None:
            self.schema = self._ds.features.arrow_schema
        else:  # pragma: no cover - Parquet builders always know their features
            self.schema = next(iter(self._ds.with_format("arrow").iter(batch_size=1))).schema
        self.n_units = self._ds.num_shards
        self.single_stream = False  # --limit: one unit reading the head of the whole split
        self._projected: dict[tuple[str, ...], Any] = {}  # one builder per column set (hub metadata once)

    def head_only(self) -> None:
        """Make the whole split one unit (for `--limit`: row counts per file are unknown before reading)."""
        self.n_units, self.single_stream = 1, True

    def where(self, unit: int) -> str:
        name = self.files[unit].rsplit("/", 1)[-1] if unit < len(self.files) else f"shard {unit}"
        return f"{self.label}:{name}"

    def unit_rows(self, unit: int) -> int | None:
        return None

    def batches(self, unit: int, columns: list[str] | None, batch_size: int) -> Iterator[pa.Table]:
        ds = self._ds
        if columns is not None:
            key = tuple(columns)
            if key not in self._projected:
                self._projected[key] = self.builder_for(columns).as_streaming_dataset(split=self.split)
            ds = self._projected[key]
        if not self.single_stream:
            ds = ds.shard(num_shards=self.n_units, index=unit)
        yield from ds.with_format("arrow").iter(batch_size=batch_size)


def _split_of(path: Path) -> str | None:
    m = _SPLIT_NAME.match(path.name)
    return m.group("split") if m else None


def local_split_files(source: str | Path, split: str) -> list[Path]:
    """The Parquet files of `split` under a folder, glob or file (`<split>-NNNNN-of-NNNNN*.parquet`).

    Files without a split in their name count as `train` (as `datasets` reads them).
    """
    files = parquet_files(source)
    named = {f: _split_of(f) for f in files}
    if not any(named.values()):
        if split != "train":
            raise PrefpipeError(f"--from {source}: file names carry no split (plain names are 'train'); use --split train")
        return files
    chosen = [f for f, s in named.items() if s == split]
    if not chosen:
        present = sorted({s for s in named.values() if s})
        raise PrefpipeError(f"--from {source}: no '{split}' files; splits present: {', '.join(present)}")
    return chosen


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.endswith(".parquet")


def open_pickapic_source(source: str | Path, split: str) -> ParquetSource | StreamingSource:
    """Local files when `source` is a path or glob; else a hub id streamed with `datasets`."""
    s = str(source)
    if Path(s).exists() or any(ch in s for ch in "*?["):
        return ParquetSource(local_split_files(s, split), s)
    if not _looks_like_hub_id(s):
        raise PrefpipeError(f"--from {s}: no such file or folder (and not a hub id like yuvalkirstain/pickapic_v2)")
    import datasets

    def builder_for(columns: list[str] | None):
        return datasets.load_dataset_builder(s, columns=columns) if columns else datasets.load_dataset_builder(s)

    try:
        return StreamingSource(builder_for, split, s)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise PrefpipeError(f"--from {s}: no such local path, and no such dataset on the hub ({e})") from e
    except (ConnectionError, OSError) as e:
        raise PrefpipeError(
            f"--from {s}: not a local path, and the hub could not be reached ({e}).\n"
            f"Download the shards (`hf download {s} --repo-type dataset --include 'data/{split}-*' --local-dir DIR`) "
            "and pass --from DIR."
        ) from e


def check_pickapic_schema(schema: pa.Schema, where: str) -> bool:
    """Stop at once on a missing column or a wrong type; returns whether the images are there.

    The `*_no_images` variant lacks both `jpg_0` and `jpg_1`; one without the other is an error.
    """
    check_columns(schema, PICKAPIC_COLUMNS, where)
    present = [c for c in IMAGE_COLUMNS if c in schema.names]
    if len(present) == 1:
        missing = next(c for c in IMAGE_COLUMNS if c not in schema.names)
        raise PrefpipeError(f"{where}: column '{missing}' is missing (expected binary) while '{present[0]}' is present")
    if present:
        check_columns(schema, IMAGE_COLUMNS, where)
    return bool(present)


# -- Pick-a-Pic filters ----------------------------------------------------------------------------
def light_reasons(table: pa.Table, opts: IngestOptions):
    """Drop reason code per row from the light columns (0 = kept so far); numpy int8 of table.num_rows."""
    import numpy as np
    import pyarrow.compute as pc

    n = table.num_rows
    reasons = np.zeros(n, np.int8)

    def drop(mask, reason: str) -> None:
        reasons[(reasons == 0) & np.asarray(mask, bool)] = _CODE[reason]

    if opts.unlabeled == "drop":
        drop(~pc.fill_null(table["has_label"], False).to_numpy(zero_copy_only=False), "unlabeled")
    l0 = pc.fill_null(pc.cast(table["label_0"], pa.float64()), math.nan).to_numpy(zero_copy_only=False)
    l1 = pc.fill_null(pc.cast(table["label_1"], pa.float64()), math.nan).to_numpy(zero_copy_only=False)
    tie = (l0 == 0.5) & (l1 == 0.5)
    valid = ((l0 == 1) & (l1 == 0)) | ((l0 == 0) & (l1 == 1)) | tie
    drop(~valid, "bad_label")
    if opts.ties == "drop":
        drop(tie, "tie")
    if opts.same_images == "drop":
        drop(~pc.fill_null(table["are_different"], True).to_numpy(zero_copy_only=False), "same_images")
    if opts.empty_captions == "drop":
        stripped = pc.utf8_trim_whitespace(table["caption"])
        drop(pc.fill_null(pc.equal(stripped, ""), True).to_numpy(zero_copy_only=False), "empty_caption")
    return reasons


def _outcome(label_0: float, first: str, second: str) -> str:
    return "tie" if label_0 == 0.5 else (first if label_0 == 1 else second)


def _pickapic_keys(table: pa.Table, rows) -> tuple[list[int], list[int]]:
    """(rows, duplicate keys) of the given rows: caption, unordered uid pair, outcome. Rows without both
    uids get no key (they can only be caught by the byte-level rule)."""
    caps = table["caption"].to_pylist()
    u0, u1 = table["image_0_uid"].to_pylist(), table["image_1_uid"].to_pylist()
    l0 = table["label_0"].to_pylist()
    keyed, keys = [], []
    for i in rows:
        a, b = u0[i], u1[i]
        if a is None or b is None:
            continue
        keyed.append(int(i))
        keys.append(_key64(caps[i].strip(), min(a, b), max(a, b), _outcome(l0[i], a, b)))
    return keyed, keys


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


def _cached_plan(folder: Path, key: str, compute: Callable[[], dict[int, Any]]) -> dict[int, Any]:
    """`compute()` once per input and options: cached atomically in the output folder (same for every rank)."""
    import numpy as np

    path = folder / f".ingest-duplicates-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            units, rows, offsets = z["units"], z["rows"], z["offsets"]
        return {int(u): rows[offsets[i]:offsets[i + 1]] for i, u in enumerate(units)}
    plan = compute()
    folder.mkdir(parents=True, exist_ok=True)
    units = np.array(sorted(plan), np.int64)
    rows = np.concatenate([plan[int(u)] for u in units]) if len(units) else np.zeros(0, np.int32)
    offsets = np.cumsum([0] + [len(plan[int(u)]) for u in units])
    tmp = folder / f".ingest-duplicates-{key}.{os.getpid()}.tmp.npz"
    np.savez(tmp, units=units, rows=rows, offsets=offsets)
    os.replace(tmp, path)
    return plan


def _unit_caps(source, limit: int | None) -> tuple[int, list[int | None]]:
    """(units to run, row cap per unit) for `--limit`: the first N rows in (file, row) order."""
    if limit is None:
        return source.n_units, [None] * source.n_units
    if isinstance(source, StreamingSource):  # row counts unknown before reading: one unit, the split's head
        source.head_only()
        return 1, [limit]
    caps: list[int | None] = []
    left = limit
    for rows in source.rows:
        caps.append(min(rows, left))
        left -= caps[-1]
        if left <= 0:
            break
    return len(caps), caps


def _capped(batches: Iterator[pa.Table], cap: int | None) -> Iterator[pa.Table]:
    seen = 0
    for b in batches:
        if cap is not None and seen + b.num_rows > cap:
            b = b.slice(0, cap - seen)
        if b.num_rows:
            yield b
        seen += b.num_rows
        if cap is not None and seen >= cap:
            return


def _pickapic_unit(source, unit: int, cap: int | None, opts: IngestOptions, dups, has_images: bool,
                   writer, checker: ImageChecker, bad: _BadRows, batch_size: int, bar) -> None:
    import numpy as np

    seen: set[tuple] = set()  # byte-level duplicate keys within this unit
    row0 = 0
    for table in _capped(source.batches(unit, None, batch_size), cap):
        n = table.num_rows
        reasons = light_reasons(table, opts)
        if dups is not None and len(dups):
            local = dups[(dups >= row0) & (dups < row0 + n)] - row0
            hit = np.zeros(n, bool)
            hit[local] = True
            reasons[(reasons == 0) & hit] = _CODE["duplicate"]
        caps = table["caption"].to_pylist()
        l0 = table["label_0"].to_pylist()
        rid = table["ranking_id"].to_pylist()
        uids = (table["image_0_uid"].to_pylist(), table["image_1_uid"].to_pylist())
        if has_images:
            imgs = (table["jpg_0"].to_pylist(), table["jpg_1"].to_pylist())
            out = (list(imgs[0]), list(imgs[1]))
            for i in np.flatnonzero(reasons == 0):
                key = f"{source.where(unit)} row {row0 + i} (ranking_id={rid[i]})"
                b0, b1 = imgs[0][i], imgs[1][i]
                if b0 and b1:
                    h0, h1 = _digest(b0), _digest(b1)
                    if opts.same_images == "drop" and h0 == h1:
                        reasons[i] = _CODE["same_images"]
                        continue
                    if opts.duplicates == "drop":
                        dkey = (caps[i].strip(), min(h0, h1), max(h0, h1), _outcome(l0[i], h0, h1))
                        if dkey in seen:
                            reasons[i] = _CODE["duplicate"]
                            continue
                        seen.add(dkey)
                for k in (0, 1):
                    new, why = checker.check(imgs[k][i])
                    if why is not None:
                        reasons[i] = _CODE["bad_image"]
                        bad("bad_image", f"{key} image_{k}_uid={uids[k][i]}", why)
                        break
                    out[k][i] = new
        for i in np.flatnonzero(reasons == _CODE["bad_label"]):
            bad("bad_label", f"{source.where(unit)} row {row0 + i} (ranking_id={rid[i]})",
                f"labels ({table['label_0'][i]}, {table['label_1'][i]}) are not (1,0), (0,1) or (0.5,0.5)")
        counts = np.bincount(reasons, minlength=len(REASONS) + 1)
        writer.count("rows_read", n)
        for reason, c in zip(REASONS, counts[1:]):
            if c:
                writer.count(f"dropped_{reason}", int(c))
        keep = np.flatnonzero(reasons == 0)
        if len(keep):
            kept = table.take(pa.array(keep))
            if has_images:
                kept = kept.set_column(kept.schema.get_field_index("jpg_0"), "jpg_0",
                                       pa.array([out[0][i] for i in keep], pa.binary()))
                kept = kept.set_column(kept.schema.get_field_index("jpg_1"), "jpg_1",
                                       pa.array([out[1][i] for i in keep], pa.binary()))
            writer.write(_as_pairs(kept, [caps[i] for i in keep]))
            writer.count("kept", len(keep))
            ties = int(sum(1 for i in keep if l0[i] == 0.5))
            if ties:
                writer.count("ties_kept", ties)
        row0 += n
        if bar is not None:
            bar.update(n)


def _as_pairs(table: pa.Table, captions: list[str]) -> pa.Table:
    n = table.num_rows
    table = table.append_column("source", pa.array(["human"] * n, pa.string()))
    table = table.append_column("prompt_id", pa.array([prompt_id(c) for c in captions], pa.string()))
    return conform(table, PAIRS)  # drops __index_level_0__, adds the null AI columns


def ingest_pickapic(source: str | Path | ParquetSource | StreamingSource, out: str | Path,
                    opts: IngestOptions | None = None, *, batch_size: int = 64, progress: bool = True,
                    rank: int | None = None, world: int | None = None) -> dict:
    """Ingest Pick-a-Pic (v1/v2 layout) into `out/pairs/human`; run or resume this process's units.

    Returns the counters of this run (rows_read, kept, dropped_<reason>, ...) plus `total`: the counters
    summed over every finished unit of the dataset.
    """
    opts = opts or IngestOptions()
    opts.validate()
    if batch_size < 1:
        raise PrefpipeError(f"--batch-size {batch_size}: must be at least 1")
    src = source if isinstance(source, (ParquetSource, StreamingSource)) else open_pickapic_source(source, opts.split)
    has_images = check_pickapic_schema(src.schema, f"--from {src.label}")
    if rank is None or world is None:
        rank, world = rank_world()
    n_units, caps = _unit_caps(src, opts.limit)
    folder = Path(out) / HUMAN_PAIRS
    ds = ShardedDataset(
        folder, stage="ingest pickapic", options=opts.identity("pickapic"), input_fingerprint=src.fingerprint,
        n_units=n_units, schema=PAIRS, runtime={"batch_size": batch_size, "world": world},
    ).open()
    todo = ds.pending(rank, world)
    mine = ds.units_for(rank, world)
    if rank == 0:
        note = "" if has_images else " (no image columns: the _no_images variant; jpg_0/jpg_1 stay null)"
        click.echo(f"ingest pickapic: {src.label} split '{opts.split}', {n_units} input shards{note}", err=True)
        _warn_ties(opts)
    counters: dict[str, Any] = {"units_written": 0, "units_skipped": len(mine) - len(todo)}
    t0 = time.perf_counter()
    if todo:
        dups = None
        if opts.duplicates == "drop":
            def light_pass():
                def keyed():
                    for u in range(n_units):
                        row0 = 0
                        for t in _capped(src.batches(u, LIGHT_COLUMNS, 8192), caps[u]):
                            rows, keys = _pickapic_keys(t, (light_reasons(t, opts) == 0).nonzero()[0])
                            yield u, [r + row0 for r in rows], keys
                            row0 += t.num_rows
                return plan_duplicates(keyed())

            light = {k: getattr(opts, k) for k in ("split", "ties", "unlabeled", "same_images", "empty_captions", "limit")}
            dups = _cached_plan(folder, fingerprint(src.fingerprint, light), light_pass)
        from tqdm.auto import tqdm

        totals = [caps[u] if caps[u] is not None else src.unit_rows(u) for u in todo]
        bar = tqdm(total=None if None in totals else sum(totals), unit="row", dynamic_ncols=True,
                   desc=f"ingest[{rank}/{world}]" if world > 1 else "ingest", disable=not progress)
        checker = ImageChecker(opts.verify_images, opts.max_side, opts.jpeg_quality)
        bad = _BadRows()
        for unit in todo:
            with ds.write_unit(unit) as writer:
                _pickapic_unit(src, unit, caps[unit], opts, (dups or {}).get(unit), has_images, writer,
                               checker, bad, batch_size, bar)
                if checker.resized:
                    writer.count("images_resized", checker.resized)
                    checker.resized = 0
            for k, v in writer.stats.items():
                counters[k] = counters.get(k, 0) + v
            counters["units_written"] += 1
        bar.close()
        counters["bad_row_examples"] = bad.examples
    return _finish(ds, "ingest pickapic", "rows", counters, time.perf_counter() - t0, rank, world)


# -- HPDv2 -----------------------------------------------------------------------------------------
def iter_json_array(path: str | Path, chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Stream the elements of a top-level JSON array without loading the file (memory ~ one element)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            data = f.read(chunk_size)
            eof = not data
            buf, pos = buf[pos:] + data, 0
            return not eof

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise PrefpipeError(f"{path}: expected a JSON array of entries")
        pos += 1
        first, count = True, 0
        while True:
            skip_ws()
            if pos >= len(buf):
                raise PrefpipeError(f"{path}: the JSON array is not closed (file truncated?)")
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    raise PrefpipeError(f"{path}: malformed JSON after entry {count}")
                pos += 1
                skip_ws()
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # an element ending at the buffer's end may be cut short
                        break
                except json.JSONDecodeError:
                    if eof:
                        raise PrefpipeError(f"{path}: malformed JSON at entry {count}") from None
                if not more() and pos >= len(buf):
                    raise PrefpipeError(f"{path}: the JSON array is not closed (file truncated?)")
            yield obj
            pos, first, count = end, False, count + 1


class _BadEntry(Exception):
    pass


def hpdv2_ranking(entry: Any) -> tuple[str, list[str], list[float]]:
    """(prompt, image paths, scores: higher is preferred) of one HPDv2 entry; raises _BadEntry.

    train.json: `human_preference` (1 = preferred) over `file_path` (or `image_path`);
    test.json: `rank` (1 = best, an average over annotators) over `image_path`.
    """
    if not isinstance(entry, dict):
        raise _BadEntry(f"entry is {type(entry).__name__}, expected an object")
    prompt = entry.get("prompt")
    paths = entry.get("file_path", entry.get("image_path"))
    if "human_preference" in entry:
        scores = [float(v) for v in entry["human_preference"]] if isinstance(entry["human_preference"], list) else None
    elif "rank" in entry:
        scores = [-float(v) for v in entry["rank"]] if isinstance(entry["rank"], list) else None
    else:
        raise _BadEntry("neither 'human_preference' (train.json) nor 'rank' (test.json)")
    if not isinstance(prompt, str):
        raise _BadEntry("'prompt' is missing or not text")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise _BadEntry("'file_path'/'image_path' is missing or not a list of paths")
    if scores is None or len(scores) != len(paths):
        raise _BadEntry(f"{len(paths)} images but preferences {entry.get('human_preference', entry.get('rank'))!r}")
    if len(paths) < 2:
        raise _BadEntry("fewer than two images")
    return prompt, paths, scores


def ranking_pairs(scores: list[float], mode: str) -> list[tuple[int, int, float]]:
    """(i, j, label_0) pairs from one ranking; label_0 is 1 (i preferred), 0 (j preferred) or 0.5 (tie)."""
    def label(i: int, j: int) -> float:
        return 0.5 if scores[i] == scores[j] else (1.0 if scores[i] > scores[j] else 0.0)

    if mode == "best-worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        if best == worst:
            worst = len(scores) - 1 if best == 0 else 0
        i, j = sorted((best, worst))
        return [(i, j, label(i, j))]
    return [(i, j, label(i, j)) for i in range(len(scores)) for j in range(i + 1, len(scores))]


def _hpdv2_pair_light(prompt: str, paths: list[str], pair: tuple[int, int, float], opts: IngestOptions) -> str | None:
    i, j, l0 = pair
    if l0 == 0.5 and opts.ties == "drop":
        return "tie"
    if opts.same_images == "drop" and os.path.normpath(paths[i]) == os.path.normpath(paths[j]):
        return "same_images"
    if opts.empty_captions == "drop" and not prompt.strip():
        return "empty_caption"
    return None


class HPDv2Source:
    """An HPDv2 folder: `<split>.json` plus the images under `<split>/` (or paths relative to the folder)."""

    def __init__(self, source: str | Path, split: str):
        p = Path(source)
        if p.is_file() and p.suffix == ".json":
            self.json, self.root = p, p.parent
        elif p.is_dir():
            self.json, self.root = p / f"{split}.json", p
            if not self.json.exists():
                found = ", ".join(sorted(f.name for f in p.glob("*.json"))) or "none"
                raise PrefpipeError(f"--from {p}: no {split}.json (JSON files present: {found}); check --split")
        else:
            raise PrefpipeError(f"--from {source}: no such folder (give the HPDv2 folder holding train.json/test.json)")
        self.split = split
        self.image_dir = self.root / split
        self.label = str(source)
        self.fingerprint = fingerprint(self.json.name, self.json.stat().st_size)

    def entries(self) -> Iterator[Any]:
        return iter_json_array(self.json)

    def check_first(self) -> None:
        """A file that is not HPDv2 stops at once (its first entry names what is missing)."""
        first = next(iter(self.entries()), None)
        if first is None:
            raise PrefpipeError(f"{self.json}: no entries")
        try:
            hpdv2_ranking(first)
        except _BadEntry as e:
            raise PrefpipeError(
                f"{self.json}: not an HPDv2 annotation file: entry 0: {e} (expected prompt, file_path/image_path, "
                "and human_preference or rank)"
            ) from None

    def image_path(self, rel: str) -> Path:
        for base in (self.image_dir, self.root):
            p = base / rel
            if p.exists():
                return p
        return self.image_dir / rel


def _hpdv2_units(src: HPDv2Source, opts: IngestOptions) -> Iterator[tuple[int, list[tuple[int, Any]]]]:
    """(unit, [(entry index, entry), ...]) in file order; `--limit` counts entries."""
    unit, chunk = 0, []
    for idx, entry in enumerate(src.entries()):
        if opts.limit is not None and idx >= opts.limit:
            break
        chunk.append((idx, entry))
        if len(chunk) == opts.entries_per_shard:
            yield unit, chunk
            unit, chunk = unit + 1, []
    if chunk:
        yield unit, chunk


def _hpdv2_light_pass(src: HPDv2Source, opts: IngestOptions) -> tuple[int, dict[int, Any]]:
    """Count the units and (when dropping duplicates) plan the global duplicates by (prompt, paths, outcome)."""
    n_units = 0

    def keyed():
        nonlocal n_units
        for unit, chunk in _hpdv2_units(src, opts):
            n_units = unit + 1
            rows, keys, k = [], [], 0
            for _, entry in chunk:
                try:
                    prompt, paths, scores = hpdv2_ranking(entry)
                except (_BadEntry, TypeError, ValueError):
                    continue
                for pair in ranking_pairs(scores, opts.pairs):
                    if _hpdv2_pair_light(prompt, paths, pair, opts) is None and opts.duplicates == "drop":
                        i, j, l0 = pair
                        a, b = os.path.normpath(paths[i]), os.path.normpath(paths[j])
                        rows.append(k)
                        keys.append(_key64(prompt.strip(), min(a, b), max(a, b), _outcome(l0, a, b)))
                    k += 1
            yield unit, rows, keys

    plan = plan_duplicates(keyed())
    return n_units, plan


def _hpdv2_image(src: HPDv2Source, checker: ImageChecker, cache: dict, rel: str) -> tuple:
    """(bytes to store, content hash, why bad) of one image path, read and checked once per entry."""
    if rel not in cache:
        p = src.image_path(rel)
        try:
            data = p.read_bytes()
        except OSError as e:
            cache[rel] = (None, None, f"cannot read {p}: {e.strerror or e}")
        else:
            stored, why = checker.check(data)
            cache[rel] = (stored, _digest(data), why)
    return cache[rel]


def _hpdv2_unit(src: HPDv2Source, chunk: list[tuple[int, Any]], opts: IngestOptions, dups, writer,
                checker: ImageChecker, bad: _BadRows, batch_size: int, bar) -> None:
    dup_rows = set(dups.tolist()) if dups is not None else set()
    seen: set[tuple] = set()
    rows: list[dict] = []
    k = 0  # pair index within the unit (the light pass numbers pairs the same way)

    def flush() -> None:
        if rows:
            writer.write(conform(pa.Table.from_pylist(rows), PAIRS))
            writer.count("kept", len(rows))
            rows.clear()

    for idx, entry in chunk:
        writer.count("entries_read")
        try:
            prompt, paths, scores = hpdv2_ranking(entry)
        except (_BadEntry, TypeError, ValueError) as e:
            writer.count("bad_entries")
            bad("bad_entry", f"{src.json.name} entry {idx}", str(e))
            continue
        images: dict[str, tuple[bytes | None, bytes | None, str | None]] = {}  # each image read once per entry
        for pair in ranking_pairs(scores, opts.pairs):
            i, j, l0 = pair
            writer.count("pairs_read")
            reason = _hpdv2_pair_light(prompt, paths, pair, opts)
            if reason is None and k in dup_rows:
                reason = "duplicate"
            k += 1
            if reason is None:
                (s0, h0, why0), (s1, h1, why1) = (_hpdv2_image(src, checker, images, paths[i]),
                                                  _hpdv2_image(src, checker, images, paths[j]))
                if why0 or why1:
                    reason = "bad_image"
                    bad_path, why = (paths[i], why0) if why0 else (paths[j], why1)
                    bad("bad_image", f"{src.json.name} entry {idx} image {bad_path}", why)
                elif opts.same_images == "drop" and h0 == h1:
                    reason = "same_images"
                elif opts.duplicates == "drop":
                    dkey = (prompt.strip(), min(h0, h1), max(h0, h1), _outcome(l0, h0, h1))
                    if dkey in seen:
                        reason = "duplicate"
                    seen.add(dkey)
            if reason is not None:
                writer.count(f"dropped_{reason}")
                continue
            if l0 == 0.5:
                writer.count("ties_kept")
            rows.append({
                "caption": prompt, "jpg_0": s0, "jpg_1": s1, "label_0": l0, "label_1": 1.0 - l0,
                "image_0_uid": paths[i], "image_1_uid": paths[j],
                "best_image_uid": None if l0 == 0.5 else (paths[i] if l0 == 1 else paths[j]),
                "has_label": True, "are_different": h0 != h1, "ranking_id": idx,
                "num_example_per_prompt": len(paths), "source": "human", "prompt_id": prompt_id(prompt),
            })
            if len(rows) >= batch_size:
                flush()
        if bar is not None:
            bar.update(1)
    flush()


def ingest_hpdv2(source: str | Path, out: str | Path, opts: IngestOptions | None = None, *,
                 batch_size: int = 64, progress: bool = True, rank: int | None = None,
                 world: int | None = None) -> dict:
    """Ingest HPDv2 rankings into `out/pairs/human` as pairs; run or resume this process's units."""
    opts = opts or IngestOptions()
    opts.validate()
    if batch_size < 1:
        raise PrefpipeError(f"--batch-size {batch_size}: must be at least 1")
    src = HPDv2Source(source, opts.split)
    src.check_first()
    if rank is None or world is None:
        rank, world = rank_world()
    n_units, dups = _hpdv2_light_pass(src, opts)
    folder = Path(out) / HUMAN_PAIRS
    ds = ShardedDataset(
        folder, stage="ingest hpdv2", options=opts.identity("hpdv2"), input_fingerprint=src.fingerprint,
        n_units=n_units, schema=PAIRS, runtime={"batch_size": batch_size, "world": world},
    ).open()
    todo = set(ds.pending(rank, world))
    mine = ds.units_for(rank, world)
    if rank == 0:
        click.echo(f"ingest hpdv2: {src.json} ({n_units} shards of up to {opts.entries_per_shard} entries, "
                   f"--pairs {opts.pairs})", err=True)
        _warn_ties(opts)
    counters: dict[str, Any] = {"units_written": 0, "units_skipped": len(mine) - len(todo)}
    t0 = time.perf_counter()
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(unit="entry", dynamic_ncols=True, disable=not progress,
                   desc=f"ingest[{rank}/{world}]" if world > 1 else "ingest")
        checker = ImageChecker(opts.verify_images, opts.max_side, opts.jpeg_quality)
        bad = _BadRows()
        for unit, chunk in _hpdv2_units(src, opts):
            if unit not in todo:
                continue
            with ds.write_unit(unit) as writer:
                _hpdv2_unit(src, chunk, opts, dups.get(unit), writer, checker, bad, batch_size, bar)
                if checker.resized:
                    writer.count("images_resized", checker.resized)
                    checker.resized = 0
            for k, v in writer.stats.items():
                counters[k] = counters.get(k, 0) + v
            counters["units_written"] += 1
        bar.close()
        counters["bad_row_examples"] = bad.examples
    return _finish(ds, "ingest hpdv2", "entries", counters, time.perf_counter() - t0, rank, world)


# -- summary ---------------------------------------------------------------------------------------
def _distinct_prompts(ds: ShardedDataset) -> int:
    import pyarrow.parquet as pq

    seen: set[str] = set()
    for u in range(ds.n_units):
        for b in pq.ParquetFile(ds.shard_path(u)).iter_batches(columns=["prompt_id"], batch_size=65536):
            seen.update(b.column(0).to_pylist())
    return len(seen)


def _warn_ties(opts: IngestOptions) -> None:
    if opts.ties == "keep":
        click.echo("ingest: --ties keep: ties are stored as label 0.5/0.5; the Diffusion-DPO reference trainers "
                   "count any label_0 other than 0 as a win for image 0", err=True)


def _finish(ds: ShardedDataset, stage: str, noun: str, counters: dict, wall: float, rank: int, world: int) -> dict:
    """Print the one-line summary and store the dataset-wide counters in `_prefpipe.json`."""
    total = ds.stats()
    done = sum(ds.is_done(u) for u in range(ds.n_units))
    read = total.get("rows_read", total.get("entries_read", 0))
    summary = {k: v for k, v in total.items() if k != "rows"}
    if done == ds.n_units:
        summary["prompts"] = _distinct_prompts(ds)
    dropped = ", ".join(f"{r.replace('_', ' ')} {total[f'dropped_{r}']}" for r in REASONS if total.get(f"dropped_{r}"))
    line = f"{stage}: read {read} {noun}"
    if "pairs_read" in total:
        line += f" ({total['pairs_read']} candidate pairs)"
    line += f", kept {total.get('kept', 0)} pairs"
    if "prompts" in summary:
        line += f" over {summary['prompts']} prompts"
    line += f"; dropped {dropped or 'none'}"
    if total.get("bad_entries"):
        line += f"; {total['bad_entries']} bad entries"
    line += f"; {counters['units_written']} new shards ({counters['units_skipped']} already done), "
    line += f"{done}/{ds.n_units} finished -> {ds.folder}"
    mine = counters.get("rows_read", counters.get("entries_read", 0))
    if wall > 0 and mine:
        line += f"; {mine / wall:.0f} {noun}/s"
    if world > 1:
        line = f"[rank {rank}/{world}] " + line
    ds.record(summary=summary)
    click.echo(line, err=True)
    counters.update(total=summary, wall_s=wall, shards_finished=done)
    return counters


# -- CLI -------------------------------------------------------------------------------------------
def _filter_options(f):
    drop_keep = click.Choice(["drop", "keep"])
    for decorator in reversed([
        click.option("--out", required=True, type=click.Path(), help="Work folder; pairs go to WORKDIR/pairs/human (re-run to resume)."),
        click.option("--ties", type=drop_keep, default="drop", show_default=True, help="Ties: drop (as the Diffusion-DPO paper), or keep as label 0.5/0.5."),
        click.option("--same-images", type=drop_keep, default="drop", show_default=True, help="Pairs of one image twice (are_different false, same path or identical bytes)."),
        click.option("--empty-captions", type=drop_keep, default="drop", show_default=True, help="Rows whose caption is empty or blank."),
        click.option("--duplicates", type=drop_keep, default="drop", show_default=True, help="Repeats of a pair (same caption, same images in either order, same outcome); the first is kept."),
        click.option("--verify-images", type=click.Choice(["full", "header", "none"]), default="header", show_default=True, help="full: decode every image; header: parse it and check the JPEG end marker (about 30x cheaper); none."),
        click.option("--max-side", type=click.IntRange(min=8), default=None, help="Re-encode (JPEG) images whose longer side exceeds N pixels, keeping the aspect ratio."),
        click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality of re-encoded images (--max-side)."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N input rows (Pick-a-Pic) or entries (HPDv2): a quick slice."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Rows per batch read and per output row group."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]):
        f = decorator(f)
    return f


@click.group(cls=PrefpipeGroup)
def ingest() -> None:
    """Bring human preference datasets in as pairs (WORKDIR/pairs/human, the pairs schema)."""


@ingest.command("pickapic")
@click.option("--from", "source", required=True, help="Folder, glob or file of the published Parquet shards (data/train-*.parquet; the *_no_images variant too), or a hub id (yuvalkirstain/pickapic_v2) streamed with `datasets`.")
@click.option("--split", default="train", show_default=True, help="Split to read (file names <split>-NNNNN-of-NNNNN*.parquet).")
@click.option("--unlabeled", type=click.Choice(["drop", "keep"]), default="drop", show_default=True, help="Rows with has_label false.")
@_filter_options
def pickapic_command(source, out, batch_size, no_progress, **options):
    """Pick-a-Pic v2 (or v1) preferences -> pairs."""
    ingest_pickapic(source, out, IngestOptions(**options), batch_size=batch_size, progress=not no_progress)


@ingest.command("hpdv2")
@click.option("--from", "source", required=True, type=click.Path(), help="HPDv2 folder: train.json / test.json with the images under train/ and test/.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True, help="Which annotation file (and image folder) to read.")
@click.option("--pairs", type=click.Choice(["all", "best-worst"]), default="all", show_default=True, help="all: every two images of a ranking; best-worst: one pair per ranking.")
@click.option("--entries-per-shard", type=click.IntRange(min=1), default=2000, show_default=True, help="Entries of the JSON file per output shard (the unit of resume and of sharding).")
@_filter_options
def hpdv2_command(source, out, batch_size, no_progress, **options):
    """HPDv2 rankings -> pairs."""
    ingest_hpdv2(source, out, IngestOptions(**options), batch_size=batch_size, progress=not no_progress)
