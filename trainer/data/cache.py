"""Encoding pairs into VAE moments and text embeddings, and the cache of them on disk.

**The cache** (default on). Units are the row groups of the input files; process `rank` of `world` encodes
units `rank, rank + world, ...` into `CACHE/pairs-KEY/unit-NNNNN.safetensors` (written to a temporary name,
renamed when complete, so a killed run resumes and a finished unit is never encoded twice). KEY is a
fingerprint of everything the tensors depend on: the input files (their content digests,
`prefpipe.core.dataset.input_fingerprint`), `limit`, the model's
VAE and text encoders (path or hub id, plus file sizes and times for a local folder), `vae`, `vae_dtype`,
the resolution and the crop/flip policy. Each unit stores, for its kept rows, the VAE latent distribution
as **mean and log-variance** (like diffusers' `latent_dist`), so training still *samples* latents as the
reference trainers do (`latent_dist.sample()`), with each pair's own generator; with `random_flip` it
stores both orientations (flipping latents is not flipping pixels), doubling the latent storage. Text
embeddings are stored once per distinct caption within a unit. Storage dtype is float16 for everything
(2 images x (mean + logvar) x 4 x 128 x 128 x 2 bytes = 512 KiB per SDXL pair at 1024 px), except SD3/FLUX text
embeddings, kept in the training dtype (`text_store_dtype`; SD3.5: (77 + 256) x 4096 x 2 bytes = 2.6 MiB per
caption in bf16, FLUX: 512 x 4096 x 2 = 4 MiB; their 16-channel latents: 2 MiB per pair at 1024 px). Rows are
decoded and encoded `chunk` at a time; a unit's tensors are held until its file is written. The
on-the-fly path (`no_cache`) runs the same functions and rounds to the same dtype, so both paths feed the
loop the same inputs (up to the float rounding of a different encoding batch). A row holding one image in both
columns (per-image feedback, `trainer/data/feedback.py`) is encoded once and its moments stored in both slots
(the unit file's layout stays the pairs'; the latents of such a unit take twice the bytes they need, small
against the VAE pass saved).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor

from prefpipe.core.files import atomic_output, write_atomic
from prefpipe.core.identity import fingerprint
from trainer.conditioning import PromptEmbeds, TextConditioner
from trainer.data.rows import RowScan, Unit, crop_rng, prepare_pair, scan_unit

STORE_DTYPE = torch.float16  # cache storage; the on-the-fly path rounds to it too


def text_store_dtype(family: str, dtype: torch.dtype) -> torch.dtype:
    """The stored dtype of text embeddings: float16, except for SD3/FLUX, whose T5 embeddings are kept in the
    training dtype `dtype` (T5's activations overflow float16; 4096 x L per caption: 2 MiB at L = 256 in bf16)."""
    return dtype if family in ("sd3", "flux") else STORE_DTYPE
CACHE_FORMAT = 1


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
        dtype = text_store_dtype(self.text.family, self.text.dtype)
        pe = torch.cat([p.prompt_embeds for p in parts]).to("cpu", dtype)
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts]).to("cpu", dtype)
        return PromptEmbeds(pe, pooled)


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
            crop = "center" if not random_crop else random_crop_offsets(img0, img1, resolution, seed, key)
            prepared.append(prepare_pair(img0, img1, resolution, crop=crop, flip=flip))
        if not prepared:
            continue
        pixels = torch.cat([p.pixels for p in prepared])  # (2N, 3, R, R): pair i at rows 2i, 2i+1
        if all(img0 is img1 for img0, img1 in scan.images):  # single images (per-image feedback): one VAE pass each
            mean, logvar = (m.repeat_interleave(2, dim=0) for m in encoders.moments(pixels[0::2]))
        else:
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


def random_crop_offsets(img0, img1, resolution: int, seed: int, key: str) -> tuple[int, int]:
    """The per-pair random crop, in the resized frame (computed on image 0's resized size)."""
    h, w = img0.height, img0.width  # the resized size as torchvision computes it (short side -> resolution)
    rh, rw = (resolution, int(resolution * w / h)) if h <= w else (int(resolution * h / w), resolution)
    rng = crop_rng(seed, key)
    return rng.randint(0, rh - resolution), rng.randint(0, rw - resolution)


def model_identity(model: str, vae: str | None) -> dict[str, Any]:
    """What the encoders' outputs depend on: ids, or for local folders the weight files' sizes and times."""
    ident: dict[str, Any] = {"model": model, "vae": vae}
    for name, path in (("model", model), ("vae", vae)):
        if path and Path(path).exists():
            root = Path(path).resolve()
            ident[name] = str(root)
            files = []
            for sub in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                        "tokenizer_3", "."):
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

    def size_bytes(self) -> int:
        """Bytes of the cache folder's files (units, context, description)."""
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file()) if self.folder.is_dir() else 0

    def write(self, unit: int, tensors: dict[str, Tensor], scan: RowScan) -> None:
        from safetensors.torch import save_file

        meta = {"rows": json.dumps(scan.rows), "label_0": json.dumps(scan.label_0), "keys": json.dumps(scan.keys),
                "counts": json.dumps(scan.counts), "format": str(CACHE_FORMAT)}
        with atomic_output(self.path(unit)) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)

    def write_description(self, spec: LatentSpec, empty: PromptEmbeds, family: str) -> None:
        """`cache.json` (the key's parts) and `context.safetensors`: what training needs besides the units (the
        latent scaling, the unconditional embedding of dropped captions, the family), so that a run on a
        complete cache loads neither the VAE nor the text encoders."""
        from safetensors.torch import save_file

        description = {"format": CACHE_FORMAT, "n_units": self.n_units, **self.parts}
        write_atomic(self.folder / "cache.json", json.dumps(description, indent=2, default=str))
        dtype = text_store_dtype(family, empty.prompt_embeds.dtype)
        tensors = {"empty_prompt_embeds": empty.prompt_embeds.to("cpu", dtype).contiguous()}
        if empty.pooled is not None:
            tensors["empty_pooled"] = empty.pooled.to("cpu", dtype).contiguous()
        meta = {"scaling_factor": repr(spec.scaling_factor), "shift_factor": repr(spec.shift_factor), "family": family}
        with atomic_output(self.folder / "context.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def complete(self) -> bool:
        """Every unit and the context are there: training needs no encoder."""
        return (self.folder / "context.safetensors").exists() and all(self.is_done(u) for u in range(self.n_units))

    def context(self) -> tuple[LatentSpec, PromptEmbeds, str]:
        """(latent spec, unconditional embedding, family) as :meth:`write_description` stored them."""
        from safetensors import safe_open

        with safe_open(str(self.folder / "context.safetensors"), framework="pt") as f:
            meta = f.metadata()
            pooled = f.get_tensor("empty_pooled") if "empty_pooled" in f.keys() else None
            empty = PromptEmbeds(f.get_tensor("empty_prompt_embeds"), pooled)
        spec = LatentSpec(float(meta["scaling_factor"]), float(meta["shift_factor"]))
        return spec, empty, meta["family"]

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


def cache_entry(t: dict[str, Tensor], i: int, flip: bool) -> dict[str, Tensor]:
    """Pair i of :func:`encode_scan`'s output, in the layout of :meth:`PairCache.get`."""
    suffix = "_flip" if flip else ""
    c = int(t["caption_index"][i])
    out = {"mean": t["mean" + suffix][i], "logvar": t["logvar" + suffix][i], "crop": t["crop" + suffix][i],
           "original_size": t["original_size"][i], "prompt_embeds": t["prompt_embeds"][c]}
    if "pooled" in t:
        out["pooled"] = t["pooled"][c]
    return out
