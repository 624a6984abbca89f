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
- A complete folder has a dataset card, `README.md` (`prefpipe.core.datacard`): written when its last unit is,
  and again when the stage records a summary, so every stage gets one; `load_dataset(folder)` reads its
  `configs` and `dataset_info`.

Beside it: `prefpipe.core.tables` reads dataset folders (their Parquet files and manifest),
`prefpipe.core.identity` names a dataset by its content, and `prefpipe.core.files` writes any file whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prefpipe.core.datacard import CARD, write_dataset_card
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import TEMP_TAG, fsync_dir, sha256_file, write_atomic
from prefpipe.core.identity import input_fingerprint
from prefpipe.core.schema import conform
from prefpipe.core.tables import MANIFEST, read_manifest

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


def barrier() -> None:
    """Wait until every process of an `accelerate launch` gets here (nothing to wait for in one process).

    Every stage function calls it before it returns, so a dataset a stage function returned is complete in
    every process: the next stage (pairs after scores, the next D3PO round) and the summaries read it whole.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        rank_world()  # the state, created as rank_world creates it (CPU processes: gloo)
        PartialState().wait_for_everyone()


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch`, or the only process: the one that prints summaries and reports."""
    return rank_world()[0] == 0


def library_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


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
        self.busy: list[int] = []  # units skipped because another live process held them
        self._claimed: set[int] = set()
        self._units_lock = None

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
            if not m.get("complete") and all(self.is_done(u) for u in range(self.n_units)):
                self._mark_complete()  # a run killed after its last rename, before it said so
            elif m.get("complete") and not (self.folder / CARD).exists():
                self.write_card()  # a folder finished before cards were written
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
    def claim(self, unit: int) -> Iterator[bool]:
        """Hold unit `unit` for this process while the block runs: True, or False when another live process
        (another launch into the same folder) holds it. A POSIX record lock on `.prefpipe.units.lock`, byte
        `unit`: the system releases it when its process dies, so a killed run never leaves a unit held."""
        if unit in self._claimed:
            yield True
            return
        if self._units_lock is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._units_lock = open(self.folder / ".prefpipe.units.lock", "a+")  # noqa: SIM115 - held for the dataset's life
        try:
            fcntl.lockf(self._units_lock, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, unit)
        except OSError:
            yield False
            return
        self._claimed.add(unit)
        try:
            yield True
        finally:
            self._claimed.discard(unit)
            fcntl.lockf(self._units_lock, fcntl.LOCK_UN, 1, unit)

    def claim_each(self, units: list[int]) -> Iterator[int]:
        """The units of `units` this process holds in turn and still has to write; each is held until the next
        is asked for. Units another live process is writing are skipped and counted in `self.busy`, so two
        launches into one folder share the work instead of writing a unit twice."""
        for unit in units:
            with self.claim(unit) as mine:
                if not mine:
                    self.busy.append(unit)
                    continue
                if not self.is_done(unit):
                    yield unit

    @contextlib.contextmanager
    def write_unit(self, unit: int) -> Iterator[UnitWriter]:
        """Write one unit's shard: rows go to a hidden temporary file, renamed on success.

        The unit is held (:meth:`claim`) for the duration: a temporary file of this unit left in the folder is
        then a dead process's, and removed. On an exception the temporary file is removed and nothing is
        recorded.
        """
        with self.claim(unit) as mine:
            if not mine:
                raise PrefpipeError(f"{self.folder}: another process is writing unit {unit}; run one launch per "
                                    "folder, or let them share it (each skips the units the other holds)")
            final = self.shard_path(unit)
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(f".{final.name}.*.tmp"):  # a dead process's: we hold the unit
                stale.unlink(missing_ok=True)
            tmp = final.with_name(f".{final.name}.{TEMP_TAG}.tmp")
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
                    m.setdefault("files", {})[final.name] = writer.identity  # its content digest (see dataset_digest)
                os.replace(tmp, final)  # atomic: the shard appears whole or not at all (size and mtime kept)
                fsync_dir(self.folder)  # and the rename survives a power loss
            except BaseException:
                writer.abort()
                raise
        if all(self.is_done(u) for u in range(self.n_units)):
            self._mark_complete()

    def _mark_complete(self) -> None:
        with self._locked_manifest() as m:
            m["complete"] = all(self.is_done(u) for u in range(self.n_units))
            if m["complete"]:
                m["digest"] = input_fingerprint(self.folder)
        self.write_card()

    def write_card(self) -> None:
        """(Re)write the folder's dataset card, `README.md`, from the manifest, the schema and the counters."""
        write_dataset_card(self.folder, self.manifest(), self.schema, self.stats())

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
            complete = bool(m.get("complete"))
        if complete:
            self.write_card()  # the card shows what the stage recorded


class UnitWriter:
    """Streams record batches of one unit into a Parquet file (one row group per write)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self.rows = 0
        self.stats: dict[str, int] = {}
        self.identity: dict[str, Any] = {}  # sha256, bytes, mtime_ns of the closed file
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
        st = self.path.stat()
        self.identity = {"sha256": sha256_file(self.path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

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


