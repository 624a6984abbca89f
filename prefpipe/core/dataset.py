"""Sharded, resumable Parquet datasets: the storage half of the stage contract.

A stage's output is a folder of shards plus `_prefpipe.json`:

    out/
      _prefpipe.json                       stage, options, versions, input fingerprint, finished units
      train-00000-of-00012.parquet         one shard per unit of work
      ...

- A unit's shard is written to a hidden temporary name and renamed when complete, so a shard that
  exists is finished; a re-run skips it. A kill at any moment loses at most the unit in flight.
- Process `rank` of `world` takes units `rank, rank + world, ...` (datatrove's `files[rank::world]`).
- The manifest is updated under a file lock (several processes write to one folder).
- Re-running into a folder made with other options or another input is refused: no silent mixing.
- Shard names follow the hub convention, so `datasets.load_dataset(folder)` reads a `train` split
  (it ignores `_prefpipe.json` and the hidden temporary files).

Every other file prefpipe writes whole (a manifest, a report, a cache unit, a model folder) goes through
the one write-to-temporary-then-rename here, :func:`atomic_output` / :func:`write_atomic`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.schema import conform

MANIFEST = "_prefpipe.json"
FORMAT_VERSION = 1
_VERSIONED = ("prefpipe", "torch", "diffusers", "transformers", "open_clip_torch", "peft", "accelerate", "pyarrow")


def rank_world() -> tuple[int, int]:
    """This process's (rank, world): from accelerate's state under a launcher, else (0, 1).

    On a machine without CUDA, `accelerate launch --multi_gpu --num_processes N` starts N CPU
    processes; accelerate only sees them as one job (MULTI_CPU, gloo) when asked for the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes
    return 0, 1


def library_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (prompt lists, file names and sizes, manifests)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def atomic_output(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """The one write-to-temporary-then-rename: the file (or folder) at `path` appears whole or not at all.

    Yields a hidden temporary path beside `path` (`.NAME.PID.tmpSUFFIX`; `suffix` keeps an extension that a
    writer insists on). When the block ends without error the temporary is synced and renamed over `path`
    (a folder replaces a folder); on an error, or a kill, no partial `path` is left (a stale temporary may).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        if tmp.is_dir():
            if path.is_dir():
                shutil.rmtree(path)
        else:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def shard_name(unit: int, n_units: int) -> str:
    return f"train-{unit:05d}-of-{n_units:05d}.parquet"


class ShardedDataset:
    """The output folder of one stage.

    `options` are the options that decide the output (a different value means different rows);
    `runtime` are recorded but may change between runs (batch size, device, number of processes).
    """

    def __init__(
        self,
        folder: str | Path,
        stage: str,
        options: dict[str, Any],
        input_fingerprint: str,
        n_units: int,
        schema: pa.Schema,
        runtime: dict[str, Any] | None = None,
    ):
        if n_units < 1:
            raise PrefpipeError(f"{stage}: nothing to do (0 units of work)")
        self.folder = Path(folder)
        self.stage = stage
        self.options = json.loads(json.dumps(options, default=str))  # normalised for comparison
        self.input_fingerprint = input_fingerprint
        self.n_units = n_units
        self.schema = schema
        self.runtime = runtime or {}

    # -- manifest ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked_manifest(self) -> Iterator[dict]:
        """Read-modify-write `_prefpipe.json` under an exclusive lock; the write is atomic."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".prefpipe.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                path = self.folder / MANIFEST
                manifest = json.loads(path.read_text()) if path.exists() else {}
                yield manifest
                write_atomic(path, json.dumps(manifest, indent=2, sort_keys=False))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def open(self) -> ShardedDataset:
        """Check that an existing folder was made by the same job (refuse otherwise).

        Nothing is written here: the manifest is created with the first finished unit, so a run that
        fails before producing anything (a wrong model id, say) leaves no folder to be refused later.
        """
        if self.folder.exists() and not self.folder.is_dir():
            raise PrefpipeError(f"--out {self.folder} exists and is not a folder")
        m = read_manifest(self.folder)
        if m:
            self._check_same_job(m)
        elif self.folder.exists() and any(self.folder.glob("*.parquet")):
            raise PrefpipeError(
                f"--out {self.folder} already holds Parquet files that prefpipe did not write "
                f"(no {MANIFEST}); choose an empty or new folder"
            )
        return self

    def _init_manifest(self, m: dict) -> None:
        m.update(
            format=FORMAT_VERSION,
            stage=self.stage,
            options=self.options,
            input_fingerprint=self.input_fingerprint,
            n_units=self.n_units,
            runtime=self.runtime,
            versions=library_versions(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            complete=False,
            units={},
        )

    def _check_same_job(self, m: dict) -> None:
        where = f"--out {self.folder}"
        if m.get("stage") != self.stage:
            raise PrefpipeError(
                f"{where} holds the output of '{m.get('stage')}', not '{self.stage}'; choose another --out"
            )
        diffs = []
        old = m.get("options", {})
        for key in sorted(set(old) | set(self.options)):
            if old.get(key) != self.options.get(key):
                diffs.append(f"{key}: folder has {old.get(key)!r}, this run asks {self.options.get(key)!r}")
        if m.get("input_fingerprint") != self.input_fingerprint:
            diffs.append("input: the input (prompts or dataset) differs from the one this folder was made from")
        if m.get("n_units") != self.n_units and not diffs:
            diffs.append(f"units: folder has {m.get('n_units')}, this run makes {self.n_units}")
        if diffs:
            raise PrefpipeError(
                f"{where} was made by an earlier '{self.stage}' run with other options, and mixing them "
                "would give a dataset that is neither:\n  " + "\n  ".join(diffs)
                + f"\nRe-run with the same options to resume, choose a new --out, or delete {self.folder} to start over."
            )
        versions = library_versions()
        changed = {k: (v, versions.get(k)) for k, v in m.get("versions", {}).items() if versions.get(k) != v}
        if changed:
            import warnings

            warnings.warn(
                f"{where}: library versions changed since this folder was started ({changed}); "
                "resumed units may differ numerically from earlier ones",
                stacklevel=2,
            )

    def manifest(self) -> dict:
        return read_manifest(self.folder)

    # -- units ---------------------------------------------------------------------------------
    def shard_path(self, unit: int) -> Path:
        return self.folder / shard_name(unit, self.n_units)

    def is_done(self, unit: int) -> bool:
        return self.shard_path(unit).exists()

    def units_for(self, rank: int, world: int) -> list[int]:
        """This process's share of the units (finished or not)."""
        return list(range(rank, self.n_units, world))

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        return [u for u in self.units_for(rank, world) if not self.is_done(u)]

    @contextlib.contextmanager
    def write_unit(self, unit: int) -> Iterator[UnitWriter]:
        """Write one unit's shard: rows go to a hidden temporary file, renamed on success.

        On an exception the temporary file is removed and nothing is recorded.
        """
        final = self.shard_path(unit)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(f".{final.name}.*.tmp"):  # left by a killed run; a unit has one owner
            stale.unlink(missing_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        writer = UnitWriter(tmp, self.schema)
        try:
            yield writer
            writer.close()
            # The unit's counters go into the manifest *before* its shard appears: a kill in between leaves
            # an entry without a shard, which stats() ignores and the re-run of the unit overwrites. (After
            # the rename, a kill would leave a finished shard whose counters were never recorded.)
            with self._locked_manifest() as m:
                if not m:
                    self._init_manifest(m)
                m["runtime"] = self.runtime
                m.setdefault("units", {})[final.name] = {"rows": writer.rows, **writer.stats}
            os.replace(tmp, final)  # atomic: the shard appears whole or not at all
        except BaseException:
            writer.abort()
            raise
        with self._locked_manifest() as m:
            m["complete"] = all(self.is_done(u) for u in range(self.n_units))

    def stats(self) -> dict[str, int]:
        """Counters summed over finished units (rows written, and each stage's own counters): units whose
        shard exists, so the entry of a unit killed before its rename does not count."""
        total: dict[str, int] = {}
        for name, unit_stats in self.manifest().get("units", {}).items():
            if not (self.folder / name).exists():
                continue
            for k, v in unit_stats.items():
                if isinstance(v, (int, float)):
                    total[k] = total.get(k, 0) + v
        return total

    def record(self, **fields: Any) -> None:
        """Store stage-level facts (a summary, a report) in the manifest."""
        with self._locked_manifest() as m:
            if not m:
                self._init_manifest(m)
            m.update(fields)


class UnitWriter:
    """Streams record batches of one unit into a Parquet file (one row group per write)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self.rows = 0
        self.stats: dict[str, int] = {}
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if not table.schema.equals(self.schema):
            table = conform(table, self.schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema, compression=_compression(self.schema))
        self._writer.write_table(table)
        self.rows += table.num_rows

    def count(self, key: str, n: int = 1) -> None:
        """A per-unit counter (rows dropped for a reason, ...), summed in the stage summary."""
        self.stats[key] = self.stats.get(key, 0) + n

    def close(self) -> None:
        if self._writer is None:  # a unit with no rows still gets a (valid, empty) shard
            self._writer = pq.ParquetWriter(self.path, self.schema, compression=_compression(self.schema))
        self._writer.close()
        with open(self.path, "rb") as f:
            os.fsync(f.fileno())

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _compression(schema: pa.Schema) -> dict[str, str]:
    """zstd for every column but binary ones (PNG/JPEG/npz bytes are compressed already: zstd on them
    costs time and saves nothing)."""
    return {f.name: "none" if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) else "zstd" for f in schema}


# -- reading -----------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def parquet_files(source: str | Path) -> list[Path]:
    """The Parquet files of a dataset folder (recursively, hidden files excluded), a glob, or one file."""
    s = str(source)
    if any(ch in s for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(s, recursive=True))]
    else:
        p = Path(s)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(
                f for f in p.rglob("*.parquet") if not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        else:
            raise PrefpipeError(f"{s}: no such file or folder")
    files = [f for f in files if f.suffix == ".parquet" and not f.name.startswith(".")]
    if not files:
        raise PrefpipeError(f"{s}: no .parquet files found")
    return files


def dataset_schema(source: str | Path) -> pa.Schema:
    return pq.ParquetFile(parquet_files(source)[0]).schema_arrow


def input_fingerprint(source: str | Path) -> str:
    """Identity of an input dataset: its files' names and sizes (cheap; content changes change sizes)."""
    files = parquet_files(source)
    return fingerprint([(str(f.name), f.stat().st_size) for f in files])


def row_group_units(source: str | Path) -> list[tuple[Path, int]]:
    """Every (file, row group) of a dataset: the natural units of a stage that reads it."""
    return [(f, i) for f in parquet_files(source) for i in range(pq.ParquetFile(f).num_row_groups)]


def iter_batches(source: str | Path, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[pa.RecordBatch]:
    """Stream a dataset batch by batch (bounded memory, whatever its size)."""
    for f in parquet_files(source):
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def count_rows(source: str | Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(source))
