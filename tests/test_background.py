"""The background helpers that keep a model busy: order kept, errors raised in the caller, no thread left."""

import threading
import time

import pytest

from prefpipe.core.background import Background, prefetch


def test_background_work_runs_in_order_and_is_done_when_the_block_ends():
    done = []
    with Background(lambda item: (time.sleep(0.001), done.append(item)), depth=2) as bg:
        for i in range(50):
            bg.put(i)
    assert done == list(range(50))
    assert not bg.thread.is_alive()


def test_an_error_in_the_background_is_raised_in_the_caller():
    def work(item):
        if item == 3:
            raise ValueError("bad item 3")

    with pytest.raises(ValueError, match="bad item 3"):
        with Background(work, depth=1) as bg:
            for i in range(10):
                bg.put(i)


def test_an_error_in_the_caller_stops_the_background_without_finishing_its_queue():
    seen = []
    with pytest.raises(RuntimeError):
        with Background(lambda item: (time.sleep(0.01), seen.append(item)), depth=5) as bg:
            for i in range(5):
                bg.put(i)
            raise RuntimeError("the caller failed")
    assert len(seen) < 5 and not bg.thread.is_alive()


def test_prefetch_computes_ahead_in_another_thread_keeps_order_and_raises_in_place():
    main = threading.get_ident()
    threads = set()

    def fn(x):
        threads.add(threading.get_ident())
        if x == 7:
            raise KeyError(7)
        return x * x

    got = []
    with pytest.raises(KeyError):
        for value in prefetch(range(10), fn):
            got.append(value)
    assert got == [x * x for x in range(7)] and main not in threads
    before = threading.active_count()
    for _ in prefetch(range(1000), fn=lambda x: x, depth=2):
        break  # a consumer that stops early stops the thread
    time.sleep(0.2)
    assert threading.active_count() <= before
