"""Progress: a tqdm bar on a terminal; in a file or CI log, complete lines every N seconds (never redrawn)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.progress import INTERVAL_ENV, LineProgress, clock, interval_s, progress
from tests.test_label import PROMPTS, write_candidates

# "score: 64/200 img (32%), 812 img/s, elapsed 0:00, ETA 0:00"
SCORE_LINE = re.compile(r"^score: (\d+)/(\d+) img \((\d+)%\), ([\d.e+-]+) img/s, elapsed (\d+:\d\d), (ETA \d+:\d\d|done)$")


def _label(tmp_path, interval: str | None):
    """`prefpipe label` in a subprocess, stderr to a file (not a terminal), on 144 candidates of 12 prompts."""
    cands = tmp_path / "candidates"
    if not cands.exists():
        many = {f"{name} {k}": kinds * 6 for k in range(3) for name, kinds in PROMPTS.items()}
        write_candidates(cands, many)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(INTERVAL_ENV, None)
    if interval is not None:
        env[INTERVAL_ENV] = interval
    log = tmp_path / f"stderr-{interval}.log"
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "prefpipe", "label", "--scorer", "compressibility",
                               "--candidates", str(cands), "--out", str(tmp_path / f"work-{interval}"),
                               "--batch-size", "8"], stdout=subprocess.DEVNULL, stderr=err, env=env, timeout=300)
    return proc.returncode, log.read_bytes().decode()


def test_a_stage_writing_to_a_file_prints_periodic_lines_with_count_rate_and_eta(tmp_path):
    rc, text = _label(tmp_path, "0")  # a line at every update
    assert rc == 0, text
    assert "\r" not in text and "\x1b" not in text  # no redraws, no terminal control
    lines = [m for m in map(SCORE_LINE.match, text.splitlines()) if m]
    assert len(lines) >= 3, text  # 144 images in two shards, read 64 at a time: several updates
    done = [int(m[1]) for m in lines]
    assert done == sorted(set(done)) and done[-1] == int(lines[-1][2]) == 144  # each count once
    assert lines[-1][6] == "done" and lines[0][6].startswith("ETA")
    assert all(float(m[4]) > 0 for m in lines)


def test_by_default_a_short_stage_writes_one_closing_line_not_one_per_update(tmp_path):
    rc, text = _label(tmp_path, None)  # 30 s between lines: this stage takes less
    assert rc == 0, text
    lines = [m for m in map(SCORE_LINE.match, text.splitlines()) if m]
    assert len(lines) == 1 and lines[0][1] == lines[0][2] and lines[0][6] == "done", text


def test_a_bad_interval_stops_with_a_message_naming_the_variable(tmp_path, monkeypatch):
    rc, text = _label(tmp_path, "often")
    assert rc != 0 and f"{INTERVAL_ENV}='often'" in text and "Traceback" not in text
    monkeypatch.setenv(INTERVAL_ENV, "-1")
    with pytest.raises(PrefpipeError, match=INTERVAL_ENV):
        interval_s()


def test_lines_are_written_each_interval_with_the_postfix_and_once_at_close():
    out = io.StringIO()
    bar = LineProgress(total=100, desc="train", unit="step", interval=3600, stream=out)
    for _ in range(50):
        bar.update()
    bar.set_postfix(loss="0.6931")
    assert out.getvalue() == ""  # nothing before the interval has passed
    line = bar.line(time.monotonic() + 10)  # as if 10 s had passed since the start
    m = re.fullmatch(r"train: 50/100 step \(50%\), ([\d.]+) step/s, elapsed 0:10, ETA 0:(\d\d); loss 0.6931", line)
    assert m and float(m[1]) == pytest.approx(5, rel=0.01) and int(m[2]) in (9, 10, 11), line
    bar.interval = 0  # the interval has passed: the next update writes a line
    bar.update(10)
    bar.interval = 3600
    bar.update(40)
    bar.close()  # the last count, with "done"
    bar.close()  # closing twice writes once
    written = out.getvalue().splitlines()
    assert len(written) == 2 and written[0].startswith("train: 60/100 step (60%)")
    assert re.fullmatch(r"train: 100/100 step \(100%\), [\d.e+]+ step/s, elapsed 0:00, done; loss 0.6931", written[1])


def test_iterating_closes_with_the_total_and_disabled_progress_writes_nothing():
    out = io.StringIO()
    assert list(progress(range(5), desc="scan", unit="unit", stream=out)) == [0, 1, 2, 3, 4]
    assert re.fullmatch(r"scan: 5/5 unit \(100%\), [\d.e+]+ unit/s, elapsed 0:00, done\n", out.getvalue())
    quiet = io.StringIO()
    bar = progress(total=3, desc="x", enabled=False, stream=quiet)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""
    assert clock(59.6) == "1:00" and clock(3725) == "1:02:05"


def test_a_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = progress(total=3, desc="x", stream=tty)
        assert isinstance(bar, tqdm)
        bar.close()
    os.close(master)
