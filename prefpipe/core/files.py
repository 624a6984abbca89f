"""Writing files whole, and hashing them: the one write-to-temporary-then-rename of prefpipe.

Every file prefpipe writes whole (a shard's manifest entry, a report, a cache unit, a model folder, a
checkpoint's state) goes through :func:`atomic_output` / :func:`write_atomic`: a temporary name that says
whose it is, synced, renamed, and the folder entry synced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

# Whose temporary files are these: host, process, and its start (a pid is reused; a host is not shared).
TEMP_TAG = f"{socket.gethostname()}.{os.getpid()}.{int(time.time())}"


def fsync_dir(folder: str | Path) -> None:
    """Make a rename (or a new file) in `folder` durable: sync the folder's own entry list."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """The one write-to-temporary-then-rename: the file (or folder) at `path` appears whole or not at all.

    Yields a hidden temporary path beside `path` (`.NAME.HOST.PID.START.tmpSUFFIX`: whose it is; `suffix` keeps an
    extension that a writer insists on). When the block ends without error the temporary is synced, renamed
    over `path` (a folder replaces a folder) and the rename itself synced (the folder's entry); on an error,
    or a kill, no partial `path` is left (a stale temporary may).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{TEMP_TAG}.tmp{suffix}")
    try:
        yield tmp
        if tmp.is_dir():
            if path.is_dir():
                shutil.rmtree(path)
        else:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
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


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
