"""Per-image feedback (`prefpipe feedback`) as training rows for Diffusion-KTO, each image read where its row points.

    feedback shards (FEEDBACK: keys + desirable, no image bytes)
        ──ImageSource(--images)──▶ the image and its caption, from
              a candidates dataset at (prompt_id, candidate)      (feedback --from scores or --from thumbs)
              a pairs dataset at (pairs_file, pairs_row, side)     (feedback --from pairs)
        ──FeedbackUnit.read()──▶ one row per image in the pairs layout the rest of `trainer/data` reads:
              jpg_0 = jpg_1 = the image, label_0 = 1 (desirable) or 0 (undesirable), image_0_uid = image_1_uid = its key

So a feedback run shares the pairs' whole data path (validation, preprocessing, the cache, the order, the
per-item random draws, exact resume): an item is one image, its "winner" slot holds it whatever the label
(label 0 swaps to slot 1, the same image), and :class:`trainer.data.pairs.PairData` with ``per_image`` hands the
label to the loss as ``desirable``. The image is decoded and VAE-encoded once (`rows.scan_unit`,
`cache.encode_scan` notice the two columns are one image). Nothing is copied to disk: a unit's images are looked
up when the unit is encoded (or, without a cache, when it is trained).

**Units**: the row groups of the feedback files (as for pairs). **Lookup**: the candidates' key columns are read
once (an index of (prompt_id, candidate) -> file, row group, row); a unit reads only the row groups it needs.
A pairs file is found by its *name* among the files of --images, never by joining a path read from the data,
so no row can point outside --images. A row whose image is not there is a dropped row (``missing_image``),
logged with its key; a file name that two files of --images share is an error (the row would be ambiguous).
The caption is the candidates' ``prompt`` or the pairs' ``caption`` (the feedback's own ``caption`` when
the image source has none).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.identity import fingerprint, input_fingerprint
from prefpipe.core.schema import FEEDBACK, check_columns
from prefpipe.core.tables import parquet_file, parquet_files
from trainer.data.rows import Unit

CANDIDATE_COLUMNS = {"prompt_id": (pa.string(), pa.large_string()), "candidate": (pa.int8(), pa.int16(), pa.int32(), pa.int64()),
                     "prompt": (pa.string(), pa.large_string()), "image": (pa.binary(), pa.large_binary())}
PAIRS_IMAGE_COLUMNS = {"caption": (pa.string(), pa.large_string()), "jpg_0": (pa.binary(), pa.large_binary()),
                       "jpg_1": (pa.binary(), pa.large_binary())}
FEEDBACK_COLUMNS = {"desirable": (pa.bool_(),), "prompt_id": (pa.string(), pa.large_string())}
_READ = ("prompt_id", "caption", "candidate", "image_uid", "pairs_file", "pairs_row", "side", "desirable")


@dataclass
class _Location:
    file: int
    row_group: int
    row: int  # within the row group


@dataclass
class ImageSource:
    """Where feedback rows find their images: a candidates dataset or a pairs dataset (see the module doc)."""

    path: Path
    kind: str  # "candidates" | "pairs"
    files: list[Path]
    _candidates: dict[tuple[str, int], _Location] = field(default_factory=dict, repr=False)
    _pairs_by_name: dict[str, int] = field(default_factory=dict, repr=False)
    _row_group_starts: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # pairs: first row of each

    @classmethod
    def open(cls, path: str | Path) -> ImageSource:
        """Index `path`: a candidates dataset (`prefpipe generate`) or a pairs dataset; a PrefpipeError names a
        folder that is neither, or a file name two of its files share."""
        files = parquet_files(path)
        names = parquet_file(files[0]).schema_arrow.names
        if "image" in names and "candidate" in names:
            source = cls(Path(path), "candidates", files)
            for i, f in enumerate(files):
                check_columns(parquet_file(f).schema_arrow, CANDIDATE_COLUMNS, f"{f} (a candidates dataset for --images)")
                pf = parquet_file(f)
                for rg in range(pf.metadata.num_row_groups):
                    keys = pf.read_row_group(rg, columns=["prompt_id", "candidate"])
                    for row, (pid, cand) in enumerate(zip(keys["prompt_id"].to_pylist(), keys["candidate"].to_pylist())):
                        source._candidates.setdefault((str(pid), int(cand)), _Location(i, rg, row))
            return source
        if all(c in names for c in PAIRS_IMAGE_COLUMNS):
            source = cls(Path(path), "pairs", files)
            for i, f in enumerate(files):
                check_columns(parquet_file(f).schema_arrow, PAIRS_IMAGE_COLUMNS, f"{f} (a pairs dataset for --images)")
                if f.name in source._pairs_by_name:
                    raise PrefpipeError(f"--images {path}: two files are named {f.name} ({files[source._pairs_by_name[f.name]]} "
                                        f"and {f}): feedback rows name their pairs file by name; point --images at one of them")
                source._pairs_by_name[f.name] = i
                meta = parquet_file(f).metadata
                sizes = [meta.row_group(rg).num_rows for rg in range(meta.num_row_groups)]
                source._row_group_starts[i] = np.cumsum([0, *sizes])
            return source
        raise PrefpipeError(f"--images {path}: neither a candidates dataset (columns prompt_id, candidate, prompt, image) "
                            f"nor a pairs dataset (caption, jpg_0, jpg_1); {files[0].name} has {', '.join(names)}")

    def fingerprint(self) -> str:
        return input_fingerprint(self.path)

    def locate(self, row: dict) -> tuple[_Location, str | None] | None:
        """Where one feedback row's image is: (location, the pairs image column, or None for candidates)."""
        if self.kind == "candidates":
            if row["prompt_id"] is None or row["candidate"] is None:
                return None
            loc = self._candidates.get((row["prompt_id"], int(row["candidate"])))
            return None if loc is None else (loc, None)
        if row["pairs_file"] is None or row["pairs_row"] is None or row["side"] not in (0, 1):
            return None
        i = self._pairs_by_name.get(row["pairs_file"])
        if i is None:
            return None
        starts, r = self._row_group_starts[i], int(row["pairs_row"])
        if not 0 <= r < starts[-1]:
            return None
        rg = int(np.searchsorted(starts, r, side="right")) - 1
        return _Location(i, rg, r - int(starts[rg])), f"jpg_{row['side']}"

    def read(self, rows: list[dict]) -> tuple[list[bytes | None], list[str | None]]:
        """The image bytes and caption of each feedback row (None, None where its image is not found), reading
        each needed row group once."""
        located = [self.locate(r) for r in rows]
        wanted: dict[tuple[int, int], list[int]] = defaultdict(list)
        for k, hit in enumerate(located):
            if hit is not None:
                wanted[(hit[0].file, hit[0].row_group)].append(k)
        images: list[bytes | None] = [None] * len(rows)
        captions: list[str | None] = [None] * len(rows)
        for (i, rg), ks in wanted.items():
            if self.kind == "candidates":
                table = parquet_file(self.files[i]).read_row_group(rg, columns=["prompt", "image"])
                for k in ks:
                    row = located[k][0].row
                    images[k], captions[k] = table["image"][row].as_py(), table["prompt"][row].as_py()
            else:
                table = parquet_file(self.files[i]).read_row_group(rg, columns=["caption", "jpg_0", "jpg_1"])
                for k in ks:
                    loc, column = located[k]
                    images[k], captions[k] = table[column][loc.row].as_py(), table["caption"][loc.row].as_py()
        return images, captions


@dataclass(frozen=True)
class FeedbackUnit(Unit):
    """One row group of a feedback file; :meth:`read` gives its rows in the pairs layout (see the module doc)."""

    images: ImageSource | None = field(default=None, compare=False, hash=False)

    def read(self) -> pa.Table:
        table = parquet_file(self.file).read_row_group(self.row_group, columns=list(_READ)).slice(0, self.take)
        rows = table.to_pylist()
        images, captions = self.images.read(rows)
        keys = [feedback_key(r) for r in rows]
        own = [r["caption"] for r in rows]
        return pa.table({
            "caption": pa.array([c if c is not None else o for c, o in zip(captions, own)], pa.string()),
            "jpg_0": pa.array(images, pa.binary()),
            "jpg_1": pa.array(images, pa.binary()),
            # a null label (a table not written by `prefpipe feedback`) is a bad row, never "undesirable"
            "label_0": pa.array([None if r["desirable"] is None else float(bool(r["desirable"])) for r in rows], pa.float64()),
            "image_0_uid": pa.array(keys, pa.string()),
            "image_1_uid": pa.array(keys, pa.string()),
        })


def feedback_key(row: dict) -> str:
    """A feedback row's image in logs and crop seeds: its uid, else ``prompt_id#candidate``, else
    ``pairs_file:row:side``."""
    if row.get("image_uid"):
        return str(row["image_uid"])
    if row.get("candidate") is not None:
        return f"{row['prompt_id']}#{row['candidate']}"
    return f"{row['pairs_file']}:{row['pairs_row']}:{row['side']}"


def list_feedback_units(sources: list[Path], images: ImageSource, limit: int | None = None) -> list[FeedbackUnit]:
    """Every row group of every feedback source, in order, truncated to the first `limit` rows; a PrefpipeError
    names a file that is not a feedback table."""
    units: list[FeedbackUnit] = []
    remaining = limit if limit is not None else float("inf")
    for source in sources:
        if not Path(source).exists() and not any(ch in str(source) for ch in "*?["):
            raise PrefpipeError(f"--feedback {source}: no such file or folder")
        for f in parquet_files(source):
            schema = parquet_file(f).schema_arrow
            check_columns(schema, FEEDBACK_COLUMNS, f"{f} (a feedback dataset: `prefpipe feedback`)")
            missing = [c for c in _READ if c not in schema.names]
            if missing:
                raise PrefpipeError(f"{f}: not a feedback table ({', '.join(missing)} missing; the columns are "
                                    f"{', '.join(FEEDBACK.names)}): write it with `prefpipe feedback`")
            meta = parquet_file(f).metadata
            for rg in range(meta.num_row_groups):
                if remaining <= 0:
                    return units
                take = int(min(meta.row_group(rg).num_rows, remaining))
                if take > 0:
                    units.append(FeedbackUnit(Path(f), rg, take, images))
                remaining -= take
    return units


def feedback_fingerprint(sources: list[Path], images: ImageSource, limit: int | None) -> str:
    """Identity of a feedback run's input: the feedback tables and the image dataset by content, and --limit."""
    return fingerprint("feedback", [input_fingerprint(s) for s in sources], images.fingerprint(), limit)
