"""Eval's scores: every image of every model scored by every --scorer, cached in `DIR/scores.parquet`.

- Scoring goes through the one scoring path, `prefpipe.stages.scoring.score_rows` (each image decoded once,
  shared by the scorers it still needs), in batches of `score_batch_size` candidates.
- The table is long: `model`, `prompt_id`, `candidate`, `seed`, `scorer`, `score` (one row per image per
  scorer). Undecodable images are counted and skipped, non-finite scores counted and dropped.
- The cache is kept per (model, scorer), keyed (in the Parquet metadata) by the candidates dataset's files
  and the scorer's weights; a re-run scores only what is new, and rewrites nothing when nothing is.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

SCORES_META = b"prefpipe.eval.keys"  # Parquet metadata: cache key and scorer version per (model, scorer)
COLUMNS = ("model", "prompt_id", "candidate", "seed", "scorer", "score")


def _weights_identity(weights: str | None) -> str | None:
    if weights is None:
        return None
    p = Path(weights).expanduser()
    return str(p.resolve()) if p.exists() else str(weights)


def _read_cache(path: Path, keys: dict[tuple[str, str], str]) -> tuple[dict[tuple[str, str], dict], list]:
    """The (model, scorer) groups of `path` whose key is still `keys[(model, scorer)]`, and their rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not path.exists():
        return {}, []
    old = pq.read_table(path)
    meta = json.loads((old.schema.metadata or {}).get(SCORES_META, b"{}"))
    cached = {}
    for label, info in meta.items():
        m, s = label.split("\t")
        if keys.get((m, s)) == info.get("key"):
            cached[(m, s)] = info
    if not cached:
        return {}, []
    labels = pc.binary_join_element_wise(old.column("model"), old.column("scorer"), "\t")
    return cached, [old.filter(pc.is_in(labels, value_set=pa.array(["\t".join(k) for k in cached])))]


def score_candidates(
    folders: dict[str, Path], scorers: list[str], weights: dict[str, str], path: Path, *,
    device: str = "auto", dtype: str = "auto", batch_size: int = 32, progress: bool = True,
) -> tuple[dict[str, dict], dict[str, int]]:
    """Score every image of every candidates folder with every scorer into the long table `path`.

    (model, scorer) groups already in `path` with the same key (candidates files, scorer, weights) are
    kept; the rest are scored, each image decoded once and shared by the scorers it still needs.
    Returns ({scorer: {"version", "higher_is_better", "weights"}}, counters).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from labelers.registry import scorer_class
    from prefpipe.core.background import prefetch
    from prefpipe.core.files import atomic_output
    from prefpipe.core.identity import input_fingerprint
    from prefpipe.core.progress import progress as progress_of
    from prefpipe.core.tables import count_rows, iter_batches
    from prefpipe.stages.scoring import decode_rows, load_scorers, preparing_workers, score_decoded

    keys = {
        (m, s): input_fingerprint(folder) + "/" + json.dumps([s, _weights_identity(weights.get(s))])
        for m, folder in folders.items() for s in scorers
    }
    cached, kept_tables = _read_cache(path, keys)
    todo = {m: [s for s in scorers if (m, s) not in cached] for m in folders}
    needed = [s for s in scorers if any(s in need for need in todo.values())]
    built = {}  # a fully cached run builds no scorer
    if needed:
        built = dict(zip(needed, load_scorers(needed, weights, batch_size=batch_size, device=device, dtype=dtype)))
    counters = {"images_scored": 0, "bad_images": 0, "nonfinite_scores": 0, "size_mismatch": 0, "images_converted": 0}
    total = sum(count_rows(folders[m]) for m, need in todo.items() if need)
    bar = progress_of(total=total, unit="img", desc="score", enabled=progress and total > 0)
    columns: dict[str, list] = {k: [] for k in COLUMNS}
    versions: dict[tuple[str, str], str] = {}
    for model, need in todo.items():
        if not need:
            continue
        for s in need:
            versions[(model, s)] = str(getattr(built[s], "version", ""))
        def decoded(batch):  # in worker threads, batches ahead of the scorers
            rows = batch.to_pylist()
            return rows, decode_rows([[r["image"] for r in rows]], [r["prompt"] for r in rows],
                                     sizes=[(r["width"], r["height"]) for r in rows])

        batches = iter_batches(folders[model], columns=["prompt_id", "prompt", "candidate", "seed", "image", "width",
                                                        "height"], batch_size=batch_size)
        for rows, ready in prefetch(batches, decoded, workers=preparing_workers([built[s] for s in need])):
            scored = score_decoded([built[s] for s in need], ready)
            for i, reason, why in scored.bad:  # a bad image, a wrong size, a non-finite score: counted, keyed, skipped
                counters[{"nonfinite_score": "nonfinite_scores", "size_mismatch": "size_mismatch"}.get(reason, "bad_images")] += 1
                r = rows[i]
                click.echo(f"eval: {model} {r['prompt_id']}/{r['candidate']}: skipped ({why})", err=True)
            counters["images_converted"] += len(scored.converted)
            good = [rows[i] for i in scored.kept]
            for s in need:
                for r, v in zip(good, scored.column(built[s].name).tolist()):
                    for key, value in zip(COLUMNS, (model, r["prompt_id"], r["candidate"], r["seed"], s, v)):
                        columns[key].append(value)
            counters["images_scored"] += len(good)
            bar.update(len(rows))
    bar.close()

    schema = pa.schema([
        ("model", pa.string()), ("prompt_id", pa.string()), ("candidate", pa.int32()), ("seed", pa.int64()),
        ("scorer", pa.string()), ("score", pa.float32()),
    ])
    new = pa.table(columns, schema=schema)
    table = pa.concat_tables([t.cast(schema) for t in kept_tables] + [new]) if kept_tables else new
    meta = {f"{m}\t{s}": {"key": keys[(m, s)], "version": cached.get((m, s), {}).get("version", versions.get((m, s), ""))}
            for m in folders for s in scorers}
    table = table.replace_schema_metadata({SCORES_META: json.dumps(meta).encode()})
    if new.num_rows or not path.exists() or set(keys) != set(cached):
        with atomic_output(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
    info = {}
    for s in scorers:
        version = next((meta[f"{m}\t{s}"]["version"] for m in folders if meta[f"{m}\t{s}"]["version"]), "")
        hib = getattr(built[s], "higher_is_better", None) if s in built else None
        if hib is None:
            hib = getattr(scorer_class(s), "higher_is_better", True)
        info[s] = {"version": version, "higher_is_better": bool(hib), "weights": weights.get(s)}
    return info, counters
