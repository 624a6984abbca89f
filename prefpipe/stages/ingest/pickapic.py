"""`prefpipe ingest pickapic`: Pick-a-Pic v2 (or v1) preferences -> pairs.

- Input: the published layout (`data/<split>-NNNNN-of-NNNNN-<hash>.parquet`), from a folder, a glob or one
  file, or a hub id streamed with `datasets` (units are then the hub's data files). The `*_no_images`
  variant (every column but `jpg_0`/`jpg_1`) gives pairs with null images: captions and labels only.
- One unit per input file; output shard k holds what survived of input file k.
- Every published column is kept; `__index_level_0__` is dropped; `source=human`, `prompt_id` added.

Each dropped row gets one reason, the first that applies in this order (cheap checks first, decoding last):
unlabeled (`has_label` false) · bad_label (labels not (1,0), (0,1) or (0.5,0.5)) · tie · same_images
(`are_different` false) · empty_caption · duplicate · same_images (identical bytes) · duplicate (identical
bytes) · bad_image (null, empty or undecodable). Every filter but bad_label can be switched off. Each dropped
row is logged with its key (file, row, ranking_id): faults at WARNING, the filters' drops at INFO.
Duplicates (see duplicates.py): by image uid across the dataset, from a first pass over only the light
columns (caption, uids, labels, flags); by image bytes within a unit.

A file that is not Parquet, or a shard found truncated or corrupt (at the start or mid-run), stops the run
with one message naming the file (PrefpipeError); the shards already written stay, so a re-run resumes.

Memory: the image columns are read one row group at a time (pyarrow decodes a whole column chunk), so the
peak is set by the largest input row group, not by the number of rows or files (benchmarks/ingest.py: the
same peak RSS at 1x and 10x).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.identity import files_fingerprint, fingerprint
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import PAIRS, check_columns, conform
from prefpipe.core.tables import parquet_files
from prefpipe.stages.ingest.duplicates import (
    RepeatedPairs,
    cached_plan,
    digest,
    key64,
    pair_key,
    plan_duplicates,
)
from prefpipe.stages.ingest.options import FILTERED, HUMAN_PAIRS, REASONS, IngestOptions
from prefpipe.stages.ingest.run import Job, UnitContext, checked_options, run_units

_CODE = {r: i + 1 for i, r in enumerate(REASONS)}  # 0 = kept
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


# -- sources ---------------------------------------------------------------------------------------
def _unreadable(path: Path, error: Exception, *, started: bool = False) -> PrefpipeError:
    """The one message for an input file that pyarrow cannot read: which file, why, what to do."""
    why = " ".join(str(error).split()) or type(error).__name__
    if not started and not _starts_as_parquet(path):
        return PrefpipeError(
            f"{path}: not a Parquet file ({why}). Remove it from the folder, or point --from at the shards alone "
            f"(a glob that leaves it out, e.g. --from '{path.parent}/train-*.parquet')"
        )
    return PrefpipeError(
        f"{path}: cannot be read: the Parquet file is truncated or corrupt ({why}). Download it again (or remove "
        "it and point --from at the other shards)" + ("; the shards already written are kept, a re-run resumes"
                                                        if started else "")
    )


def _starts_as_parquet(path: Path) -> bool:
    """Whether the file begins with Parquet's magic bytes (a Parquet file cut short still does)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


_READ_ERRORS = (pa.ArrowException, OSError)  # pyarrow's read errors (ArrowIOError is an OSError)


class ParquetSource:
    """Local Parquet files, one unit per file (in sorted path order)."""

    def __init__(self, files: list[Path], label: str):
        import pyarrow.parquet as pq

        self.files = files
        self.label = label
        self.rows, schemas = [], []
        for f in files:  # every footer read up front: a file that is not Parquet stops here, named
            try:
                pf = pq.ParquetFile(f)
                self.rows.append(pf.metadata.num_rows)
                schemas.append(pf.schema_arrow)
            except _READ_ERRORS as e:
                raise _unreadable(f, e) from None
        self.schema = schemas[0]
        for f, other in zip(files[1:], schemas[1:]):
            if not other.equals(self.schema):
                missing = sorted(set(self.schema.names) ^ set(other.names))
                raise PrefpipeError(
                    f"{f}: its columns differ from {files[0].name}'s"
                    + (f" ({', '.join(missing)})" if missing else " (types)") + "; give files of one dataset"
                )
        try:
            self.fingerprint = files_fingerprint(files)  # by content: a file changed in place is another input
        except _READ_ERRORS as e:
            raise self._culprit(e) from None

    def _culprit(self, error: Exception) -> PrefpipeError:
        """The fingerprint read a corrupt page in some file: find which (an error path only), name it."""
        for f in self.files:
            try:
                files_fingerprint([f])
            except _READ_ERRORS as e:
                return _unreadable(f, e)
        return PrefpipeError(f"--from {self.label}: the input files cannot be read ({error})")

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
        try:
            pf = pq.ParquetFile(self.files[unit], pre_buffer=False, buffer_size=1 << 20)
            batches = pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=False)
            for batch in batches:
                yield pa.Table.from_batches([batch])
        except _READ_ERRORS as e:  # a corrupt page met mid-run (the footer was fine at the start)
            raise _unreadable(self.files[unit], e, started=True) from None


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


def _unit_caps(source: ParquetSource | StreamingSource, limit: int | None) -> tuple[int, list[int | None]]:
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


# -- filters ---------------------------------------------------------------------------------------
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


_WHY = {  # why a row was dropped by a filter, for the log (by key)
    "unlabeled": "has_label is false",
    "tie": "labels (0.5, 0.5): a tie",
    "same_images": "are_different is false",
    "empty_caption": "the caption is empty or blank",
    "duplicate": "repeats an earlier pair (same caption, same image uids, same outcome)",
}
_WHY_BYTES = {
    "same_images": "the two images have identical bytes",
    "duplicate": "repeats an earlier pair of this shard (same caption, same image bytes, same outcome)",
}


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
        keys.append(key64(*pair_key(caps[i], a, b, l0[i])))
    return keyed, keys


def _duplicate_plan(source: ParquetSource | StreamingSource, caps: list[int | None], opts: IngestOptions,
                   folder: Path) -> dict[int, Any]:
    """The rows, per unit, that repeat an earlier pair by uid: from the light columns, cached in `folder`."""
    def light_pass():
        def keyed():
            for u in range(len(caps)):
                row0 = 0
                for t in _capped(source.batches(u, LIGHT_COLUMNS, 8192), caps[u]):
                    rows, keys = _pickapic_keys(t, (light_reasons(t, opts) == 0).nonzero()[0])
                    yield u, [r + row0 for r in rows], keys
                    row0 += t.num_rows
        return plan_duplicates(keyed())

    light = {k: getattr(opts, k) for k in ("split", "ties", "unlabeled", "same_images", "empty_captions", "limit")}
    return cached_plan(folder, fingerprint(source.fingerprint, light), light_pass)


# -- one unit --------------------------------------------------------------------------------------
def pickapic_unit(source: ParquetSource | StreamingSource, unit: int, cap: int | None, opts: IngestOptions,
                  dups, has_images: bool, ctx: UnitContext) -> None:
    """Read input unit `unit` (its first `cap` rows), drop rows with their reason, write the rest as pairs.

    `dups`: the unit's rows that repeat an earlier pair (from the duplicate plan), or None.
    """
    import numpy as np

    writer, checker, bad = ctx.writer, ctx.checker, ctx.bad
    repeated = RepeatedPairs(opts)  # byte-level duplicate keys within this unit
    row0 = 0
    where = source.where(unit)
    for table in _capped(source.batches(unit, None, ctx.batch_size), cap):
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
        by_bytes: set[int] = set()  # rows dropped as same_images / duplicate by their image bytes
        if has_images:
            imgs = (table["jpg_0"].to_pylist(), table["jpg_1"].to_pylist())
            out = (list(imgs[0]), list(imgs[1]))
            for i in np.flatnonzero(reasons == 0):
                key = f"{where} row {row0 + i} (ranking_id={rid[i]})"
                b0, b1 = imgs[0][i], imgs[1][i]
                if b0 and b1:
                    reason = repeated.reason(caps[i], digest(b0), digest(b1), l0[i])
                    if reason is not None:
                        reasons[i] = _CODE[reason]
                        by_bytes.add(int(i))
                        continue
                for k in (0, 1):
                    new, why = checker.check(imgs[k][i])
                    if why is not None:
                        reasons[i] = _CODE["bad_image"]
                        bad("bad_image", f"{key} image_{k}_uid={uids[k][i]}", why)
                        break
                    out[k][i] = new
        for i in np.flatnonzero(reasons == _CODE["bad_label"]):
            bad("bad_label", f"{where} row {row0 + i} (ranking_id={rid[i]})",
                f"labels ({table['label_0'][i]}, {table['label_1'][i]}) are not (1,0), (0,1) or (0.5,0.5)")
        for reason in FILTERED:  # the filters' drops, by key (up to the logger's cap: no keys built past it)
            for i in np.flatnonzero(reasons == _CODE[reason]):
                if not bad.wants(reason):
                    break
                why = (_WHY_BYTES if int(i) in by_bytes else _WHY)[reason]
                bad(reason, f"{where} row {row0 + i} (ranking_id={rid[i]})", why)
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
        if ctx.bar is not None:
            ctx.bar.update(n)


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
    opts = checked_options(opts, batch_size)
    src = source if isinstance(source, (ParquetSource, StreamingSource)) else open_pickapic_source(source, opts.split)
    has_images = check_pickapic_schema(src.schema, f"--from {src.label}")
    n_units, caps = _unit_caps(src, opts.limit)
    note = "" if has_images else " (no image columns: the _no_images variant; jpg_0/jpg_1 stay null)"

    def units(todo: list[int]):
        dups = _duplicate_plan(src, caps, opts, Path(out) / HUMAN_PAIRS) if opts.duplicates == "drop" else {}
        totals = [caps[u] if caps[u] is not None else src.unit_rows(u) for u in todo]
        return [(u, (caps[u], dups.get(u))) for u in todo], None if None in totals else sum(totals)

    def run_unit(unit: int, work: tuple, ctx: UnitContext) -> None:
        cap, dups = work
        # `pickapic_unit` is looked up in this module's namespace at each call, so replacing
        # `pickapic.pickapic_unit` (as the kill-and-resume test does, to slow it down) takes effect.
        pickapic_unit(src, unit, cap, opts, dups, has_images, ctx)

    return run_units(Job(
        stage="ingest pickapic", noun="rows", item="row", options=opts.identity("pickapic"),
        input_fingerprint=src.fingerprint, n_units=n_units, units=units, run_unit=run_unit,
        header=f"ingest pickapic: {src.label} split '{opts.split}', {n_units} input shards{note}",
    ), out, opts, batch_size=batch_size, progress=progress, rank=rank, world=world)
