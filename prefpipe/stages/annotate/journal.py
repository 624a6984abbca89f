"""The judgments log: `WORKDIR/annotate/judgments.jsonl`, append-only, one JSON event per line.

    {"seq": 7, "at": "2025-01-02T03:04:05.123456+00:00", "user": "ada", "event": "judge", "pair": "3f…", "label_0": 1.0}
    {"seq": 8, "at": "...", "user": "ada", "event": "skip", "pair": "9a…"}
    {"seq": 9, "at": "...", "user": "ada", "event": "undo", "pair": "9a…", "undoes": 8}

Every event is written and fsynced before the request that made it is answered, so the page never shows the
next pair before the judgment is on disk: a crash or kill loses at most the event in flight. Such an event
can leave half a line at the end of the file; reading the log back drops it (and cuts the file there), so the
next append starts on a clean line. A bad line anywhere else is damage, not a crash: it stops with its number.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import fsync_dir

log = logging.getLogger("prefpipe.annotate")

EVENTS = ("judge", "skip", "undo")


def now() -> str:
    """The time of an event: UTC, ISO 8601 with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Journal:
    """The append-only log of one session's events (:func:`read` them back, :meth:`append` new ones)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.next_seq = 0

    def read(self) -> list[dict]:
        """Every complete event, in order; half a last line (a write cut by a crash) is dropped from the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # the complete lines
        if end < len(data):
            log.warning("%s: dropped an incomplete last line (%d bytes, a write cut short by a crash)",
                        self.path, len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        events = []
        for number, line in enumerate(data[:end].splitlines(), 1):
            try:
                event = json.loads(line)
                ok = isinstance(event, dict) and event.get("event") in EVENTS and isinstance(event.get("seq"), int)
            except ValueError:
                ok = False
            if not ok:
                raise PrefpipeError(f"{self.path}: line {number} is not an event of the judgments log; the file was "
                                    "edited or damaged (restore it, or remove that line)")
            events.append(event)
        self.next_seq = events[-1]["seq"] + 1 if events else 0
        return events

    def append(self, user: str, event: str, pair: str, **fields) -> dict:
        """Write one event and fsync it; returns the event as written."""
        with self._lock:
            entry = {"seq": self.next_seq, "at": now(), "user": user, "event": event, "pair": pair, **fields}
            line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
            if self._fd is None:
                created = not self.path.exists()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                if created:
                    fsync_dir(self.path.parent)
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
            os.fsync(self._fd)
            self.next_seq += 1
            return entry

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
