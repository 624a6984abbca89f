"""The session's judgments as finished datasets: `WORKDIR/pairs/human` (what `prefpipe train --source human`
reads) and, on request, D3PO's label files.

The journal is the record; these are made from it whole, when the server stops (Ctrl-C, SIGTERM) and by
`prefpipe annotate ... --finish`. A kill before then loses nothing: the next stop or `--finish` writes them
from the journal. The pairs folder is built beside its place and renamed over it, so a reader (a training
run) never sees half of it.

Rows: one per live judgment (an annotator's judgment of a pair, not undone), in the order made, in the pairs
schema: `source` human, `user_id` (`session.user_id_of` the annotator's name; names in `_prefpipe.json`),
`created_at` the judgment's time, `ranking_id` its number in the journal, `label_0` 1 / 0 / 0.5 for a tie
(training drops ties by default), both images as they were shown.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pyarrow as pa

from prefpipe.core.dataset import ShardedDataset
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import atomic_output, sha256_file, write_atomic
from prefpipe.core.identity import fingerprint
from prefpipe.core.schema import PAIRS
from prefpipe.core.tables import read_manifest
from prefpipe.stages.annotate.items import ImageStore
from prefpipe.stages.annotate.session import Judgment, Session, user_id_of
from prefpipe.stages.annotate.stats import session_stats

HUMAN_PAIRS = Path("pairs") / "human"
D3PO_LABELS = "d3po-labels"
STAGE = "annotate"
ROWS_PER_SHARD = 256  # judgments per shard (each row carries two images)


def check_pairs_folder(workdir: str | Path) -> Path:
    """`workdir/pairs/human`, when annotate may write there (nothing, or what annotate wrote): checked before
    serving, so that people's work is not collected for a folder another stage (`ingest`) owns."""
    folder = Path(workdir) / HUMAN_PAIRS
    earlier = read_manifest(folder)
    if (earlier and earlier.get("stage") != STAGE) or (not earlier and folder.exists() and any(folder.iterdir())):
        raise PrefpipeError(f"--out {workdir}: {folder} holds another dataset (from "
                            f"{earlier.get('stage') or 'elsewhere'}); annotate writes its pairs there: give another --out")
    return folder


def write_pairs(session: Session, store: ImageStore, workdir: str | Path, options: dict) -> tuple[Path, dict]:
    """Write every live judgment to `workdir/pairs/human` (replacing what an earlier stop wrote); returns the
    folder and the session's statistics (also in `_prefpipe.json` and `workdir/annotate/stats.json`)."""
    folder = check_pairs_folder(workdir)
    judgments = session.judgments()
    if not judgments:
        raise PrefpipeError(f"no judgments in {session.journal.path} yet: nothing to write to {folder}")
    stats = session_stats(session)
    n_units = (len(judgments) + ROWS_PER_SHARD - 1) // ROWS_PER_SHARD
    with atomic_output(folder) as tmp:
        ds = ShardedDataset(tmp, STAGE, options, fingerprint(session.input.fingerprint, sha256_file(session.journal.path)),
                            n_units, PAIRS).open()
        for unit in range(n_units):
            with ds.write_unit(unit) as writer:
                writer.write(_rows(session, store, judgments[unit * ROWS_PER_SHARD:(unit + 1) * ROWS_PER_SHARD]))
                writer.count("judgments", min(ROWS_PER_SHARD, len(judgments) - unit * ROWS_PER_SHARD))
        ds.record(annotators={a["name"]: a["user_id"] for a in stats["annotators"]}, stats=stats)
    write_atomic(Path(workdir) / "annotate" / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False))
    return folder, stats


def _rows(session: Session, store: ImageStore, judgments: list[Judgment]) -> pa.Table:
    items = [session.input.by_id[j.pair_id] for j in judgments]
    labels = [j.label_0 for j in judgments]
    return pa.table({
        "are_different": [True] * len(items),
        "best_image_uid": [it.image_0_uid if v == 1.0 else it.image_1_uid if v == 0.0 else None
                           for it, v in zip(items, labels)],
        "caption": [it.caption for it in items],
        "created_at": pa.array([datetime.fromisoformat(j.at).replace(tzinfo=None) for j in judgments], pa.timestamp("ns")),
        "has_label": [True] * len(items),
        "image_0_uid": [it.image_0_uid for it in items],
        "image_1_uid": [it.image_1_uid for it in items],
        "jpg_0": pa.array([store.read(it.image_0) for it in items], pa.binary()),
        "jpg_1": pa.array([store.read(it.image_1) for it in items], pa.binary()),
        "label_0": pa.array(labels, pa.float64()),
        "label_1": pa.array([1.0 - v for v in labels], pa.float64()),
        "model_0": [it.model_0 for it in items],
        "model_1": [it.model_1 for it in items],
        "ranking_id": pa.array([j.seq for j in judgments], pa.int64()),
        "user_id": pa.array([user_id_of(j.user) for j in judgments], pa.int64()),
        "source": ["human"] * len(items),
        "prompt_id": [it.prompt_id for it in items],
    })


def write_d3po_labels(session: Session, workdir: str | Path) -> list[Path]:
    """D3PO's human-label files (`trainer.data.preferences.read_d3po_labels` reads them, and so do D3PO's own
    scripts): `workdir/d3po-labels/annotator-USER_ID.json`, one per annotator, each a list with one entry per
    prompt of --candidates in order, and each entry the prompt's per-candidate scores: the candidate's wins in
    that annotator's judgments (a tie counts half to each). D3PO prefers the higher mean score across files, so a
    prompt nobody judged (all zeros) gives only ties; pairs of a prompt that were never compared directly are
    ordered by their wins against the others, which is what a per-image score says."""
    if session.input.mode != "candidates":
        raise PrefpipeError("--export d3po: D3PO's label files score the candidates of --candidates in order; this "
                            "session judges --pairs (train D3PO on them with `prefpipe train --objective d3po "
                            "--pairs WORKDIR/pairs/human --candidates ...` when their uids are PROMPT_ID-CANDIDATE)")
    from trainer.data.trajectories import candidate_prompts

    prompts = candidate_prompts(session.input.source)
    where = {(pid, c): (j, i) for j, (pid, cands) in enumerate(prompts) for i, c in enumerate(cands)}
    out = Path(workdir) / D3PO_LABELS
    written = []
    with session.lock:
        annotators = [a for a in session.annotators.values() if a.judged]
    for a in sorted(annotators, key=lambda a: a.user_id):
        scores = [[0.0] * len(cands) for _, cands in prompts]
        for j in a.judged.values():
            it = session.input.by_id[j.pair_id]
            (p0, i0), (_, i1) = (where[(it.prompt_id, int(uid.rpartition("-")[2]))]
                                 for uid in (it.image_0_uid, it.image_1_uid))
            scores[p0][i0] += j.label_0
            scores[p0][i1] += 1.0 - j.label_0
        path = out / f"annotator-{a.user_id}.json"
        write_atomic(path, json.dumps(scores))
        written.append(path)
    if not written:
        raise PrefpipeError(f"--export d3po: no judgments in {session.journal.path} yet")
    return written
