"""`prefpipe annotate`: people judge pairs in the browser, straight into the pairs schema.

    prefpipe annotate --candidates DIR --out WORKDIR     pairs drawn per prompt from the candidates
    prefpipe annotate --pairs DIR --out WORKDIR          judge existing pairs again (AI pairs: agreement with the scorer)

It serves a page on http://127.0.0.1:PORT/ (keys <- -> prefer, down tie, space skip, u undo), one queue per
annotator name, and a live stats page. Every judgment goes to `WORKDIR/annotate/judgments.jsonl` (fsynced
before the next pair is shown); stopping the server (Ctrl-C) or `--finish` writes `WORKDIR/pairs/human`, which
`prefpipe train --source human --workdir WORKDIR` reads; `--export d3po` writes D3PO's label files as well.

- items.py     the session's pairs (from candidates or a pairs dataset), their ids, images read on demand
- journal.py   the append-only, fsynced judgments log, read back after a crash
- session.py   each annotator's queue: next pair, judge, skip, undo, progress (a replay of the journal)
- stats.py     progress, agreement between annotators, agreement with the scorer (relabel's statistics)
- output.py    the journal as `WORKDIR/pairs/human`, and as D3PO's label files
- app.py       the FastAPI app (templates/, static/), the socket, uvicorn
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import write_atomic
from prefpipe.stages.annotate.items import ImageStore, SessionInput, load_candidates, load_pairs
from prefpipe.stages.annotate.journal import Journal
from prefpipe.stages.annotate.output import HUMAN_PAIRS, check_pairs_folder, write_d3po_labels, write_pairs
from prefpipe.stages.annotate.session import Session

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class AnnotateOptions:
    """What decides a session's pairs (recorded in WORKDIR/annotate/session.json; a restart must match)."""

    mode: str  # candidates | pairs
    source: str
    strategy: str = "all"
    k: int = 2
    seed: int = 0
    limit: int | None = None


def load_input(opts: AnnotateOptions) -> SessionInput:
    """The session's pairs, as the options say."""
    if opts.mode == "candidates":
        return load_candidates(opts.source, opts.strategy, opts.k, opts.seed, opts.limit)
    return load_pairs(opts.source, opts.limit)


def open_session(opts: AnnotateOptions, inp: SessionInput, workdir: str | Path) -> Session:
    """The session of `workdir` over the pairs `inp`: the annotators' state replayed from the journal. Refuses
    a work folder whose session was started on other input or with other options."""
    folder = Path(workdir) / "annotate"
    record = {"options": asdict(opts), "input_fingerprint": inp.fingerprint, "pairs": len(inp.items)}
    path = folder / "session.json"
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [f"{k}: folder has {old['options'].get(k)!r}, this run asks {v!r}"
                 for k, v in record["options"].items() if k != "source" and old["options"].get(k) != v]
        if old.get("input_fingerprint") != inp.fingerprint:
            diffs.append(f"input: {opts.source} differs from the {old['options'].get('mode')} this session judges "
                         f"({old['options'].get('source')})")
        if diffs:
            raise PrefpipeError(f"--out {workdir} holds an annotation session of other pairs:\n  " + "\n  ".join(diffs)
                                + "\nRun with the same input and options to resume, or choose another --out.")
    else:
        write_atomic(path, json.dumps(record, indent=2))
    return Session(inp, Journal(folder / "judgments.jsonl"))


@contextlib.contextmanager
def workdir_lock(workdir: str | Path):
    """One `prefpipe annotate` per work folder: its journal has one writer."""
    folder = Path(workdir) / "annotate"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PrefpipeError(f"--out {workdir}: another `prefpipe annotate` is using this folder (stop it first; "
                                "annotators share one server)") from None
        yield


def finish(session: Session, store: ImageStore, workdir: Path, opts: AnnotateOptions, export: str | None) -> None:
    """Write WORKDIR/pairs/human (and D3PO's label files) from the journal, and say what was written."""
    files = write_d3po_labels(session, workdir) if export == "d3po" else []
    folder, stats = write_pairs(session, store, workdir, asdict(opts))
    ties = sum(a["ties"] for a in stats["annotators"])
    click.echo(f"annotate: {stats['judgments']} judgments ({ties} ties) by {len(stats['annotators'])} annotators "
               f"-> {folder}; train with `prefpipe train --source human --workdir {workdir}`", err=True)
    if files:
        click.echo(f"annotate: D3PO labels of {len(files)} annotators -> {files[0].parent}", err=True)


@click.command()
@click.option("--candidates", type=click.Path(), default=None, help="Judge pairs drawn per prompt from this candidates dataset (`prefpipe generate`).")
@click.option("--pairs", type=click.Path(), default=None, help="Judge the pairs of this dataset again (AI pairs: WORKDIR/pairs/ai; the stats page shows agreement with the scorer).")
@click.option("--out", "workdir", required=True, type=click.Path(), help=f"WORKDIR: the journal goes to WORKDIR/annotate, the pairs to WORKDIR/{HUMAN_PAIRS} (re-run to resume).")
@click.option("--strategy", type=click.Choice(["all", "random-k"]), default="all", show_default=True, help="--candidates: every two candidates of a prompt, or --k of them drawn per prompt.")
@click.option("--k", type=click.IntRange(min=1), default=2, show_default=True, help="Pairs per prompt with --strategy random-k.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random-k and of which image is image 0.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but loopback lets other machines read the images and write judgments.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port to listen on (0: any free port, printed).")
@click.option("--finish", "finish_only", is_flag=True, help=f"Do not serve: write WORKDIR/{HUMAN_PAIRS} from the judgments so far, and stop.")
@click.option("--export", type=click.Choice(["d3po"]), default=None, help="Also write D3PO's label files (WORKDIR/d3po-labels/annotator-USER_ID.json, --candidates only); implies --finish.")
def annotate(candidates, pairs, workdir, strategy, k, seed, limit, host, port, finish_only, export):
    """Judge pairs of images in the browser; the judgments become WORKDIR/pairs/human (human feedback)."""
    if (candidates is None) == (pairs is None):
        raise PrefpipeError("give either --candidates DIR (pairs drawn per prompt) or --pairs DIR (judge existing pairs)")
    opts = AnnotateOptions("candidates" if candidates else "pairs", str(candidates or pairs), strategy, k, seed, limit)
    if opts.mode == "pairs" and (strategy != "all" or k != 2):
        raise PrefpipeError("--strategy and --k choose pairs among --candidates; --pairs judges the pairs as they are")
    workdir = Path(workdir)
    check_pairs_folder(workdir)
    inp = load_input(opts)
    with workdir_lock(workdir):
        session = open_session(opts, inp, workdir)
        store = ImageStore(inp.files)
        if finish_only or export:
            finish(session, store, workdir, opts, export)
            return
        from prefpipe.stages.annotate.app import bind, create_app, serve

        sock = bind(host, port)
        address = sock.getsockname()
        url_host = f"[{address[0]}]" if ":" in address[0] else address[0]
        judged = len(session.judgments())
        click.echo(f"annotate: {len(inp.items)} pairs from {opts.source}"
                   + (f" ({inp.repeated} repeated pairs left out)" if inp.repeated else "")
                   + (f"; {judged} judgments by {len(session.annotators)} annotators so far" if judged else ""), err=True)
        if host not in LOOPBACK:
            click.echo(f"annotate: --host {host}: other machines can reach this page, read the images and write "
                       "judgments (there is no login)", err=True)
        click.echo(f"annotate: serving http://{url_host}:{address[1]}/ (stats: /stats); Ctrl-C stops and writes "
                   f"{workdir / HUMAN_PAIRS}", err=True)
        previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops as Ctrl-C does: the pairs get written
        try:
            serve(create_app(session, store, f"prefpipe annotate: {Path(opts.source).name}"), sock)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            session.journal.close()
        if session.judgments():
            finish(session, store, workdir, opts, None)
        else:
            click.echo("annotate: no judgments yet; nothing written", err=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
