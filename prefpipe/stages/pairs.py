"""Preference pairs from scores: which candidates of a prompt to compare, and who won.

Input: a long scores table (`prompt_id`, `candidate`, `scorer`, `score`). Output: one row per pair with
`prompt_id`, `candidate_0`, `candidate_1`, `score_0`, `score_1`, `margin`, `label_0`, `label_1`, `scorer`.

- `by`: one scorer's score is the utility; or an ensemble across scorers:
  `mean-rank` (utility = mean over scorers of the candidate's rank within its prompt, 1 = worst; margin
  in rank units) or `unanimous` (a pair is decided only when every scorer orders it the same way; the
  others are ties; utility and margin as in mean-rank).
- `strategy`: `best-worst` (one pair per prompt: highest vs lowest utility), `all` (every pair within a
  prompt), `random-k` (k pairs drawn per prompt, deterministic in (seed, prompt_id)).
- A pair is a tie when its margin is 0 or below `min_margin` (or, for `unanimous`, when the scorers
  disagree). Ties are dropped (default: the reference trainers would read label_0 = 0.5 as a win) or
  kept with label 0.5.
- Which candidate sits in position 0 is drawn per pair (deterministic), so `label_0` carries the
  preference: a consumer that ignored the labels would learn nothing, not the right thing by accident.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from prefpipe.core.errors import PrefpipeError

log = logging.getLogger("prefpipe.label")
_LOGGED = 20  # candidates with a non-finite score logged one by one per table

STRATEGIES = ("best-worst", "all", "random-k")
ENSEMBLES = ("mean-rank", "unanimous")
PAIR_COLUMNS = ["prompt_id", "candidate_0", "candidate_1", "score_0", "score_1", "margin", "label_0", "label_1", "scorer"]


@dataclass
class PairOptions:
    strategy: str = "best-worst"
    by: str | None = None  # a scorer name, or None with `ensemble`, or None with a single scorer
    ensemble: str | None = None  # "mean-rank" | "unanimous" across all scorers in the table
    min_margin: float = 0.0
    ties: str = "drop"  # "drop" | "keep" (label 0.5)
    k: int = 2  # pairs per prompt for random-k
    seed: int = 0

    def check(self, scorers: list[str]) -> None:
        if self.strategy not in STRATEGIES:
            raise PrefpipeError(f"--strategy {self.strategy}: choose one of {', '.join(STRATEGIES)}")
        if self.ties not in ("drop", "keep"):
            raise PrefpipeError(f"--ties {self.ties}: choose drop or keep")
        if not math.isfinite(self.min_margin) or self.min_margin < 0:
            raise PrefpipeError(f"--min-margin {self.min_margin}: must be a finite number >= 0")
        if self.k < 1:
            raise PrefpipeError(f"--k {self.k}: must be at least 1")
        if self.ensemble is not None:
            if self.ensemble not in ENSEMBLES:
                raise PrefpipeError(f"--ensemble {self.ensemble}: choose one of {', '.join(ENSEMBLES)}")
            if self.by is not None:
                raise PrefpipeError("--by and --ensemble exclude each other: pairs follow one scorer or all of them")
        elif self.by is None and len(scorers) > 1:
            raise PrefpipeError(
                f"the scores hold several scorers ({', '.join(scorers)}): choose one with --by SCORER, "
                "or --ensemble mean-rank|unanimous"
            )
        elif self.by is not None and self.by not in scorers:
            raise PrefpipeError(f"--by {self.by}: no such scorer in the scores (have {', '.join(scorers)})")

    def scorer_label(self, scorers: list[str]) -> str:
        if self.ensemble:
            return f"{self.ensemble}({','.join(sorted(scorers))})"
        return self.by or scorers[0]


@dataclass
class PairCounts:
    prompts: int = 0
    single_candidate_prompts: int = 0
    pairs: int = 0
    ties_dropped: int = 0
    ties_kept: int = 0
    candidates_missing_scores: int = 0
    candidates_nonfinite_scores: int = 0  # inf or -inf: counted, logged with the key, never paired
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


def _hash_unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks, 1 = lowest (ties share the mean of their positions)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), float)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def build_pairs(scores: pl.DataFrame, opts: PairOptions, counts: PairCounts | None = None) -> pl.DataFrame:
    """Pairs from a long scores table (see the module docstring); `counts` collects what happened."""
    counts = counts if counts is not None else PairCounts()
    missing = {"prompt_id", "candidate", "scorer", "score"} - set(scores.columns)
    if missing:
        raise PrefpipeError(f"scores table: missing column(s) {', '.join(sorted(missing))}")
    scorers = sorted(scores["scorer"].unique().to_list())
    if not scorers:
        return pl.DataFrame(schema=_out_schema())
    opts.check(scorers)
    used = scorers if opts.ensemble else [opts.by or scorers[0]]
    wide = (
        scores.filter(pl.col("scorer").is_in(used))
        .pivot(on="scorer", index=["prompt_id", "candidate"], values="score", aggregate_function="first")
        .sort(["prompt_id", "candidate"])
    )
    for s in used:
        if s not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.Float64).alias(s))
    present = wide.drop_nulls(subset=used).filter(pl.all_horizontal([pl.col(s).is_not_nan() for s in used]))
    complete = present.filter(pl.all_horizontal([pl.col(s).is_finite() for s in used]))
    counts.candidates_missing_scores += wide.height - present.height
    counts.candidates_nonfinite_scores += present.height - complete.height
    for row in wide.join(complete, on=["prompt_id", "candidate"], how="anti").head(_LOGGED).iter_rows(named=True):
        log.warning("pairs: candidate %s/%s has no finite score (%s): never paired", row["prompt_id"],
                    row["candidate"], ", ".join(f"{s} {row[s]}" for s in used))
    label = opts.scorer_label(scorers)
    rows: list[tuple] = []
    for (pid,), group in complete.group_by(["prompt_id"], maintain_order=True):
        counts.prompts += 1
        cands = group["candidate"].to_numpy()
        if len(cands) < 2:
            counts.single_candidate_prompts += 1
            continue
        per_scorer = np.stack([group[s].to_numpy().astype(float) for s in used])  # (S, n)
        utility = per_scorer[0] if not opts.ensemble else np.mean([_ranks(v) for v in per_scorer], axis=0)
        for a, b in choose_pairs(pid, cands, utility, opts):  # a: position 0, b: position 1
            margin = abs(utility[a] - utility[b])
            if opts.ensemble == "unanimous":
                signs = np.sign(per_scorer[:, a] - per_scorer[:, b])
                tie = not (np.all(signs > 0) or np.all(signs < 0)) or margin < opts.min_margin
            else:
                tie = margin == 0 or margin < opts.min_margin
            if tie and opts.ties == "drop":
                counts.ties_dropped += 1
                continue
            counts.ties_kept += int(tie)
            label_0 = 0.5 if tie else float(utility[a] > utility[b])  # whether the candidate in position 0 won
            rows.append((pid, int(cands[a]), int(cands[b]), float(utility[a]), float(utility[b]), float(margin),
                         label_0, 1.0 - label_0, label))
    counts.pairs += len(rows)
    return pl.DataFrame(rows, schema=_out_schema(), orient="row")


def _out_schema() -> dict:
    return {
        "prompt_id": pl.String, "candidate_0": pl.Int32, "candidate_1": pl.Int32, "score_0": pl.Float32,
        "score_1": pl.Float32, "margin": pl.Float32, "label_0": pl.Float64, "label_1": pl.Float64, "scorer": pl.String,
    }


def choose_pairs(pid: str, cands: np.ndarray, utility: np.ndarray, opts: PairOptions) -> list[tuple[int, int]]:
    """Which candidates of prompt `pid` to compare, per `opts.strategy`, as index pairs (a, b) into `cands`
    (its candidate numbers) and `utility`, `a` in position 0. Position 0 is drawn per pair (deterministic in
    seed, prompt and candidates), so `label_0` carries the preference. `all` and `random-k` never read the
    utilities (`prefpipe annotate` draws pairs for people from unscored candidates with them)."""
    return [(i, j) if _hash_unit(opts.seed, pid, cands[i], cands[j], "side") < 0.5 else (j, i)
            for i, j in _choose(pid, utility, opts)]


def _choose(pid: str, utility: np.ndarray, opts: PairOptions) -> list[tuple[int, int]]:
    """Index pairs (i, j), i < j, within one prompt, per strategy."""
    n = len(utility)
    if opts.strategy == "best-worst":
        # stable: the first best and the last worst by candidate order, so equal utilities give a tie pair
        best = int(np.argmax(utility))
        worst = int(n - 1 - np.argmin(utility[::-1]))
        if best == worst:  # all equal: compare the first two (a tie)
            best, worst = 0, 1
        return [(best, worst)]
    every = list(itertools.combinations(range(n), 2))
    if opts.strategy == "all":
        return every
    order = sorted(every, key=lambda p: _hash_unit(opts.seed, pid, p[0], p[1], "random-k"))
    return order[: opts.k]
