"""The training pairs of a Diffusion-DPO/SFT run: the index of trained items, their order, and micro-batches.

`prepare_data` scans (and with a cache, encodes) the units, builds the :class:`PairIndex` (one item per
trained winner/loser ordering), and returns :class:`PairData`, which assembles a :class:`PairBatch` for any
items from the cache or by encoding live. :class:`PairOrder` says which items each process trains on at
each micro-batch, as a pure function of (seed, epoch).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.identity import fingerprint
from trainer.conditioning import PromptEmbeds, time_ids
from trainer.data.cache import (
    Encoders,
    LatentSpec,
    PairCache,
    cache_entry,
    encode_scan,
    encode_unit,
    text_store_dtype,
)
from trainer.data.rows import RowScan, Unit, log_bad_row, read_unit, reset_bad_row_log, scan_unit


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
                    log_bad_row(key, "tie", "label_0 = 0.5; --keep-ties half trains it in both orders")
                    continue
                counts["ties_kept"] = counts.get("ties_kept", 0) + 1
                for s in (False, True):
                    unit.append(u), pos.append(p), swap.append(s), weight.append(0.5), keys.append(key)
                continue
            unit.append(u), pos.append(p), swap.append(label == 0.0), weight.append(1.0), keys.append(key)
    counts["items"] = len(pos)
    return PairIndex(np.array(unit, dtype=np.int64), np.array(pos, dtype=np.int64), np.array(swap, dtype=bool),
                     np.array(weight, dtype=np.float32), keys, counts)


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
    desirable: Tensor | None = None  # (B,) bool: per-image feedback (the item's label), else None


class PairData:
    """The training pairs of a run: the index, and tensors read from the cache or encoded live."""

    def __init__(self, index: PairIndex, units: list[Unit], latent_spec: LatentSpec, resolution: int,
                 empty: PromptEmbeds, *, cache: PairCache | None = None, encoders: Encoders | None = None,
                 scans: list[RowScan] | None = None, random_crop: bool = False, seed: int = 0,
                 family: str = "sd15", caption_dropout: float = 0.0, stats: dict | None = None,
                 per_image: bool = False):
        self.index = index
        self.per_image = per_image  # single-image rows (feedback): item i is desirable unless swapped
        self.units = units
        self.latent_spec = latent_spec
        self.resolution = resolution
        dtype = text_store_dtype(family, empty.prompt_embeds.dtype)
        self.empty = PromptEmbeds(empty.prompt_embeds.to("cpu", dtype),
                                  None if empty.pooled is None else empty.pooled.to("cpu", dtype))
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
            row = int(self.scans[unit].rows[pos])
            one = scan_unit(self._tables[unit].slice(row, 1), self.units[unit], offset=row)
            merged.images += one.images
            merged.captions += one.captions
            merged.rows.append(row)
            merged.keys.append(self.scans[unit].keys[pos])  # the row's key in its unit (crop seed)
        t = encode_scan(merged, self.encoders, self.resolution, random_crop=self.random_crop, seed=self.seed,
                        orientations=(flip,))
        return [cache_entry(t, i, flip) for i in range(len(items))]

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
                         torch.as_tensor(self.index.weight[items]), [self.index.keys[int(i)] for i in items],
                         torch.as_tensor(~self.index.swap[items]) if self.per_image else None)


def prepare_data(*, units: list[Unit], cache_root: Path | None, cache_parts: dict[str, Any], encoders: Encoders | None,
                 resolution: int, keep_ties: str, random_crop: bool, random_flip: bool, seed: int,
                 caption_dropout: float, rank: int = 0, world: int = 1, barrier=None,
                 progress: bool = True, per_image: bool = False) -> PairData:
    """Scan (and with a cache root, encode) this process's units, then index all of them.

    With a cache: units `rank::world` not yet cached are encoded and written; `barrier()` (all processes)
    follows; every process then reads the index from the cache files. Without: every process scans
    (decodes) all units to learn which rows are usable, and pairs are encoded at each step.
    `encoders` may be None only when the cache is complete (`PairCache.complete`): its context then gives the
    latent scaling, the unconditional embedding and the family. `per_image`: the units hold single images
    (per-image feedback, label 1 desirable / 0 undesirable), and batches carry :attr:`PairBatch.desirable`.
    `stats`: units encoded / reused by this process, and the drop counters.
    """
    from prefpipe.core.progress import progress as progress_of

    reset_bad_row_log()
    stats: dict[str, Any] = {"units": len(units), "encoders_loaded": encoders is not None}
    orientations = (False, True) if random_flip else (False,)
    if encoders is None:
        cache = PairCache(cache_root, cache_parts, len(units))
        if not cache.complete():
            raise PrefpipeError(f"cache {cache.folder} is not complete: load the encoders to build it")
        latent_spec, empty, family = cache.context()
    else:
        latent_spec, empty, family = LatentSpec.of(encoders.vae), encoders.text.empty(), encoders.text.family
    if cache_root is not None:
        cache = PairCache(cache_root, cache_parts, len(units))
        mine = list(range(rank, len(units), world))
        todo = [u for u in mine if not cache.is_done(u)]
        stats.update(units_encoded=len(todo), units_reused=len(mine) - len(todo), cache=str(cache.folder))
        if rank == 0 and encoders is not None:
            cache.write_description(latent_spec, empty, family)
        bar = progress_of(todo, desc="encode images" if per_image else "encode pairs", unit="unit", enabled=progress and bool(todo))
        for u in bar:
            tensors, scan = encode_unit(read_unit(units[u]), units[u], encoders, resolution, random_crop=random_crop,
                                        seed=seed, orientations=orientations, chunk=max(64, encoders.batch_size))
            cache.write(u, tensors, scan)
        if barrier is not None:
            barrier()
        missing = [u for u in range(len(units)) if not cache.is_done(u)]
        if missing:
            raise PrefpipeError(f"cache {cache.folder}: units {missing[:5]} were not written by their process")
        scans = [cache.scan(u).compact() for u in range(len(units))]
    else:
        cache = None
        stats.update(units_encoded=0, units_reused=0, cache=None)
        scans = []
        for u in progress_of(range(len(units)), desc="scan images" if per_image else "scan pairs", unit="unit", enabled=progress):
            scans.append(scan_unit(read_unit(units[u]), units[u], keep_images=False).compact())
    index = build_index(scans, keep_ties)
    stats.update(index.counts)
    return PairData(index, units, latent_spec, resolution, empty, cache=cache,
                    encoders=None if cache is not None else encoders, scans=scans, random_crop=random_crop,
                    seed=seed, family=family, caption_dropout=caption_dropout, stats=stats, per_image=per_image)
