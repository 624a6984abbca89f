"""The live statistics of a session (the stats page, `/api/stats`, and `annotate/stats.json` at the end).

- Per annotator: judged, ties, skipped, remaining, last judgment.
- Between annotators, on the pairs that more than one person judged: two judgments of a pair agree when they
  give the same label (the same image preferred, or both a tie); the share of agreeing judgment pairs with
  its 95% Wilson interval, overall and per two annotators.
- Where the pairs came from AI labels (their `score_0`/`score_1`): how the scorer agrees with the people,
  the relabel report's statistics (`stages.label.scorer_agreement`), overall and per annotator.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from prefpipe.core.stats import wilson_interval
from prefpipe.stages.annotate.session import Judgment, Session
from prefpipe.stages.label import pair_halves, scorer_agreement


def session_stats(session: Session) -> dict:
    with session.lock:
        judgments = session.judgments()
        annotators = [
            {"name": a.name, "user_id": a.user_id, **session.progress(a.name),
             "last_at": max((j.at for j in a.judged.values()), default=None)}
            for a in sorted(session.annotators.values(), key=lambda a: a.name)
        ]
    return _finite({
        "pairs": len(session.items),
        "judgments": len(judgments),
        "annotators": annotators,
        "inter_annotator": inter_annotator(judgments),
        "scorer": scorer_stats(session, judgments),
    })


def _rate(agree: float, n: int) -> dict:
    lo, hi = wilson_interval(agree, n)
    return {"comparisons": n, "agree": agree, "rate": agree / n if n else None, "ci95": [lo, hi] if n else None}


def inter_annotator(judgments: list[Judgment]) -> dict:
    """Agreement between annotators on the pairs that several of them judged."""
    by_pair: dict[str, dict[str, float]] = {}
    for j in judgments:
        by_pair.setdefault(j.pair_id, {})[j.user] = j.label_0
    shared = {p: labels for p, labels in by_pair.items() if len(labels) > 1}
    per_two: dict[tuple[str, str], list[int]] = {}
    for labels in shared.values():
        for (a, la), (b, lb) in itertools.combinations(sorted(labels.items()), 2):
            per_two.setdefault((a, b), []).append(int(la == lb))
    agree = sum(sum(v) for v in per_two.values())
    n = sum(len(v) for v in per_two.values())
    return {
        "pairs_judged_by_several": len(shared),
        **_rate(agree, n),
        "by_annotators": [{"a": a, "b": b, "pairs": len(v), **_rate(sum(v), len(v))}
                          for (a, b), v in sorted(per_two.items())],
    }


def scorer_stats(session: Session, judgments: list[Judgment]) -> dict:
    """Per scorer of the input pairs: its agreement with every judgment of its pairs, and with each annotator's."""
    by_scorer: dict[str, list[tuple[Judgment, object]]] = {}
    for j in judgments:
        item = session.input.by_id[j.pair_id]
        if item.scorer is not None:
            by_scorer.setdefault(item.scorer, []).append((j, item))
    out = {}
    for scorer, rows in sorted(by_scorer.items()):
        def agreement(rows):
            human = np.array([j.label_0 for j, _ in rows], float)
            diff = np.array([it.score_0 - it.score_1 for _, it in rows], float)
            split = pair_halves([it.image_0_uid for _, it in rows], [it.image_1_uid for _, it in rows],
                                [it.caption for _, it in rows])
            return {"judgments": len(rows), **scorer_agreement(human, diff, split)}

        users = sorted({j.user for j, _ in rows})
        out[scorer] = {"all": agreement(rows),
                       "by_annotator": {u: agreement([r for r in rows if r[0].user == u]) for u in users}}
    return out


def _finite(x):
    """JSON has no NaN: non-finite numbers become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
