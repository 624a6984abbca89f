"""The background helpers that keep a model busy: order kept, errors raised in the caller, no thread left."""

import os
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


def test_prefetch_over_workers_overlaps_them_keeps_order_bounds_the_work_ahead_and_raises_in_place():
    from prefpipe.core.background import default_workers

    assert 1 <= default_workers() <= 8
    lock = threading.Lock()
    running, most, started = [0], [0], []

    def fn(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            started.append(x)
        time.sleep(0.02 if x % 3 else 0.05)  # later items often finish first
        with lock:
            running[0] -= 1
        if x == 11:
            raise KeyError(11)
        return x * x

    got = []
    with pytest.raises(KeyError):
        for value in prefetch(range(20), fn, depth=2, workers=4):
            got.append(value)
            if len(got) == 3:  # at most workers + depth - 1 items are in flight ahead of the consumer
                assert len(started) <= 3 + 4 + 2 - 1
    assert got == [x * x for x in range(11)]  # in order, the error at its place
    assert most[0] == 4  # the workers really ran at once
    before = threading.active_count()
    for _ in prefetch(range(1000), lambda x: x, workers=3):
        break  # a consumer that stops early: no item is started after, and the pool's threads end
    time.sleep(0.2)
    assert threading.active_count() <= before


def test_prefpipe_workers_sets_the_threads_and_a_bad_value_is_one_message(monkeypatch):
    import torch

    from prefpipe.core.background import default_workers
    from prefpipe.core.errors import PrefpipeError

    monkeypatch.delenv("PREFPIPE_WORKERS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = default_workers()
    assert default_workers("cuda:0") == alone == min(8, len(os.sched_getaffinity(0)))
    # a model on the CPU uses every core itself: one thread prepares ahead
    assert default_workers("cpu") == default_workers(torch.device("cpu")) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # 64 processes launched on this machine share its cores
    assert default_workers() == 1 <= alone
    monkeypatch.setenv("PREFPIPE_WORKERS", "3")
    assert default_workers() == default_workers("cpu") == 3
    for bad in ("0", "two", "-1", ""):
        monkeypatch.setenv("PREFPIPE_WORKERS", bad)
        with pytest.raises(PrefpipeError, match="PREFPIPE_WORKERS"):
            default_workers()
