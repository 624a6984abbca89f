"""Shared fixtures: tiny offline models built through the same code path as `prefpipe tiny`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PARTI = SHARED_DATA / "PartiPrompts.tsv"
ARTIFACTS = REPO / "test-artifacts"

# `accelerate launch` as a user runs it; port 0: a free port of its own (the default, 29500, is one port for
# every launch, and the test workers of `make test` launch at the same time)
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_make(*args: str, timeout: int, **variables: str) -> subprocess.CompletedProcess:
    """Run `make ARGS VAR=value ...` in the repository as a user would (the Makefile's own chain), outside any
    make that runs the tests (its MAKEFLAGS would leak into this one)."""
    cmd = ["make", "--no-print-directory", "-C", str(REPO), *args, *(f"{k}={v}" for k, v in variables.items())]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `prefpipe ARGS` as a user would, in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "prefpipe", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"prefpipe {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two spinning OpenMP threads per
    process make a step up to 100x slower; accelerate gives its CPU processes one thread each too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    from prefpipe.testing.tiny import write_tiny_pipeline

    return write_tiny_pipeline("sd15", tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from prefpipe.testing.tiny import write_tiny_pipeline

    return write_tiny_pipeline("sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from prefpipe.testing.tiny import write_tiny_pipeline

    return write_tiny_pipeline("sd3", tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from prefpipe.testing.tiny import write_tiny_pipeline

    return write_tiny_pipeline("flux", tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def parti_prompts() -> Path:
    if not PARTI.exists():
        pytest.fail(f"{PARTI} is missing: the tests read the shared PartiPrompts data from ../shared/data")
    return PARTI


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (the report pages open in it; playwright drives it for `prefpipe annotate`), installed
    once when missing; a failed install fails the tests, with the reason."""
    exe = shutil.which("chromium")
    if exe is None:
        proc = subprocess.run(
            ["bash", "-c", "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium"],
            capture_output=True, text=True, timeout=1200,
        )
        exe = shutil.which("chromium")
        if exe is None:
            pytest.fail(f"chromium is missing and `apt-get install -y chromium` failed (exit {proc.returncode}):\n"
                        f"{(proc.stderr or proc.stdout)[-3000:]}")
    return exe


# The longest files (minutes each, mostly one thread), started first so that `make test`'s two workers
# (pytest-xdist, `--dist loadfile --no-loadscope-reorder`) run them beside everything else, not after it.
LONGEST_FIRST = ("test_demo_feedback_chain.py", "test_demo_chain.py", "test_plan.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = Path(str(item.fspath)).name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the others is kept
