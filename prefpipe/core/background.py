"""Work handed to one background thread through a bounded queue, so the caller's loop never waits on it.

    with Background(write_batch, depth=2) as bg:     # write_batch(item) runs in the thread, in order
        for batch in batches:
            bg.put(make(batch))                      # blocks only when `depth` items are already waiting

    for decoded in prefetch(batches, decode):        # the other direction: decode(batch) runs ahead
        score(decoded)

The stages use it to keep the model busy: generate encodes PNGs and writes Parquet while the pipeline
samples the next batch; label decodes the next batch while the scorers run. Items are handled in the order
they were put. An exception in the thread is raised again in the caller (at the next `put`, or when the
block ends); an exception in the caller stops the thread without handling what is still queued.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_DONE = object()


class Background:
    def __init__(self, work: Callable[[Any], None], depth: int = 2) -> None:
        self.work = work
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if self.error is None and not self.stop:
                try:
                    self.work(item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
                    self.error = e

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop = exc is not None
        self.queue.put(_DONE)
        self.thread.join()
        if exc is None and self.error is not None:
            raise self.error


def prefetch(items: Iterable[Any], fn: Callable[[Any], Any], depth: int = 2) -> Iterator[Any]:
    """`fn(item)` for each item, in order, computed in one background thread up to `depth` items ahead of the
    consumer (decoding the next batch while the model runs this one). An exception in `fn` is raised at its
    place in the sequence; a consumer that stops early stops the thread."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                results.put((True, fn(item)))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            results.put((False, e))
            return
        results.put((True, _DONE))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while True:
            ok, value = results.get()
            if not ok:
                raise value
            if value is _DONE:
                return
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                results.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
