"""`prefpipe show PAIRS --out gallery.html`: look at a random sample of a pairs dataset.

Each pair shows its caption, both images with the winner framed (a tie frames both in yellow), both
scores, the margin, the source (human or AI) and the scorer. Where a row carries a human and an AI
preference, the card says whether they agree: `label_0` is the human label when `source` is `human`,
and the AI label is the optional `ai_label_0` column (a relabel table), else the sign of
`score_0 - score_1` of a human row that carries AI scores.

Sampling is lazy: row counts come from the Parquet footers, `--sample` row indices are drawn uniformly
without replacement (deterministic in `--seed`), and only the row groups holding a drawn row are read,
one at a time, so a 300 GB dataset costs a few row groups, not its size.

The page is `templates/pairs.html` (autoescaped; images embedded as data URIs): it opens from disk, offline.
"""

from __future__ import annotations

from pathlib import Path

import click

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import write_atomic
from prefpipe.core.images import BadImage
from prefpipe.stages.eval.pages import fmt, image_data_uri, render

OPTIONAL = ("label_1", "source", "scorer", "score_0", "score_1", "margin", "ai_label_0", "prompt_id",
            "model_0", "model_1", "image_0_uid", "image_1_uid")


def sample_locations(counts: list[tuple[int, int, int]], n: int, seed: int) -> list[tuple[int, int, list[int]]]:
    """Draw `n` distinct rows uniformly from row groups [(file index, row group, rows)].

    Returns [(file index, row group, sorted rows within it)] in dataset order.
    """
    import numpy as np

    sizes = np.array([c[2] for c in counts], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0 or n <= 0:
        return []
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    group = np.searchsorted(starts, picks, side="right") - 1
    out: dict[int, list[int]] = {}
    for g, p in zip(group.tolist(), picks.tolist()):
        out.setdefault(g, []).append(p - int(starts[g]))
    return [(counts[g][0], counts[g][1], rows) for g, rows in sorted(out.items())]


def sample_pairs(source: str | Path, n: int, seed: int = 0) -> tuple[list[dict], int, int]:
    """(sampled rows as dicts, total rows, files) of a pairs dataset, reading only the row groups sampled."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefpipe.core.tables import parquet_files

    files = parquet_files(source)
    counts, columns = [], []
    for i, f in enumerate(files):
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        for col in ("caption", "jpg_0", "jpg_1", "label_0"):
            if col not in names:
                raise PrefpipeError(f"{f}: column '{col}' is missing; a pairs dataset has caption, jpg_0, jpg_1, label_0")
        for col in ("jpg_0", "jpg_1"):
            t = pf.schema_arrow.field(col).type
            if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
                raise PrefpipeError(f"{f}: column '{col}' has type {t}, expected image bytes (binary)")
        columns.append(["caption", "jpg_0", "jpg_1", "label_0"] + [c for c in OPTIONAL if c in names])
        counts += [(i, g, pf.metadata.row_group(g).num_rows) for g in range(pf.metadata.num_row_groups)]
    rows = []
    for fi, g, picks in sample_locations(counts, n, seed):
        table = pq.ParquetFile(files[fi]).read_row_group(g, columns=columns[fi])
        for r, row in zip(picks, table.take(picks).to_pylist()):
            row["_where"] = f"{files[fi].name} row group {g} row {r}"
            rows.append(row)
    return rows, sum(c[2] for c in counts), len(files)


def preference(label_0) -> str | None:
    """'0' (image 0 preferred), '1', 'tie', or None when unknown."""
    if label_0 is None:
        return None
    x = float(label_0)
    return "tie" if x == 0.5 else "0" if x > 0.5 else "1"


def ai_preference(row: dict) -> str | None:
    """The AI's preference of a row that also has a human one, else None."""
    if row.get("ai_label_0") is not None:
        return preference(row["ai_label_0"])
    if row.get("source") == "human" and row.get("score_0") is not None and row.get("score_1") is not None:
        s0, s1 = float(row["score_0"]), float(row["score_1"])
        return "tie" if s0 == s1 else "0" if s0 > s1 else "1"
    return None


def agreement(row: dict) -> str | None:
    """'agree', 'disagree', 'tie' (exactly one side calls a tie) or None when the row has no human+AI pair."""
    ai = ai_preference(row)
    human = preference(row["label_0"]) if row.get("source") in ("human", None) else None
    if ai is None or human is None:
        return None
    if ai == human:
        return "agree"
    return "tie" if "tie" in (ai, human) else "disagree"


def _card(row: dict, thumb: int) -> tuple[dict, bool]:
    """What templates/pairs.html shows of one pair, and whether one of its images does not decode."""
    pref = preference(row["label_0"])
    bad = False
    figures = []
    for k in (0, 1):
        figure = {"k": k, "cls": "winner" if pref == str(k) else "tie" if pref == "tie" else "",
                  "uri": None, "size": None, "small": False, "winner": pref == str(k),
                  "label": row.get(f"label_{k}"), "score": row.get(f"score_{k}"), "model": row.get(f"model_{k}")}
        try:
            figure["uri"], figure["size"] = image_data_uri(row[f"jpg_{k}"], thumb)
            figure["small"] = max(figure["size"]) < 256
        except BadImage:
            bad = True
        figures.append(figure)
    source = row.get("source") or "unknown"
    badges = [{"cls": source, "text": source}]
    if row.get("scorer"):
        badges.append({"cls": "", "text": f"scorer {row['scorer']}"})
    if row.get("margin") is not None:
        badges.append({"cls": "", "text": f"margin {fmt(row['margin'])}"})
    if pref == "tie":
        badges.append({"cls": "", "text": "tie"})
    agree = agreement(row)
    if agree is not None:
        text = {"agree": "AI agrees with human", "disagree": "AI disagrees with human",
                "tie": "one of AI and human calls a tie"}[agree]
        badges.append({"cls": "agree" if agree == "agree" else "disagree", "text": text})
    return {"caption": row["caption"], "badges": badges, "where": row["_where"], "figures": figures}, bad


def write_gallery(source: str | Path, out: str | Path, sample: int = 50, seed: int = 0, thumb: int = 512) -> dict:
    """Sample pairs and write the gallery page; returns counters (sampled, total, bad images, agreement)."""
    rows, total, n_files = sample_pairs(source, sample, seed)
    cards, bad = [], 0
    for row in rows:
        card, was_bad = _card(row, thumb)
        cards.append(card)
        bad += was_bad
    sources: dict[str, int] = {}
    for r in rows:
        sources[r.get("source") or "unknown"] = sources.get(r.get("source") or "unknown", 0) + 1
    verdicts = [a for a in (agreement(r) for r in rows) if a is not None]
    counters = {
        "sampled": len(rows), "total": total, "files": n_files, "bad_rows": bad, "sources": sources,
        "compared": len(verdicts), "agree": verdicts.count("agree"), "disagree": verdicts.count("disagree"),
        "one_tie": verdicts.count("tie"),
    }
    summary = (f"{len(rows)} of {total:,} pairs sampled from {n_files} file(s) of {source} (seed {seed}); "
               + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    if verdicts:
        summary += (f"; AI vs human: {counters['agree']} agree, {counters['disagree']} disagree, "
                    f"{counters['one_tie']} with one tie, of {len(verdicts)}")
    if bad:
        summary += f"; {bad} pair(s) with an undecodable image"
    write_atomic(out, render("pairs.html", title=f"pairs: {source}", summary=summary, cards=cards))
    counters["summary"] = summary
    return counters


@click.command("show")
@click.argument("pairs", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="HTML file to write (self-contained; opens from disk).")
@click.option("--sample", type=click.IntRange(min=1), default=50, show_default=True, help="Pairs to show, drawn at random.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--thumb", type=click.IntRange(min=32), default=512, show_default=True, help="Largest image side shown (larger images are shrunk).")
def show(pairs, out, sample, seed, thumb):
    """A gallery of a sample of PAIRS (a pairs dataset): winner, scores, margin, source, AI-human agreement."""
    counters = write_gallery(pairs, out, sample=sample, seed=seed, thumb=thumb)
    click.echo(f"show: {counters['summary']} -> {out}", err=True)
