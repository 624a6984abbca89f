"""Rows of a pairs dataset: units (row groups), the schema check, validation, and the joint preprocessing.

**Bad rows** (undecodable image, empty caption, bad label) are counted, logged with their key
(`image_0_uid`/`image_1_uid`, else `prompt_id`, else `file:rowgroup:row`) and skipped.

**Joint preprocessing** (:func:`prepare_pair`). If the two images differ in size, image 1 is resized to
image 0's size first (as diffusers' SDXL DPO script does); both are then resized (short side to the
resolution, bilinear with antialias) and cropped with the *same* offsets, and flipped together. The centre
crop is the default; `random_crop` draws one crop per pair from `(seed, row key)`, the same in every epoch
and on both paths (cache and live). SDXL's `crop_top_left` is the crop's offset in the frame the model sees
(after the flip).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.identity import fingerprint, input_fingerprint
from prefpipe.core.images import BadImage, decode, to_rgb
from prefpipe.core.schema import check_columns
from prefpipe.core.tables import parquet_file, parquet_files

log = logging.getLogger("prefpipe.train")

_FLOAT_TYPES = (pa.float64(), pa.float32(), pa.float16(), pa.int64(), pa.int32(), pa.int16(), pa.int8())
REQUIRED_COLUMNS: dict[str, tuple[pa.DataType, ...]] = {
    "caption": (pa.string(), pa.large_string()),
    "jpg_0": (pa.binary(), pa.large_binary()),
    "jpg_1": (pa.binary(), pa.large_binary()),
    "label_0": _FLOAT_TYPES,
}
KEY_COLUMNS = ("image_0_uid", "image_1_uid", "prompt_id")
_MAX_LOGGED_BAD_ROWS = 20
# What `describe_drops` says of each counter of dropped rows.
PAIR_DROPS = {"ties_dropped": "ties (label_0 = 0.5; --keep-ties half keeps them)", "empty_caption": "empty caption",
              "missing_image": "no image (a null image, or a feedback row pointing at no image of --images)",
              "bad_image": "undecodable image", "bad_label": "label_0 not 0, 0.5 or 1"}


@dataclass(frozen=True)
class Unit:
    """One row group of one pairs file; `take` rows of it are used (less than all under --limit)."""

    file: Path
    row_group: int
    take: int

    @property
    def name(self) -> str:
        return f"{self.file.name}:{self.row_group}"

    def read(self) -> pa.Table:
        """The columns training reads (:data:`REQUIRED_COLUMNS` and the key columns present), `take` rows."""
        cols = check_pairs_schema(self.file)
        return parquet_file(self.file).read_row_group(self.row_group, columns=cols).slice(0, self.take)


def check_pairs_schema(path: Path) -> list[str]:
    """The columns to read from one pairs file; a PrefpipeError names a missing or mistyped column."""
    schema = parquet_file(path).schema_arrow
    check_columns(schema, REQUIRED_COLUMNS, f"{path} (a pairs dataset needs caption, jpg_0, jpg_1 and label_0)")
    return list(REQUIRED_COLUMNS) + [c for c in KEY_COLUMNS if c in schema.names]


def list_units(sources: list[Path], limit: int | None = None) -> list[Unit]:
    """Every row group of every source, in order, truncated to the first `limit` rows."""
    units: list[Unit] = []
    remaining = limit if limit is not None else float("inf")
    for source in sources:
        if not Path(source).exists() and not any(ch in str(source) for ch in "*?["):
            raise PrefpipeError(f"pairs dataset {source}: no such file or folder")
        for f in parquet_files(source):
            check_pairs_schema(f)
            meta = parquet_file(f).metadata
            for rg in range(meta.num_row_groups):
                if remaining <= 0:
                    return units
                n = meta.row_group(rg).num_rows
                take = int(min(n, remaining))
                if take > 0:
                    units.append(Unit(Path(f), rg, take))
                remaining -= take
    return units


def read_unit(unit: Unit) -> pa.Table:
    """The columns training reads from one unit (its `take` first rows), in the pairs layout whatever the unit
    (a pairs row group, or a feedback row group with its images looked up: `trainer/data/feedback.py`)."""
    return unit.read()


def sources_fingerprint(sources: list[Path], limit: int | None) -> str:
    """Identity of the training input: every source's files by content (`input_fingerprint`), and --limit."""
    return fingerprint([input_fingerprint(s) for s in sources], limit)


def row_key(table: pa.Table, i: int, unit: Unit, offset: int = 0) -> str:
    """A row's name in logs: the image uids, else the prompt id, else file:rowgroup:row."""
    cols = table.column_names
    if "image_0_uid" in cols and "image_1_uid" in cols:
        a, b = table["image_0_uid"][i].as_py(), table["image_1_uid"][i].as_py()
        if a and b:
            return a if a == b else f"{a}/{b}"  # one uid: a single image (per-image feedback)
    if "prompt_id" in cols and table["prompt_id"][i].as_py():
        return f"{table['prompt_id'][i].as_py()}@{unit.name}:{offset + i}"
    return f"{unit.name}:{offset + i}"


@dataclass
class PreparedPair:
    """Both images of a pair after the joint resize and crop, in column order (image 0, image 1)."""

    pixels: Tensor  # (2, 3, R, R) in [-1, 1]
    original_size: Tensor  # (2, 2) int: (height, width) of each image as stored
    crop_top_left: Tensor  # (2,) int: (top, left) of the crop in the resized, possibly flipped, frame


def prepare_pair(img0, img1, resolution: int, *, crop: tuple[int, int] | str = "center", flip: bool = False,
                 rng: random.Random | None = None) -> PreparedPair:
    """Resize both images (short side -> `resolution`), crop both at the same offsets, flip both or neither.

    crop: ``"center"``, ``"random"`` (offsets drawn from `rng`) or explicit ``(top, left)`` in the resized
    frame before any flip. Image 1 is first resized to image 0's size when they differ.
    """
    import torchvision.transforms.functional as TF

    original = torch.tensor([[img0.height, img0.width], [img1.height, img1.width]], dtype=torch.int32)
    if img1.size != img0.size:
        img1 = img1.resize(img0.size, resample=3)  # bicubic
    t0, t1 = TF.pil_to_tensor(img0), TF.pil_to_tensor(img1)
    both = torch.cat([t0, t1], dim=0).float() / 255.0  # (6, H, W): one resize/crop/flip for both
    both = TF.resize(both, resolution, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    h, w = both.shape[-2:]
    if crop == "center":
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    elif crop == "random":
        rng = rng or random.Random()
        top, left = rng.randint(0, h - resolution), rng.randint(0, w - resolution)
    else:
        top, left = crop
    both = both[:, top : top + resolution, left : left + resolution]
    if flip:
        both = both.flip(-1)
        left = w - resolution - left  # the crop as seen in the flipped frame
    pixels = (both * 2.0 - 1.0).reshape(2, 3, resolution, resolution)
    return PreparedPair(pixels, original, torch.tensor([top, left], dtype=torch.int32))


def crop_rng(seed: int, key: str) -> random.Random:
    """The random crop of one pair: a pure function of (seed, row key), the same on every run and path."""
    return random.Random(fingerprint("crop", seed, key))


@dataclass
class RowScan:
    """The kept rows of one unit, in order, and what was dropped."""

    rows: list[int] = field(default_factory=list)
    label_0: list[float] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    images: list[tuple] = field(default_factory=list)  # decoded (img0, img1) of kept rows (not stored)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def compact(self) -> RowScan:
        """The rows and labels as numpy arrays (8 and 4 bytes a row, not two Python objects): a scan kept for
        the whole run, one per unit, stays small at Pick-a-Pic's million rows."""
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.label_0 = np.asarray(self.label_0, dtype=np.float32)
        return self


class _BadRowLog:
    """Logs the first bad rows of a run one by one, then only counts them."""

    def __init__(self) -> None:
        self.logged = 0

    def __call__(self, key: str, reason: str, detail: str) -> None:
        if self.logged < _MAX_LOGGED_BAD_ROWS:
            extra = f" ({detail})" if detail else ""
            log.warning("train: skipping row %s: %s%s", key, reason.replace("_", " "), extra)
        elif self.logged == _MAX_LOGGED_BAD_ROWS:
            log.warning("train: more bad rows: counted in the summary, not logged one by one")
        self.logged += 1


_bad_rows = _BadRowLog()


def log_bad_row(key: str, reason: str, detail: str = "") -> None:
    """Log a skipped row with its key (the first ones of a run one by one; all are counted by the caller)."""
    _bad_rows(key, reason, detail)


def reset_bad_row_log() -> None:
    """Start logging bad rows one by one again (each run logs its first ones)."""
    _bad_rows.logged = 0


def scan_unit(table: pa.Table, unit: Unit, keep_images: bool = True, offset: int = 0) -> RowScan:
    """Validate every row of a unit (or of its rows `offset`, ... when `table` is a slice of it): caption
    present, label in {0, 0.5, 1}, both images decodable. Kept rows keep their decoded images when asked."""
    scan = RowScan()
    captions, labels = table["caption"].to_pylist(), table["label_0"].to_pylist()
    jpg0, jpg1 = table["jpg_0"], table["jpg_1"]
    for i in range(table.num_rows):
        scan.count("rows_read")
        key = row_key(table, i, unit, offset)
        reason = None
        caption, label = captions[i], labels[i]
        if caption is None or not str(caption).strip():
            reason = "empty_caption"
        elif label is None or float(label) not in (0.0, 0.5, 1.0):
            reason = "bad_label"
        elif not jpg0[i].is_valid or not jpg1[i].is_valid:
            reason = "missing_image"
        else:
            try:
                data0, data1 = jpg0[i].as_py(), jpg1[i].as_py()
                # one image in both columns (per-image feedback): decoded once, the same object twice
                converted = [to_rgb(decode(data0))] if data0 == data1 else [to_rgb(decode(d)) for d in (data0, data1)]
                images = (converted[0][0], converted[-1][0])
                if any(note for _, note in converted):
                    scan.count("images_converted", sum(note is not None for _, note in converted))
            except BadImage as e:
                reason, detail = "bad_image", str(e)
        if reason is not None:
            scan.count(reason)
            _bad_rows(key, reason, detail if reason == "bad_image" else "")
            continue
        scan.rows.append(offset + i)
        scan.label_0.append(float(label))
        scan.keys.append(key)
        if keep_images:  # the captions and images of the rows to encode now (a scan only needs the rows' keys)
            scan.captions.append(str(caption))
            scan.images.append(images)
        if images[0].size != images[1].size:
            scan.count("resized_to_match")
    return scan
