"""Pairs datasets -> training tensors, with a cache of VAE latents and text embeddings.

    pairs shards ──scan──▶ rows kept (caption, both images decode, label in {0, 0.5, 1})
                 ──prepare──▶ joint resize + crop (+ flip) of both images
                 ──encode──▶ VAE moments (mean, logvar) + text embeddings ──▶ cache unit files
    index (one item per trained pair, winner first) ──order(seed, epoch)──▶ micro-batches ──▶ PairBatch

**Input.** Any pairs dataset: ours (`prefpipe.schema.PAIRS`) or Pick-a-Pic shards as published. Only
`caption`, `jpg_0`, `jpg_1` (encoded PNG/JPEG bytes) and `label_0` are read (plus `image_0_uid`,
`image_1_uid`, `prompt_id` for the row key when present). A missing column stops at once, naming it.

**Winner.** `label_0 == 1`: image 0 wins; `0`: image 1 wins; `0.5`: a tie, dropped by default
(`keep_ties="skip"`) or, with `"half"`, trained in *both* orders at weight 0.5 each: the two DPO terms
`-logsigmoid(x) - logsigmoid(-x)` are minimised at `x = 0`, so a tie pulls the implicit reward margin to
zero instead of pushing it towards an arbitrary side. Other labels are bad rows.

**Bad rows** (undecodable image, empty caption, bad label) are counted, logged with their key
(`image_0_uid`/`image_1_uid`, else `prompt_id`, else `file:rowgroup:row`) and skipped.

**Joint preprocessing** (:func:`prepare_pair`). If the two images differ in size, image 1 is resized to
image 0's size first (as diffusers' SDXL DPO script does); both are then resized (short side to the
resolution, bilinear with antialias) and cropped with the *same* offsets, and flipped together. The centre
crop is the default; `random_crop` draws one crop per pair from `(seed, row key)`, the same in every epoch
and on both paths below. SDXL's `crop_top_left` is the crop's offset in the frame the model sees (after
the flip).

**The cache** (default on). Units are the row groups of the input files; process `rank` of `world` encodes
units `rank, rank + world, ...` into `CACHE/pairs-KEY/unit-NNNNN.safetensors` (written to a temporary name,
renamed when complete, so a killed run resumes and a finished unit is never encoded twice). KEY is a
fingerprint of everything the tensors depend on: the input files (names and sizes), `limit`, the model's
VAE and text encoders (path or hub id, plus file sizes and times for a local folder), `vae`, `vae_dtype`,
the resolution and the crop/flip policy. Each unit stores, for its kept rows, the VAE latent distribution
as **mean and log-variance** (like diffusers' `latent_dist`), so training still *samples* latents as the
reference trainers do (`latent_dist.sample()`), with each pair's own generator; with `random_flip` it
stores both orientations (flipping latents is not flipping pixels), doubling the latent storage. Text
embeddings are stored once per distinct caption within a unit. Storage dtype is float16 for everything
(2 images x (mean + logvar) x 4 x 128 x 128 x 2 bytes = 512 KiB per SDXL pair at 1024 px). Rows are
decoded and encoded `chunk` at a time; a unit's tensors are held until its file is written. The
on-the-fly path (`no_cache`) runs the same functions and rounds to the same dtype, so both paths feed the
loop the same inputs (up to the float rounding of a different encoding batch).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from prefpipe.dataset import fingerprint, input_fingerprint, parquet_files
from prefpipe.errors import PrefpipeError
from prefpipe.schema import check_columns
from trainer.conditioning import PromptEmbeds, TextConditioner, time_ids

log = logging.getLogger("prefpipe.train")

STORE_DTYPE = torch.float16  # cache storage; the on-the-fly path rounds to it too
CACHE_FORMAT = 1
_FLOAT_TYPES = (pa.float64(), pa.float32(), pa.float16(), pa.int64(), pa.int32(), pa.int16(), pa.int8())
REQUIRED_COLUMNS: dict[str, tuple[pa.DataType, ...]] = {
    "caption": (pa.string(), pa.large_string()),
    "jpg_0": (pa.binary(), pa.large_binary()),
    "jpg_1": (pa.binary(), pa.large_binary()),
    "label_0": _FLOAT_TYPES,
}
KEY_COLUMNS = ("image_0_uid", "image_1_uid", "prompt_id")
_MAX_LOGGED_BAD_ROWS = 20


# ------------------------------------------------------------------------------------------------------
# Units of input: the row groups of every pairs file
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One row group of one pairs file; `take` rows of it are used (less than all under --limit)."""

    file: Path
    row_group: int
    take: int

    @property
    def name(self) -> str:
        return f"{self.file.name}:{self.row_group}"


def check_pairs_schema(path: Path) -> list[str]:
    """The columns to read from one pairs file; a PrefpipeError names a missing or mistyped column."""
    schema = pq.ParquetFile(path).schema_arrow
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
            meta = pq.ParquetFile(f).metadata
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
    """The columns training reads from one unit (its `take` first rows)."""
    cols = check_pairs_schema(unit.file)
    return pq.ParquetFile(unit.file).read_row_group(unit.row_group, columns=cols).slice(0, unit.take)


def sources_fingerprint(sources: list[Path], limit: int | None) -> str:
    """Identity of the training input: every source's file names and sizes, and --limit."""
    return fingerprint([input_fingerprint(s) for s in sources], limit)


# ------------------------------------------------------------------------------------------------------
# Rows: validation and joint preprocessing
# ------------------------------------------------------------------------------------------------------


def row_key(table: pa.Table, i: int, unit: Unit, offset: int = 0) -> str:
    """A row's name in logs: the image uids, else the prompt id, else file:rowgroup:row."""
    cols = table.column_names
    if "image_0_uid" in cols and "image_1_uid" in cols:
        a, b = table["image_0_uid"][i].as_py(), table["image_1_uid"][i].as_py()
        if a and b:
            return f"{a}/{b}"
    if "prompt_id" in cols and table["prompt_id"][i].as_py():
        return f"{table['prompt_id'][i].as_py()}@{unit.name}:{offset + i}"
    return f"{unit.name}:{offset + i}"


def decode_image(data: bytes | None):
    """Encoded bytes (PNG, JPEG, ...) -> an RGB PIL image; raises ValueError when undecodable."""
    from PIL import Image

    if not data:
        raise ValueError("no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from e


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


# ------------------------------------------------------------------------------------------------------
# Encoding (shared by the cache and the on-the-fly path)
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentSpec:
    """How raw VAE latents become UNet latents: ``(z - shift) * scale``."""

    scaling_factor: float
    shift_factor: float = 0.0

    @classmethod
    def of(cls, vae) -> LatentSpec:
        return cls(float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0))


@dataclass
class Encoders:
    """Everything that turns pixels and captions into tensors (absent once the cache is built)."""

    vae: Any
    text: TextConditioner
    batch_size: int = 8

    @torch.no_grad()
    def moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """pixels ``(N, 3, R, R)`` in [-1, 1] -> VAE latent distribution (mean, logvar), each
        ``(N, 4, R/8, R/8)`` in :data:`STORE_DTYPE`, on the CPU."""
        means, logvars = [], []
        vae = self.vae
        dev, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        for i in range(0, pixels.shape[0], self.batch_size):
            dist = vae.encode(pixels[i : i + self.batch_size].to(dev, dtype)).latent_dist
            means.append(dist.mean.to("cpu", STORE_DTYPE))
            logvars.append(dist.logvar.to("cpu", STORE_DTYPE))
        return torch.cat(means), torch.cat(logvars)

    @torch.no_grad()
    def captions(self, captions: list[str]) -> PromptEmbeds:
        """Distinct captions -> embeddings ``(U, 77, D)`` (+ pooled ``(U, P)``) in STORE_DTYPE, on the CPU."""
        parts = [self.text.encode(captions[i : i + self.batch_size]) for i in range(0, len(captions), self.batch_size)]
        pe = torch.cat([p.prompt_embeds for p in parts]).to("cpu", STORE_DTYPE)
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts]).to("cpu", STORE_DTYPE)
        return PromptEmbeds(pe, pooled)


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


_logged_bad = 0


def scan_unit(table: pa.Table, unit: Unit, keep_images: bool = True, offset: int = 0) -> RowScan:
    """Validate every row of a unit (or of its rows `offset`, ... when `table` is a slice of it): caption
    present, label in {0, 0.5, 1}, both images decodable. Kept rows keep their decoded images when asked."""
    global _logged_bad
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
        else:
            try:
                images = (decode_image(jpg0[i].as_py()), decode_image(jpg1[i].as_py()))
            except ValueError as e:
                reason, detail = "bad_image", str(e)
        if reason is not None:
            scan.count(reason)
            if _logged_bad < _MAX_LOGGED_BAD_ROWS:
                extra = f" ({detail})" if reason == "bad_image" else ""
                log.warning("train: skipping row %s: %s%s", key, reason.replace("_", " "), extra)
            elif _logged_bad == _MAX_LOGGED_BAD_ROWS:
                log.warning("train: more bad rows: counted in the summary, not logged one by one")
            _logged_bad += 1
            continue
        scan.rows.append(offset + i)
        scan.label_0.append(float(label))
        scan.keys.append(key)
        scan.captions.append(str(caption))
        if keep_images:
            scan.images.append(images)
        if images[0].size != images[1].size:
            scan.count("resized_to_match")
    return scan


def encode_scan(scan: RowScan, encoders: Encoders, resolution: int, *, random_crop: bool, seed: int,
                orientations: tuple[bool, ...] = (False,)) -> dict[str, Tensor]:
    """The tensors of a unit's kept rows (what a cache unit file holds).

    For each orientation o (False: as stored, True: flipped) with suffix ``""`` / ``"_flip"``:
    ``mean{o}``, ``logvar{o}``: ``(N, 2, 4, h, w)`` (images 0 and 1); ``crop{o}``: ``(N, 2)`` (top, left).
    Also ``original_size`` ``(N, 2, 2)``; ``caption_index`` ``(N,)`` into ``prompt_embeds`` ``(U, 77, D)``
    (and ``pooled`` ``(U, P)`` for SDXL), one entry per distinct caption.
    """
    n = len(scan.rows)
    out: dict[str, Tensor] = {}
    distinct = list(dict.fromkeys(scan.captions))
    where = {c: i for i, c in enumerate(distinct)}
    out["caption_index"] = torch.tensor([where[c] for c in scan.captions], dtype=torch.int64)
    if n:
        emb = encoders.captions(distinct)
        out["prompt_embeds"] = emb.prompt_embeds
        if emb.pooled is not None:
            out["pooled"] = emb.pooled
    for flip in orientations:
        suffix = "_flip" if flip else ""
        prepared = []
        for (img0, img1), key in zip(scan.images, scan.keys):
            crop = "center" if not random_crop else _random_crop_offsets(img0, img1, resolution, seed, key)
            prepared.append(prepare_pair(img0, img1, resolution, crop=crop, flip=flip))
        if not prepared:
            continue
        pixels = torch.cat([p.pixels for p in prepared])  # (2N, 3, R, R): pair i at rows 2i, 2i+1
        mean, logvar = encoders.moments(pixels)
        out["mean" + suffix] = mean.reshape(n, 2, *mean.shape[1:])
        out["logvar" + suffix] = logvar.reshape(n, 2, *logvar.shape[1:])
        out["crop" + suffix] = torch.stack([p.crop_top_left for p in prepared])
        out["original_size"] = torch.stack([p.original_size for p in prepared])
    return out


def encode_unit(table: pa.Table, unit: Unit, encoders: Encoders, resolution: int, *, random_crop: bool, seed: int,
                orientations: tuple[bool, ...], chunk: int = 64) -> tuple[dict[str, Tensor], RowScan]:
    """:func:`scan_unit` + :func:`encode_scan` over a whole unit, `chunk` rows at a time, so that at most
    `chunk` decoded pairs are in memory (the unit's latents are, until its file is written)."""
    total = RowScan()
    parts: list[dict[str, Tensor]] = []
    for start in range(0, table.num_rows, chunk):
        scan = scan_unit(table.slice(start, chunk), unit, offset=start)
        parts.append(encode_scan(scan, encoders, resolution, random_crop=random_crop, seed=seed,
                                 orientations=orientations))
        total.rows += scan.rows
        total.label_0 += scan.label_0
        total.keys += scan.keys
        for k, v in scan.counts.items():
            total.count(k, v)
    out: dict[str, Tensor] = {}
    n_captions = 0
    for part in parts:
        part = dict(part)
        part["caption_index"] = part["caption_index"] + n_captions
        n_captions += part["prompt_embeds"].shape[0] if "prompt_embeds" in part else 0
        for k, v in part.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}, total


def _random_crop_offsets(img0, img1, resolution: int, seed: int, key: str) -> tuple[int, int]:
    """The per-pair random crop, in the resized frame (computed on image 0's resized size)."""
    h, w = img0.height, img0.width  # the resized size as torchvision computes it (short side -> resolution)
    rh, rw = (resolution, int(resolution * w / h)) if h <= w else (int(resolution * h / w), resolution)
    rng = crop_rng(seed, key)
    return rng.randint(0, rh - resolution), rng.randint(0, rw - resolution)


# ------------------------------------------------------------------------------------------------------
# The cache on disk
# ------------------------------------------------------------------------------------------------------


def model_identity(model: str, vae: str | None) -> dict[str, Any]:
    """What the encoders' outputs depend on: ids, or for local folders the weight files' sizes and times."""
    ident: dict[str, Any] = {"model": model, "vae": vae}
    for name, path in (("model", model), ("vae", vae)):
        if path and Path(path).exists():
            root = Path(path).resolve()
            ident[name] = str(root)
            files = []
            for sub in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "."):
                d = root / sub
                if d.is_dir():
                    for f in sorted(d.iterdir()):
                        if f.is_file():
                            st = f.stat()
                            files.append((f"{sub}/{f.name}", st.st_size, st.st_mtime_ns))
            ident[name + "_files"] = files
    return ident


def cache_key(parts: dict[str, Any]) -> str:
    """The cache folder's name for these key parts (see the module docstring)."""
    return fingerprint(CACHE_FORMAT, parts)


class PairCache:
    """`CACHE/pairs-KEY/`: one `unit-NNNNN.safetensors` per input unit (see the module docstring)."""

    def __init__(self, root: Path, parts: dict[str, Any], n_units: int):
        self.parts = parts
        self.folder = Path(root) / f"pairs-{cache_key(parts)}"
        self.n_units = n_units
        self._handles: OrderedDict[int, Any] = OrderedDict()

    def path(self, unit: int) -> Path:
        return self.folder / f"unit-{unit:05d}.safetensors"

    def is_done(self, unit: int) -> bool:
        return self.path(unit).exists()

    def write(self, unit: int, tensors: dict[str, Tensor], scan: RowScan) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"rows": json.dumps(scan.rows), "label_0": json.dumps(scan.label_0), "keys": json.dumps(scan.keys),
                "counts": json.dumps(scan.counts), "format": str(CACHE_FORMAT)}
        tmp = self.path(unit).with_name(f".{self.path(unit).name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, self.path(unit))

    def write_description(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        desc = self.folder / "cache.json"
        tmp = desc.with_name(f".cache.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "n_units": self.n_units, **self.parts}, indent=2, default=str))
        os.replace(tmp, desc)

    def _open(self, unit: int):
        from safetensors import safe_open

        if unit in self._handles:
            self._handles.move_to_end(unit)
            return self._handles[unit]
        handle = safe_open(str(self.path(unit)), framework="pt")
        self._handles[unit] = handle
        if len(self._handles) > 64:
            self._handles.popitem(last=False)
        return handle

    def scan(self, unit: int) -> RowScan:
        meta = self._open(unit).metadata()
        return RowScan(rows=json.loads(meta["rows"]), label_0=json.loads(meta["label_0"]), keys=json.loads(meta["keys"]),
                       counts=json.loads(meta["counts"]))

    def get(self, unit: int, pos: int, flip: bool) -> dict[str, Tensor]:
        """One pair's stored tensors (see :func:`encode_scan`, without the leading N)."""
        f = self._open(unit)
        suffix = "_flip" if flip else ""
        c = int(f.get_slice("caption_index")[pos : pos + 1][0])
        out = {
            "mean": f.get_slice("mean" + suffix)[pos : pos + 1][0],
            "logvar": f.get_slice("logvar" + suffix)[pos : pos + 1][0],
            "crop": f.get_slice("crop" + suffix)[pos : pos + 1][0],
            "original_size": f.get_slice("original_size")[pos : pos + 1][0],
            "prompt_embeds": f.get_slice("prompt_embeds")[c : c + 1][0],
        }
        if "pooled" in f.keys():
            out["pooled"] = f.get_slice("pooled")[c : c + 1][0]
        return out


def _entry(t: dict[str, Tensor], i: int, flip: bool) -> dict[str, Tensor]:
    """Pair i of :func:`encode_scan`'s output, in the layout of :meth:`PairCache.get`."""
    suffix = "_flip" if flip else ""
    c = int(t["caption_index"][i])
    out = {"mean": t["mean" + suffix][i], "logvar": t["logvar" + suffix][i], "crop": t["crop" + suffix][i],
           "original_size": t["original_size"][i], "prompt_embeds": t["prompt_embeds"][c]}
    if "pooled" in t:
        out["pooled"] = t["pooled"][c]
    return out


# ------------------------------------------------------------------------------------------------------
# The index: one item per trained (winner, loser) ordering
# ------------------------------------------------------------------------------------------------------


@dataclass
class PairIndex:
    """Every training item. Item i is row `pos[i]` (among the kept rows) of unit `unit[i]`."""

    unit: np.ndarray  # (N,) int
    pos: np.ndarray  # (N,) int
    swap: np.ndarray  # (N,) bool: True when image 1 is the winner
    weight: np.ndarray  # (N,) float32: 1, or 0.5 for each order of a kept tie
    keys: list[str]
    counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.pos)


def build_index(scans: list[RowScan], keep_ties: str) -> PairIndex:
    """Winner/loser ordering from label_0 (1: image 0 wins, 0: image 1 wins, 0.5: tie; see module doc)."""
    unit, pos, swap, weight, keys = [], [], [], [], []
    counts: dict[str, int] = {}
    for u, scan in enumerate(scans):
        for k, v in scan.counts.items():
            counts[k] = counts.get(k, 0) + v
        for p, (label, key) in enumerate(zip(scan.label_0, scan.keys)):
            if label == 0.5:
                if keep_ties == "skip":
                    counts["ties_dropped"] = counts.get("ties_dropped", 0) + 1
                    continue
                counts["ties_kept"] = counts.get("ties_kept", 0) + 1
                for s in (False, True):
                    unit.append(u), pos.append(p), swap.append(s), weight.append(0.5), keys.append(key)
                continue
            unit.append(u), pos.append(p), swap.append(label == 0.0), weight.append(1.0), keys.append(key)
    counts["items"] = len(pos)
    return PairIndex(np.array(unit, dtype=np.int64), np.array(pos, dtype=np.int64), np.array(swap, dtype=bool),
                     np.array(weight, dtype=np.float32), keys, counts)


def describe_drops(counts: dict[str, int]) -> str:
    """'2 ties (...), 1 empty caption' from the scan counters, or 'none'."""
    reasons = {"ties_dropped": "ties (label_0 = 0.5; --keep-ties half keeps them)", "empty_caption": "empty caption",
               "bad_image": "undecodable image", "bad_label": "label_0 not 0, 0.5 or 1"}
    parts = [f"{counts[k]} {v}" for k, v in reasons.items() if counts.get(k)]
    return ", ".join(parts) if parts else "none"


# ------------------------------------------------------------------------------------------------------
# Order: which items each process trains on at each micro-batch
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairOrder:
    """A pure function of (seed, epoch): micro-batch m of process r, the same in every run and resume.

    Epoch e is a permutation of all items drawn from ``(seed, e)``; micro-batch m takes the next
    ``batch_size x world`` items of it, process r the r-th slice of `batch_size`; the last incomplete
    global batch of an epoch is dropped. Horizontal flips (with `random_flip`) are drawn per (seed, epoch, item).

    Slot ``m x batch_size x world + r x batch_size + i`` (pair i of that micro-batch) is the pair's position
    in the stream of all pairs trained; its random draws come from a generator seeded by (seed, slot), so a
    run gives the same per-pair noise whether its effective batch is split over processes, accumulation
    or neither.
    """

    n_items: int
    batch_size: int
    world: int
    seed: int
    random_flip: bool = False

    @property
    def per_epoch(self) -> int:
        return self.n_items // (self.batch_size * self.world)

    def micro_batch(self, m: int, rank: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(items (B,), flips (B,) bool, epoch) of micro-batch `m` for process `rank`."""
        epoch, within = divmod(m, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch, 0]).permutation(self.n_items)
        start = within * self.batch_size * self.world + rank * self.batch_size
        items = perm[start : start + self.batch_size]
        if self.random_flip:
            flips = np.random.default_rng([self.seed, epoch, 1]).random(self.n_items)[items] < 0.5
        else:
            flips = np.zeros(len(items), dtype=bool)
        return items, flips, epoch

    def generators(self, m: int, rank: int) -> list[torch.Generator]:
        """One CPU generator per pair of micro-batch `m` of process `rank`, seeded by (seed, slot)."""
        first = m * self.batch_size * self.world + rank * self.batch_size
        return [torch.Generator().manual_seed(int(fingerprint("slot", self.seed, first + i), 16) & (2**63 - 1))
                for i in range(self.batch_size)]


# ------------------------------------------------------------------------------------------------------
# The training data: index + stored or live tensors -> PairBatch
# ------------------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """One micro-batch, winner first. Latents are UNet latents (sampled, shifted and scaled)."""

    latents_w: Tensor  # (B, 4, h, w) float32
    latents_l: Tensor  # (B, 4, h, w) float32
    embeds: PromptEmbeds  # (B, 77, D) [+ pooled (B, P)], caption dropout applied, STORE_DTYPE
    time_ids_w: Tensor | None  # (B, 6) SDXL micro-conditioning of the winner, else None
    time_ids_l: Tensor | None  # (B, 6)
    weight: Tensor  # (B,) float32
    keys: list[str]


class PairData:
    """The training pairs of a run: the index, and tensors read from the cache or encoded live."""

    def __init__(self, index: PairIndex, units: list[Unit], latent_spec: LatentSpec, resolution: int,
                 empty: PromptEmbeds, *, cache: PairCache | None = None, encoders: Encoders | None = None,
                 scans: list[RowScan] | None = None, random_crop: bool = False, seed: int = 0,
                 family: str = "sd15", caption_dropout: float = 0.0, stats: dict | None = None):
        self.index = index
        self.units = units
        self.latent_spec = latent_spec
        self.resolution = resolution
        self.empty = PromptEmbeds(empty.prompt_embeds.to("cpu", STORE_DTYPE),
                                  None if empty.pooled is None else empty.pooled.to("cpu", STORE_DTYPE))
        self.cache, self.encoders, self.scans = cache, encoders, scans
        self.random_crop, self.seed, self.family = random_crop, seed, family
        self.caption_dropout = caption_dropout
        self.stats = stats or {}
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def _live(self, items: list[tuple[int, int]], flip: bool) -> list[dict[str, Tensor]]:
        """Encode pairs now (one VAE/text-encoder pass for all), exactly as the cache would have stored them."""
        merged = RowScan()
        for unit, pos in items:
            if unit not in self._tables:
                self._tables[unit] = read_unit(self.units[unit])
                if len(self._tables) > 2:
                    self._tables.popitem(last=False)
            row = self.scans[unit].rows[pos]
            one = scan_unit(self._tables[unit].slice(row, 1), self.units[unit], offset=row)
            merged.images += one.images
            merged.captions += one.captions
            merged.rows.append(row)
            merged.keys.append(self.scans[unit].keys[pos])  # the row's key in its unit (crop seed)
        t = encode_scan(merged, self.encoders, self.resolution, random_crop=self.random_crop, seed=self.seed,
                        orientations=(flip,))
        return [_entry(t, i, flip) for i in range(len(items))]

    def fetch(self, items: np.ndarray, flips: np.ndarray) -> list[dict[str, Tensor]]:
        """The stored (or freshly encoded) tensors of each item, see :func:`encode_scan`."""
        where = [(int(self.index.unit[i]), int(self.index.pos[i])) for i in items]
        if self.cache is not None:
            return [self.cache.get(u, p, bool(f)) for (u, p), f in zip(where, flips)]
        out: list[dict[str, Tensor] | None] = [None] * len(where)
        for flip in (False, True):
            sel = [k for k, f in enumerate(flips) if bool(f) == flip]
            if sel:
                for k, entry in zip(sel, self._live([where[k] for k in sel], flip)):
                    out[k] = entry
        return out

    def batch(self, items: np.ndarray, flips: np.ndarray, generators: list[torch.Generator]) -> PairBatch:
        """Assemble a micro-batch. Pair i draws from its own CPU generator `generators[i]`, in order:
        caption dropout (1 number), then the latent samples of the winner and the loser."""
        entries = self.fetch(items, flips)
        swap = torch.as_tensor(self.index.swap[items])
        stack = {k: torch.stack([e[k] for e in entries]) for k in entries[0]}
        w_idx, l_idx = swap.long(), (~swap).long()  # position of the winner / loser within the pair
        ar = torch.arange(len(entries))
        drop = torch.cat([torch.rand(1, generator=g) for g in generators]) < self.caption_dropout
        pe = stack["prompt_embeds"].clone()
        pooled = stack.get("pooled")
        if drop.any():
            pe[drop] = self.empty.prompt_embeds[0].to(pe.dtype)
            if pooled is not None:
                pooled = pooled.clone()
                pooled[drop] = self.empty.pooled[0].to(pooled.dtype)
        mean, logvar = stack["mean"].float(), stack["logvar"].float()  # (B, 2, 4, h, w)
        noise = torch.stack([torch.randn((2, *mean.shape[2:]), generator=g) for g in generators])  # (B, 2, 4, h, w)
        latents = []
        for k, idx in enumerate((w_idx, l_idx)):
            z = mean[ar, idx] + torch.exp(0.5 * logvar[ar, idx]) * noise[:, k]
            latents.append((z - self.latent_spec.shift_factor) * self.latent_spec.scaling_factor)
        tid_w = tid_l = None
        if self.family == "sdxl":
            size = (self.resolution, self.resolution)
            tid_w = time_ids(stack["original_size"][ar, w_idx], stack["crop"], size)
            tid_l = time_ids(stack["original_size"][ar, l_idx], stack["crop"], size)
        return PairBatch(latents[0], latents[1], PromptEmbeds(pe, pooled), tid_w, tid_l,
                         torch.as_tensor(self.index.weight[items]), [self.index.keys[int(i)] for i in items])


def prepare_data(*, units: list[Unit], cache_root: Path | None, cache_parts: dict[str, Any], encoders: Encoders,
                 resolution: int, keep_ties: str, random_crop: bool, random_flip: bool, seed: int,
                 caption_dropout: float, rank: int = 0, world: int = 1, barrier=None,
                 progress: bool = True) -> PairData:
    """Scan (and with a cache root, encode) this process's units, then index all of them.

    With a cache: units `rank::world` not yet cached are encoded and written; `barrier()` (all processes)
    follows; every process then reads the index from the cache files. Without: every process scans
    (decodes) all units to learn which rows are usable, and pairs are encoded at each step.
    `stats`: units encoded / reused by this process, and the drop counters.
    """
    from tqdm.auto import tqdm

    global _logged_bad
    _logged_bad = 0
    latent_spec = LatentSpec.of(encoders.vae)
    empty = encoders.text.empty()
    family = encoders.text.family
    stats: dict[str, Any] = {"units": len(units)}
    orientations = (False, True) if random_flip else (False,)
    if cache_root is not None:
        cache = PairCache(cache_root, cache_parts, len(units))
        mine = list(range(rank, len(units), world))
        todo = [u for u in mine if not cache.is_done(u)]
        stats.update(units_encoded=len(todo), units_reused=len(mine) - len(todo), cache=str(cache.folder))
        if rank == 0:
            cache.write_description()
        bar = tqdm(todo, desc="encode pairs", unit="unit", disable=not progress or not todo, dynamic_ncols=True)
        for u in bar:
            tensors, scan = encode_unit(read_unit(units[u]), units[u], encoders, resolution, random_crop=random_crop,
                                        seed=seed, orientations=orientations, chunk=max(64, encoders.batch_size))
            cache.write(u, tensors, scan)
        if barrier is not None:
            barrier()
        missing = [u for u in range(len(units)) if not cache.is_done(u)]
        if missing:
            raise PrefpipeError(f"cache {cache.folder}: units {missing[:5]} were not written by their process")
        scans = [cache.scan(u) for u in range(len(units))]
    else:
        cache = None
        stats.update(units_encoded=0, units_reused=0, cache=None)
        scans = []
        for u in tqdm(range(len(units)), desc="scan pairs", unit="unit", disable=not progress, dynamic_ncols=True):
            s = scan_unit(read_unit(units[u]), units[u], keep_images=False)
            scans.append(s)
    index = build_index(scans, keep_ties)
    stats.update(index.counts)
    return PairData(index, units, latent_spec, resolution, empty, cache=cache,
                    encoders=None if cache is not None else encoders, scans=scans, random_crop=random_crop,
                    seed=seed, family=family, caption_dropout=caption_dropout, stats=stats)
