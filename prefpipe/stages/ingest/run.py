"""The one unit loop of `prefpipe ingest`, for every source; a source supplies only what differs (a `Job`).

- Output: `WORKDIR/pairs/human`, a ShardedDataset of PAIRS; one unit of the input -> one shard.
- Rank r of w takes units r, r+w, ... (`rank_world()`); a shard is written to a temporary name and renamed,
  so a re-run resumes with the units still pending.
- Each unit gets a UnitContext: its shard writer, the shared ImageChecker and the logger of dropped rows (each
  with its key), the batch size and the progress bar. Its counters (rows read, kept, dropped_<reason>, ...)
  are summed into this run's counters and, over every finished unit, into the summary line and
  `_prefpipe.json`.
- Beyond a source's own state, only the summary's distinct-prompt count (a set of prompt ids, read back from
  the output once every shard is done) grows with the data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from prefpipe.core.dataset import ShardedDataset, UnitWriter, barrier, is_main_process, rank_world
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.images import ImageChecker
from prefpipe.core.schema import PAIRS
from prefpipe.stages.ingest.options import FILTERED, HUMAN_PAIRS, REASONS, IngestOptions

log = logging.getLogger("prefpipe.ingest")

_LOG_LIMIT = 50  # bad rows logged per reason and process; the counters hold them all


def checked_options(opts: IngestOptions | None, batch_size: int) -> IngestOptions:
    """The options (defaults when None), checked before any input is opened."""
    opts = opts or IngestOptions()
    opts.validate()
    if batch_size < 1:
        raise PrefpipeError(f"--batch-size {batch_size}: must be at least 1")
    return opts


class BadRows:
    """Logs dropped rows with their key (up to `_LOG_LIMIT` per reason) and keeps a few examples of bad ones.

    Drops the options ask for (`FILTERED`: ties, duplicates, ...) are logged at INFO; faults in the data
    (bad label, bad image, a path outside the input folder, a bad entry) at WARNING and kept as examples.
    """

    def __init__(self):
        self.logged: dict[str, int] = {}
        self.examples: list[str] = []

    def wants(self, reason: str) -> bool:
        """Whether a row dropped for `reason` would still be logged (callers skip building keys when not)."""
        return self.logged.get(reason, 0) <= _LOG_LIMIT

    def __call__(self, reason: str, key: str, why: str) -> None:
        n = self.logged.get(reason, 0)
        self.logged[reason] = n + 1
        filtered = reason in FILTERED
        if not filtered and len(self.examples) < 20:
            self.examples.append(f"{reason}: {key}: {why}")
        level = logging.INFO if filtered else logging.WARNING
        if n < _LOG_LIMIT:
            log.log(level, "skipped %s: %s: %s", reason, key, why)
        elif n == _LOG_LIMIT:
            log.log(level, "more %s rows are not logged (see the counts in the summary)", reason)


@dataclass
class UnitContext:
    """What the loop hands each unit: where its rows and counters go, and what the units share."""

    writer: UnitWriter
    checker: ImageChecker
    bad: BadRows
    batch_size: int
    bar: Any  # a progress display (prefpipe.core.progress), advanced by the unit in its own items (or None)


@dataclass
class Job:
    """What one source supplies to :func:`run_units`."""

    stage: str  # "ingest pickapic": the manifest's stage and the summary's first words
    noun: str  # what the input is counted in, plural ("rows", "entries"): the `<noun>_read` counter
    item: str  # the same, singular: the progress bar's unit
    options: dict[str, Any]  # the options that decide the output
    input_fingerprint: str
    n_units: int
    header: str  # rank 0's first line
    # units(pending units, ascending) -> ((unit, its work) in that order, the progress bar's total or None);
    # called once, and only when some unit is pending (the place for up-front work such as a duplicate plan)
    units: Callable[[list[int]], tuple[Iterable[tuple[int, Any]], int | None]]
    run_unit: Callable[[int, Any, UnitContext], None]  # (unit, its work, context): write one unit


def run_units(job: Job, out: str | Path, opts: IngestOptions, *, batch_size: int, progress: bool,
              rank: int | None, world: int | None) -> dict:
    """Run or resume this process's units of `job` into `out/pairs/human`, print the summary line.

    Returns the counters of this run (units_written, units_skipped, <noun>_read, kept, dropped_<reason>,
    ...) plus `total`: the counters summed over every finished unit of the dataset.
    """
    if rank is None or world is None:
        rank, world = rank_world()
    ds = ShardedDataset(
        Path(out) / HUMAN_PAIRS, stage=job.stage, options=job.options, input_fingerprint=job.input_fingerprint,
        n_units=job.n_units, schema=PAIRS, runtime={"batch_size": batch_size, "world": world},
    ).open()
    todo = ds.pending(rank, world)
    mine = ds.units_for(rank, world)
    if rank == 0:
        click.echo(job.header, err=True)
        _warn_ties(opts)
    counters: dict[str, Any] = {"units_written": 0, "units_skipped": len(mine) - len(todo)}
    t0 = time.perf_counter()
    if todo:
        from prefpipe.core.progress import progress as progress_of

        work, total = job.units(todo)
        bar = progress_of(total=total, unit=job.item, enabled=progress,
                   desc=f"ingest[{rank}/{world}]" if world > 1 else "ingest")
        checker = ImageChecker(opts.verify_images, opts.max_side, opts.jpeg_quality)
        bad = BadRows()
        for unit, unit_work in work:
            with ds.claim(unit) as mine:
                if not mine or ds.is_done(unit):  # another launch into this folder is writing it, or wrote it
                    ds.busy.append(unit)
                    continue
                with ds.write_unit(unit) as writer:
                    job.run_unit(unit, unit_work, UnitContext(writer, checker, bad, batch_size, bar))
                    if checker.resized:
                        writer.count("images_resized", checker.resized)
                        checker.resized = 0
            for k, v in writer.stats.items():
                counters[k] = counters.get(k, 0) + v
            counters["units_written"] += 1
        bar.close()
        counters["bad_row_examples"] = bad.examples
    return _finish(ds, job.stage, job.noun, counters, time.perf_counter() - t0, rank, world)


def _warn_ties(opts: IngestOptions) -> None:
    if opts.ties == "keep":
        click.echo("ingest: --ties keep: ties are stored as label 0.5/0.5; the Diffusion-DPO reference trainers "
                   "count any label_0 other than 0 as a win for image 0", err=True)


def _distinct_prompts(ds: ShardedDataset) -> int:
    import pyarrow.parquet as pq

    seen: set[str] = set()
    for u in range(ds.n_units):
        for b in pq.ParquetFile(ds.shard_path(u)).iter_batches(columns=["prompt_id"], batch_size=65536):
            seen.update(b.column(0).to_pylist())
    return len(seen)


def _finish(ds: ShardedDataset, stage: str, noun: str, counters: dict, wall: float, rank: int, world: int) -> dict:
    """Print the one-line summary (one process under a launcher) and store the dataset-wide counters in
    `_prefpipe.json`, once every process has finished its share."""
    barrier()
    total = ds.stats()
    done = sum(ds.is_done(u) for u in range(ds.n_units))
    read = total.get(f"{noun}_read", 0)
    summary = {k: v for k, v in total.items() if k != "rows"}
    if done == ds.n_units:
        summary["prompts"] = _distinct_prompts(ds)
    dropped = ", ".join(f"{r.replace('_', ' ')} {total[f'dropped_{r}']}" for r in REASONS if total.get(f"dropped_{r}"))
    line = f"{stage}: read {read} {noun}"
    if "pairs_read" in total:
        line += f" ({total['pairs_read']} candidate pairs)"
    line += f", kept {total.get('kept', 0)} pairs"
    if "prompts" in summary:
        line += f" over {summary['prompts']} prompts"
    line += f"; dropped {dropped or 'none'}"
    if total.get("bad_entries"):
        line += f"; {total['bad_entries']} bad entries"
    line += f"; {counters['units_written']} new shards ({counters['units_skipped']} already done), "
    line += f"{done}/{ds.n_units} finished -> {ds.folder}"
    mine = counters.get(f"{noun}_read", 0)
    if wall > 0 and mine:
        line += f"; {mine / wall:.0f} {noun}/s"
    if world > 1:
        line = f"[rank {rank}/{world}] " + line
    ds.record(summary=summary)
    if is_main_process():
        click.echo(line, err=True)
    counters.update(total=summary, wall_s=wall, shards_finished=done)
    return counters
