"""Work handed to one background thread through a bounded queue, so the caller's loop never waits on it.

    with Background(write_batch, depth=2) as bg:     # write_batch(item) runs in the thread, in order
        for batch in batches:
            bg.put(make(batch))                      # blocks only when `depth` items are already waiting

    for decoded in prefetch(batches, decode):        # the other direction: decode(batch) runs ahead
        score(decoded)
    for decoded in prefetch(batches, decode, workers=default_workers("cuda")):   # ... in several threads, in order
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


def on_cpu(device) -> bool:
    """`device` (a `torch.device` or a string such as "cpu", "cuda:0") is the CPU."""
    return str(getattr(device, "type", device)).split(":")[0] == "cpu"


def default_workers(device=None) -> int:
    """Threads that decode and preprocess images ahead of a model on `device`: `PREFPIPE_WORKERS` if set; else 1
    when the model runs on the CPU (it uses every core itself: more threads compete with it; 2 threads measured 1.0-1.5x
    on one process and 17% slower with two test processes on 2 cores); else, for a model on an accelerator, the
    CPU cores this process may use shared among the processes launched on this machine (`LOCAL_WORLD_SIZE`), at
    most 8. PIL's decoders and resampling release the GIL, so they scale with cores while the model runs.
    `device`: a `torch.device`, a string, or None for an accelerator."""
    import os

    from prefpipe.core.errors import PrefpipeError

    given = os.environ.get("PREFPIPE_WORKERS")
    if given is not None:
        if not given.strip().isdigit() or int(given) < 1:
            raise PrefpipeError(f"PREFPIPE_WORKERS={given!r}: give a whole number of threads, 1 or more")
        return int(given)
    if device is not None and on_cpu(device):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, min(8, cores // max(1, int(local) if local.isdigit() else 1)))


def prefetch(items: Iterable[Any], fn: Callable[[Any], Any], depth: int = 2, workers: int = 1) -> Iterator[Any]:
    """`fn(item)` for each item, in order, computed ahead of the consumer (decoding the next batches while the
    model runs this one): in one background thread up to `depth` items ahead, or with `workers` > 1 in that many
    threads at once, `workers + depth - 1` items in flight. An exception in `fn` is raised at its place in the
    sequence; a consumer that stops early stops the work (items not started are dropped)."""
    if workers > 1:
        yield from _prefetch_pool(items, fn, depth, workers)
        return
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


def _prefetch_pool(items: Iterable[Any], fn: Callable[[Any], Any], depth: int, workers: int) -> Iterator[Any]:
    """:func:`prefetch` over a thread pool. The items are drawn by the consumer's thread as slots free up."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    in_flight = workers + depth - 1
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefpipe-prefetch") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
