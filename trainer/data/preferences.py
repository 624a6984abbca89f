"""D3PO's preferences: which candidate of a prompt beat which, from pairs tables or D3PO's label files, and
their match to the recorded trajectories (:func:`load_trajectory_pairs`, the data entry of the D3PO recipe).

Pairs tables: image uids `PROMPT_ID-CANDIDATE` (`prefpipe label` writes them); `label_0` 1: image 0 wins,
0: image 1 wins, 0.5: a tie, dropped (D3PO keeps ties in the mean as a constant log 2, which only rescales
the loss).

D3PO's human-label format (`scripts/utils.py: load_data_from_json`, `scripts/train.py` of yk7333/d3po): a
folder of JSON files, one per annotator, each a list with one entry per prompt, in sampling order, and each
entry a list of per-image scores (7 images per prompt there). The files are cut to the shortest and averaged;
of two images of a prompt the higher mean score is preferred, equal means are ties. Here entry j is the j-th
prompt of --candidates in order (the order `prefpipe generate` wrote them, shards by name) and score i is
candidate i; :func:`write_label_sheet` writes the images under D3PO's names (``images/{n*j+i:05}.png``)
and its ``prompt.json`` for annotators.

Preferences are checked against the trajectories: both candidates of a pair come from the same prompt of
--candidates, start from the same initial noise x_T, were sampled with the same timesteps and eta, and (for
pairs tables) carry the very image bytes stored with the trajectory; a failing pair is counted, its reason
named, and skipped.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import sha256_file
from prefpipe.core.identity import fingerprint, input_fingerprint
from prefpipe.core.tables import parquet_files
from trainer.config import TrainConfig
from trainer.data import add_count, describe_drops
from trainer.data.trajectories import (
    TRAJECTORY_DROPS,
    Candidate,
    TrajectoryPairs,
    candidate_files,
    candidate_prompts,
    image_digest,
    read_candidates,
)


@dataclass(frozen=True)
class Preference:
    """Candidate `winner` of prompt `prompt_id` is preferred to candidate `loser` of the same prompt."""

    prompt_id: str
    winner: int
    loser: int
    key: str  # the row's name in logs
    images: tuple[bytes, bytes] | None = None  # digests of the (winner, loser) image bytes the label was given on


def parse_uid(uid: str | None) -> tuple[str, int] | None:
    """`prompt_id-candidate` (the uids `prefpipe label` writes) -> (prompt_id, candidate); None otherwise."""
    pid, sep, cand = (uid or "").rpartition("-")
    return (pid, int(cand)) if sep and pid and cand.isdigit() else None


def preferences_from_pairs(sources: Sequence[str | Path], counts: dict[str, int]) -> list[Preference]:
    """Preferences from pairs datasets whose image uids are `prompt_id-candidate` (`prefpipe label`'s).

    `label_0` 1: image 0 wins, 0: image 1 wins, 0.5: a tie (dropped); the two uids must name the same
    prompt. `jpg_0`/`jpg_1`, when present, are kept as digests to check against the candidates.
    """
    out: list[Preference] = []
    for source in sources:
        if not Path(source).exists() and not any(ch in str(source) for ch in "*?["):
            raise PrefpipeError(f"pairs dataset {source}: no such file or folder")
        for f in parquet_files(source):
            names = pq.ParquetFile(f).schema_arrow.names
            missing = [c for c in ("image_0_uid", "image_1_uid", "label_0") if c not in names]
            if missing:
                raise PrefpipeError(
                    f"{f}: column(s) {', '.join(missing)} missing; D3PO pairs name their two candidates of "
                    "--candidates in image_0_uid / image_1_uid as PROMPT_ID-CANDIDATE (`prefpipe label` writes them)"
                )
            cols = ["image_0_uid", "image_1_uid", "label_0"] + [c for c in ("jpg_0", "jpg_1") if c in names]
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=cols):
                rows = batch.to_pydict()
                for i in range(batch.num_rows):
                    counts["rows_read"] = counts.get("rows_read", 0) + 1
                    a, b = parse_uid(rows["image_0_uid"][i]), parse_uid(rows["image_1_uid"][i])
                    key = f"{rows['image_0_uid'][i]}/{rows['image_1_uid'][i]}"
                    label = rows["label_0"][i]
                    if a is None or b is None:
                        add_count(counts, "uid_not_a_candidate")
                    elif a[0] != b[0] or a[1] == b[1]:
                        add_count(counts, "not_two_candidates_of_one_prompt")
                    elif label == 0.5:
                        add_count(counts, "ties_dropped")
                    elif label not in (0.0, 1.0):
                        add_count(counts, "bad_label")
                    else:
                        digests = None
                        if "jpg_0" in rows:
                            digests = (image_digest(rows["jpg_0"][i]), image_digest(rows["jpg_1"][i]))
                        if label == 0.0:
                            a, b = b, a
                            digests = digests and (digests[1], digests[0])
                        out.append(Preference(a[0], a[1], b[1], key, digests))
    return out


def read_d3po_labels(paths: Sequence[str | Path]) -> tuple[list[np.ndarray], list[Path]]:
    """D3PO's human labels: per prompt, the per-candidate scores averaged over the annotators' files.

    Each path is a JSON file or a folder of them (D3PO's `json_path`). Every file is a list with one
    entry per prompt, each a list of numbers (one per image); files are cut to the shortest, as D3PO's
    `load_data_from_json` does, and averaged. Returns (scores per prompt, the files read).
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise PrefpipeError(f"--labels {p}: no .json files in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise PrefpipeError(f"--labels {p}: no such file or folder")
    tables = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise PrefpipeError(f"--labels {f}: not a JSON file ({e})") from e
        ok = isinstance(data, list) and all(
            isinstance(entry, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry)
            for entry in data
        )
        if not ok:
            raise PrefpipeError(
                f"--labels {f}: expected D3PO's format, a list (one entry per prompt) of lists of per-image scores, "
                "e.g. [[1, 0, 0, 2], [0, 1, 1, 0]]"
            )
        tables.append(data)
    n = min(len(t) for t in tables)
    scores = []
    for j in range(n):
        lengths = {len(t[j]) for t in tables}
        if len(lengths) != 1:
            raise PrefpipeError(f"--labels: prompt {j} has {sorted(lengths)} scores in different files; annotators must score the same images")
        scores.append(np.mean([np.asarray(t[j], dtype=np.float64) for t in tables], axis=0))
    return scores, files


def preferences_from_labels(scores: list[np.ndarray], prompts: list[tuple[str, list[int]]],
                            counts: dict[str, int]) -> list[Preference]:
    """Every pair of candidates of a labelled prompt whose mean scores differ; the higher score wins.

    scores[j]: the scores of prompt j; prompts[j]: (prompt_id, its candidate indices in order) of the
    j-th prompt of the candidates dataset.
    """
    if len(scores) > len(prompts):
        raise PrefpipeError(
            f"--labels score {len(scores)} prompts but --candidates holds {len(prompts)}: the labels were made on other candidates"
        )
    out: list[Preference] = []
    for j, s in enumerate(scores):
        pid, cands = prompts[j]
        if len(s) != len(cands):
            raise PrefpipeError(
                f"--labels: prompt {j} ({pid}) has {len(s)} scores but {len(cands)} candidates in --candidates"
            )
        counts["rows_read"] = counts.get("rows_read", 0) + 1
        for a, b in itertools.combinations(range(len(s)), 2):
            if s[a] == s[b]:
                add_count(counts, "ties_dropped")
                continue
            w, lo = (a, b) if s[a] > s[b] else (b, a)
            out.append(Preference(pid, cands[w], cands[lo], f"labels:{j}:{cands[w]}>{cands[lo]}"))
    return out


def write_label_sheet(candidates: str | Path, out: str | Path) -> Path:
    """Lay out a candidates dataset for people to label in D3PO's format: `out/images/{n*j+i:05}.png` is
    candidate i of prompt j (n candidates per prompt), `out/prompt.json` the prompts in order. Their labels
    file is then a list with, per prompt j, the list of its n scores (higher = better)."""
    prompts = candidate_prompts(candidates)
    n = max(len(c) for _, c in prompts)
    index = {(pid, c): n * j + i for j, (pid, cs) in enumerate(prompts) for i, c in enumerate(cs)}
    text: dict[str, str] = {}
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for f in candidate_files(candidates):
        table = pq.read_table(f, columns=["prompt_id", "candidate", "prompt", "image"]).to_pydict()
        for pid, c, prompt, image in zip(table["prompt_id"], table["candidate"], table["prompt"], table["image"]):
            text[pid] = prompt
            (out / "images" / f"{index[(pid, c)]:05}.png").write_bytes(image)
    (out / "prompt.json").write_text(json.dumps([text[pid] for pid, _ in prompts]))
    return out


def load_trajectory_pairs(cfg: TrainConfig) -> TrajectoryPairs:
    """Preferences (pairs datasets and/or D3PO label files) matched to their trajectories in --candidates."""
    counts: dict[str, int] = {}
    prefs: list[Preference] = []
    sources = [str(p) for p in cfg.pairs_paths()] if (cfg.source or cfg.pairs) else []
    digests = [input_fingerprint(s) for s in sources]
    if sources:
        prefs += preferences_from_pairs(sources, counts)
    if cfg.labels:
        scores, files = read_d3po_labels(cfg.labels)
        prefs += preferences_from_labels(scores, candidate_prompts(cfg.candidates), counts)
        sources += [str(f) for f in files]
        digests += [sha256_file(f) for f in files]
    if cfg.limit is not None:
        prefs = prefs[: cfg.limit]
    rows = read_candidates(cfg.candidates, {(p.prompt_id, c) for p in prefs for c in (p.winner, p.loser)}, counts)
    pairs: list[tuple[Candidate, Candidate]] = []
    for p in prefs:
        w, lo = rows.get((p.prompt_id, p.winner)), rows.get((p.prompt_id, p.loser))
        if w is None or lo is None:
            reason = "not_in_candidates"
        elif p.images is not None and p.images != (w.image, lo.image):
            reason = "image_mismatch"  # the pair was labelled on other images than these trajectories end in
        elif not np.array_equal(w.latents[0], lo.latents[0]):
            reason = "different_initial_noise"
        elif not (np.array_equal(w.timesteps, lo.timesteps) and w.eta == lo.eta):
            reason = "different_sampler_settings"
        else:
            pairs.append((w, lo))
            continue
        add_count(counts, reason)
    data = TrajectoryPairs(pairs, counts, sources)
    data.digest = fingerprint(input_fingerprint(cfg.candidates), digests, cfg.limit)  # the inputs by content
    counts["pairs"] = len(pairs)
    if not pairs:
        raise PrefpipeError(
            f"no D3PO training pairs: {counts.get('rows_read', 0)} preference rows read from {', '.join(sources)} "
            f"against {cfg.candidates}, all dropped ({describe_drops(counts, TRAJECTORY_DROPS)})"
        )
    settings = {(tuple(w.timesteps.tolist()), w.eta) for w, _ in pairs}
    if len(settings) > 1:
        raise PrefpipeError(f"--candidates {cfg.candidates}: trajectories were sampled with {len(settings)} different "
                            "step schedules or etas; train on one `prefpipe generate --trajectories` setting at a time")
    if data.eta <= 0:
        raise PrefpipeError(f"--candidates {cfg.candidates}: sampled with eta {data.eta} (deterministic DDIM): its steps "
                            "have no probability to train; generate with --trajectories (eta 1.0)")
    return data
