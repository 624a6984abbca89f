"""Identity of datasets by content: a digest that changes whenever any row changes.

Stage inputs, resume checks and the training cache key use :func:`input_fingerprint`. A table relabelled in
place, with the same names and sizes, is another input (names and sizes alone could not tell).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from prefpipe.core.files import sha256_file
from prefpipe.core.tables import parquet_file, parquet_files, read_manifest


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (prompt lists, file names and sizes, manifests)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def input_fingerprint(source: str | Path) -> str:
    """Identity of an input dataset by content: each file's name and :func:`file_digest`.

    It changes whenever a row changes, so a stage, a resume check or the training cache never takes a
    changed table for the one it saw (names and sizes alone did: a table relabelled in place kept both).
    """
    return files_fingerprint(parquet_files(source))


def files_fingerprint(files: list[Path]) -> str:
    """:func:`input_fingerprint` of a list of Parquet files."""
    manifests: dict[Path, dict] = {}
    for f in files:
        if f.parent not in manifests:
            manifests[f.parent] = read_manifest(f.parent)
    return fingerprint([(str(f.name), file_digest(f, manifests[f.parent])) for f in files])


def file_digest(path: str | Path, manifest: dict | None = None) -> str:
    """A digest of one Parquet file's content.

    - A shard prefpipe wrote: the SHA-256 of its bytes, recorded in `_prefpipe.json` when it was written (read
      nothing) while the file's size and mtime are the recorded ones; else the SHA-256 of its bytes now (the
      same digest if only its mtime changed, as when copied).
    - Any other file (Pick-a-Pic as downloaded): the footer (every row group's and column chunk's sizes,
      encodings and statistics) and every value of every column that is not binary (captions, uids, labels,
      ...), read with column projection. A changed label, caption or row changes it; so does a changed image
      of another length (the column chunk's size). An image edited in place to the very same length in a
      file of the very same layout would not: that is the price of not reading every image at every start.

    `manifest`: the `_prefpipe.json` of the file's folder, when the caller has read it already.
    """
    path = Path(path)
    manifest = read_manifest(path.parent) if manifest is None else manifest
    recorded = manifest.get("files", {}).get(path.name)
    if recorded:
        st = path.stat()
        if recorded.get("bytes") == st.st_size and recorded.get("mtime_ns") == st.st_mtime_ns:
            return recorded["sha256"]
        return sha256_file(path)
    return _foreign_digest(path)


def _foreign_digest(path: Path) -> str:
    pf = parquet_file(path)
    meta = pf.metadata.to_dict()
    for rg in meta.get("row_groups", []):
        for col in rg.get("columns", []):
            col.pop("file_path", None)
            col.pop("file_offset", None)
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    h.update(str(pf.schema_arrow).encode())
    light = [f.name for f in pf.schema_arrow if not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]
    if light:
        for batch in pf.iter_batches(batch_size=65536, columns=light):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema) as w:
                w.write_batch(batch)
            h.update(sink.getvalue())
    return "parquet:" + h.hexdigest()
