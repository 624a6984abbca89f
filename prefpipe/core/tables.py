"""Reading dataset folders: their Parquet files (a folder, a glob or one file) and their manifest.

Reading stays lazy and bounded: batches and row groups, never a whole table of unknown size. A file that is
not Parquet stops with one message naming it (:func:`parquet_file`).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prefpipe.core.errors import PrefpipeError

MANIFEST = "_prefpipe.json"


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


def parquet_file(path: str | Path, **kwargs: Any) -> pq.ParquetFile:
    """`pq.ParquetFile(path)`; a file that is not Parquet (a text file named `.parquet`, a truncated shard)
    stops with a message naming it instead of pyarrow's traceback."""
    try:
        return pq.ParquetFile(path, **kwargs)
    except (pa.ArrowInvalid, OSError) as e:
        raise PrefpipeError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); remove it from the "
                            "folder, or point the option at the dataset's shards only") from None


def dataset_schema(source: str | Path) -> pa.Schema:
    return parquet_file(parquet_files(source)[0]).schema_arrow


def row_group_units(source: str | Path) -> list[tuple[Path, int]]:
    """Every (file, row group) of a dataset: the natural units of a stage that reads it."""
    return [(f, i) for f in parquet_files(source) for i in range(parquet_file(f).num_row_groups)]


def iter_batches(source: str | Path, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[pa.RecordBatch]:
    """Stream a dataset batch by batch (bounded memory, whatever its size)."""
    for f in parquet_files(source):
        yield from parquet_file(f).iter_batches(batch_size=batch_size, columns=columns)


def count_rows(source: str | Path) -> int:
    return sum(parquet_file(f).metadata.num_rows for f in parquet_files(source))
