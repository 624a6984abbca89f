"""Tensors in safetensors files, whole or as per-process row shards, and any rows read back: the storage of
`trainer/checkpoints.py`.

A sharded tensor (a DTensor of an FSDP2 run) is written by every process as its rows [first, first + n) of
dim 0 (FSDP2's `Shard(0)`: dim 0 split as `torch.chunk` splits it, over one mesh dimension), with
`[first, global rows]` in the file's header (`layout`; `None` for a tensor written whole). Reading needs no
collective and no particular process count: :meth:`TensorFiles.rows` joins the rows a process needs from
whichever files hold them.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch

from prefpipe.core.errors import PrefpipeError


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], layout: dict | None = None) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt", **({"layout": json.dumps(layout)} if layout is not None else {})}
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_rows(t) -> tuple[int, int]:
    """(first row, global rows) of this process's shard of a DTensor: FSDP2's layout, dim 0 split over one mesh
    dimension as `torch.chunk` splits it (checked against the shard's own length)."""
    from torch.distributed.tensor import Shard

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise PrefpipeError(f"checkpoints of sharded runs support FSDP2's Shard(0) on one mesh dimension, not "
                            f"{tuple(t.placements)} on a {t.device_mesh.ndim}-d mesh")
    total, parts, coord = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    size = -(-total // parts)
    first = min(coord * size, total)
    if t.to_local().shape[0] != min(size, total - first):
        raise PrefpipeError(f"a shard of {t.to_local().shape[0]} of {total} rows is not torch.chunk's split over "
                            f"{parts} processes: this sharding cannot be checkpointed")
    return first, total


def local_rows(tensors: dict, main: bool) -> tuple[dict, dict]:
    """This process's part of `tensors` in a sharded checkpoint: its rows of every DTensor and where they sit
    (`[first, total]`), and on the main process every plain tensor whole (`None`)."""
    local, layout = {}, {}
    for name, t in tensors.items():
        if is_dtensor(t):
            layout[name] = list(shard_rows(t))
            local[name] = t.to_local()
        elif main:
            local[name], layout[name] = t, None
    return local, layout


class TensorFiles:
    """The tensors of `STEM.safetensors` or of the shards `STEM-R-of-N.safetensors` (any N), opened lazily:
    a tensor whole, or the rows of one shard read from the files that hold them."""

    def __init__(self, folder: Path, stem: str, stack: ExitStack):
        from safetensors import safe_open

        paths = [folder / f"{stem}.safetensors"]
        if not paths[0].exists():
            found = {int(m[1]): int(m[2]) for p in folder.iterdir()
                     if (m := re.fullmatch(rf"{stem}-(\d+)-of-(\d+)\.safetensors", p.name))}
            if not found or set(found.values()) != {len(found)} or sorted(found) != list(range(len(found))):
                raise PrefpipeError(f"--resume {folder}: incomplete checkpoint: no {stem}.safetensors, nor one "
                                    f"{stem}-R-of-N.safetensors for every process R (found {sorted(found)})")
            paths = [folder / f"{stem}-{r}-of-{len(found)}.safetensors" for r in range(len(found))]
        self.folder, self.files = folder, []
        for path in paths:
            f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            try:  # name -> None (whole) or [first row, global rows]
                layout = json.loads((f.metadata() or {}).get("layout", "{}"))
                if not isinstance(layout, dict) or not all(
                        v is None or (isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)
                                      and 0 <= v[0] <= v[1]) for v in layout.values()):
                    raise ValueError(layout)
            except ValueError as e:
                raise PrefpipeError(f"--resume: {path}: its layout is not what prefpipe writes ({e})") from e
            self.files.append((path, f, layout, set(f.keys())))

    def names(self) -> set[str]:
        return set().union(*(keys for _, _, _, keys in self.files))

    def sharded(self, name: str) -> bool:
        return any(layout.get(name) is not None for _, _, layout, keys in self.files if name in keys)

    def whole(self, name: str) -> torch.Tensor:
        """The tensor `name` whole (a sharded one: all its rows joined)."""
        for _, f, layout, keys in self.files:
            if name in keys and layout.get(name) is None:
                return f.get_tensor(name)
        if self.sharded(name):
            total = next(layout[name][1] for _, _, layout, keys in self.files if name in keys)
            return self.rows(name, 0, total, total)
        raise PrefpipeError(f"--resume {self.folder}: incomplete checkpoint: no tensor {name}")

    def rows(self, name: str, start: int, stop: int, total: int) -> torch.Tensor:
        """Rows [start, stop) of the sharded tensor `name` of `total` rows, from the shards that hold them."""
        pieces, empty = [], None
        for path, f, layout, keys in self.files:
            if name not in keys:
                continue
            entry, part = layout.get(name), f.get_slice(name)
            if entry is None:
                raise PrefpipeError(f"--resume: {path}: {name} is not a shard of rows")
            first, rows = entry[0], part.get_shape()[0]
            if entry[1] != total:
                raise PrefpipeError(f"--resume: {path}: {name} has {entry[1]} rows, this run's has {total}")
            empty = part[0:0] if empty is None else empty
            lo, hi = max(start, first), min(stop, first + rows)
            if lo < hi:
                pieces.append((lo, hi, part[lo - first:hi - first]))
        pieces.sort(key=lambda p: p[0])
        edges = [start, *(x for lo, hi, _ in pieces for x in (lo, hi)), stop]
        if empty is None or edges[0::2] != edges[1::2]:  # not start = lo1, hi1 = lo2, ..., hiN = stop
            raise PrefpipeError(f"--resume {self.folder}: incomplete checkpoint: rows {start}..{stop} of {name} missing")
        return torch.cat([p for _, _, p in pieces]) if pieces else empty

    def like(self, name: str, target) -> torch.Tensor:
        """The saved `name` as `target` holds it: this process's rows for a DTensor, else whole; shape checked."""
        if is_dtensor(target):
            local = target.to_local()
            first, total = shard_rows(target)
            data = self.rows(name, first, first + local.shape[0], total)
        else:
            local, data = target, self.whole(name)
        if data.shape != local.shape:
            raise PrefpipeError(f"--resume {self.folder}: {name} has shape {tuple(data.shape)} there, "
                                f"{tuple(local.shape)} in this run")
        return data
