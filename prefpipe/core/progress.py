"""The one progress helper: a tqdm bar on a terminal, periodic single lines anywhere else.

A bar redrawn with carriage returns reads well on a terminal and floods a file or a CI log (every redraw is
kept). So when the stream (stderr) is not a terminal, :func:`progress` returns :class:`LineProgress`, which
writes one complete line every `PREFPIPE_PROGRESS_INTERVAL` seconds (default 30) and one when it closes:

    train: 120/200 step (60%), 3.52 step/s, elapsed 0:34, ETA 0:23; loss 0.6931

`enabled=False` (the commands' `--no-progress`) writes nothing either way. Both kinds take the same calls:
iteration, `update(n)`, `set_postfix(...)`, `close()`, and `with`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from prefpipe.core.errors import PrefpipeError

INTERVAL_ENV = "PREFPIPE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, initial: int = 0, position: int | None = None, stream: IO[str] | None = None):
    """A progress display over `iterable` (or advanced by `update`): tqdm when `stream` (default stderr) is a
    terminal, else :class:`LineProgress`. `total` defaults to `len(iterable)` when it has one."""
    stream = sys.stderr if stream is None else stream
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, position=position, file=stream,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, enabled=enabled, initial=initial,
                        interval=interval_s(), stream=stream)


def interval_s() -> float:
    """Seconds between two progress lines: `PREFPIPE_PROGRESS_INTERVAL`, else 30."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise PrefpipeError(f"{INTERVAL_ENV}={raw!r}: give the seconds between two progress lines (a number >= 0)")
    return value


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def clock(seconds: float) -> str:
    """`M:SS`, or `H:MM:SS` from an hour on (tqdm's format)."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """Progress as complete lines: one each `interval` seconds while it advances, and a last one at `close`.

    Each line holds the count done (of the total, with its percentage), the rate since the start, the
    elapsed time, the ETA and the latest `set_postfix` values. Nothing is ever redrawn.
    """

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, initial: int = 0, interval: float = DEFAULT_INTERVAL_S,
                 stream: IO[str] | None = None):
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.n = initial
        self.interval = interval
        self.stream = stream
        self.postfix: dict[str, Any] = {}
        self.lines = 0  # lines written so far
        self._start_n = initial
        self._written_n = initial  # the count the last line showed
        self._t0 = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate (built without an iterable)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int | float = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._write(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled and self.n != self._written_n:  # the last count, unless a line just showed it
            self._write(time.monotonic())

    def line(self, now: float | None = None) -> str:
        """The line that would be written at `now` (default: now)."""
        elapsed = (time.monotonic() if now is None else now) - self._t0
        done = self.n
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            parts = [f"{head}{_count(done)}/{_count(self.total)} {self.unit} ({100 * done / self.total:.0f}%)"]
        else:
            parts = [f"{head}{_count(done)} {self.unit}"]
        rate = (done - self._start_n) / elapsed if elapsed > 0 else 0.0
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {clock(elapsed)}")
        if self.total:
            left = max(0.0, self.total - done)
            parts.append("ETA " + (clock(left / rate) if rate > 0 else "?") if left else "done")
        text = ", ".join(parts)
        if self.postfix:
            text += "; " + ", ".join(f"{k} {_value(v)}" for k, v in self.postfix.items())
        return text

    def _write(self, now: float) -> None:
        self._last = now
        self._written_n = self.n
        if self.stream is None:
            return
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self.lines += 1


def _count(n: int | float) -> str:
    return f"{n:g}" if isinstance(n, float) and not n.is_integer() else str(int(n))


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
