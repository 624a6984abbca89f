"""`prefpipe feedback`: per-image feedback (desirable / undesirable) for Diffusion-KTO, from any source.

    pairs/ai, pairs/human ──feedback --from pairs──┐
    scores (+ candidates) ──feedback --from scores──┼──▶ feedback (FEEDBACK table: keys + label, no images)
    thumbs up/down table ──feedback --from thumbs───┘

One row per labelled image (`prefpipe/core/schema.py`, ``FEEDBACK``); the images are not copied: a row's
keys say where its image lives (a candidates dataset at ``(prompt_id, candidate)``, a pairs dataset at
``(pairs_file, pairs_row, side)``). Images left unlabelled have no row. The derivations (pure functions of
one table, tested on their edges):

- **pairs**: the winner desirable, the loser undesirable. A tie (``label_0 = 0.5``) labels neither image
  unless ``--ties desirable`` or ``--ties undesirable`` (both images of the tie that way). An image in
  several pairs gets a row per pair (the pairs' per-image view: the same view ``--objective kto`` trains on).
- **scores**: per prompt, within one scorer (``--by`` when the scores hold several):
  - fractions (``--desirable-top 0.25 --undesirable-bottom 0.25``): of a prompt's ``n`` images the top
    ``floor(n x top)`` are desirable and the bottom ``floor(n x bottom)`` undesirable, rounding *down* (a
    fraction that rounds to 0 labels none of that prompt: a one-image prompt gets no label unless a fraction
    is 1); a cut that falls between equal scores leaves the whole tied group out (never more than asked,
    never one of two equal images). ``top + bottom <= 1``.
  - absolute thresholds (``--desirable-above X --undesirable-below Y``, ``Y < X``): desirable when
    ``score >= X``, undesirable when ``score <= Y`` (a score equal to a threshold counts).
- **thumbs**: human thumbs up / down, a table with the columns ``prompt_id`` (string), ``candidate`` (integer)
  and ``thumbs`` (integer: ``1`` up, ``-1`` down, ``0`` or null no vote), optionally ``caption``; several rows
  for one image (several people) are summed: net > 0 desirable, net < 0 undesirable, 0 neither.

Units: one output shard per input file (resumable, sharded by rank, as every stage).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import click
import polars as pl
import pyarrow as pa

from prefpipe.core.dataset import ShardedDataset, barrier, is_main_process, rank_world
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.identity import input_fingerprint
from prefpipe.core.options import finite_float
from prefpipe.core.schema import FEEDBACK, check_columns, conform
from prefpipe.core.tables import parquet_file, parquet_files

Counts = dict[str, int]


def _count(counts: Counts, key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + int(n)


# ------------------------------------------------------------------------------------------------------
# The derivations: one input table -> FEEDBACK rows (polars), with their counters
# ------------------------------------------------------------------------------------------------------


def feedback_from_pairs(pairs: pl.DataFrame, file_name: str, ties: Literal["skip", "desirable", "undesirable"] = "skip",
                        counts: Counts | None = None) -> pl.DataFrame:
    """Winner desirable, loser undesirable; ties as `ties` says. `pairs` needs ``label_0``; ``caption``,
    ``prompt_id``, ``image_0_uid``, ``image_1_uid`` are carried when present."""
    counts = counts if counts is not None else {}
    df = pairs.with_row_index("pairs_row")
    label = pl.col("label_0").cast(pl.Float64)
    valid = label.is_in([0.0, 0.5, 1.0])
    _count(counts, "pairs", df.height)
    _count(counts, "bad_label", df.filter(~valid.fill_null(False)).height)
    _count(counts, "ties_skipped" if ties == "skip" else "ties_labelled", df.filter(label == 0.5).height)
    df = df.filter(valid.fill_null(False))
    if ties == "skip":
        df = df.filter(label != 0.5)
    tie_label = ties == "desirable"
    sides = []
    for side in (0, 1):
        won = (label == 1.0) if side == 0 else (label == 0.0)
        desirable = pl.when(label == 0.5).then(pl.lit(tie_label)).otherwise(won)
        sides.append(df.select(
            _col_or_null(df, "prompt_id", pl.String), _col_or_null(df, "caption", pl.String),
            pl.lit(None, pl.Int32).alias("candidate"),
            _col_or_null(df, f"image_{side}_uid", pl.String).alias("image_uid"),
            pl.lit(file_name).alias("pairs_file"), pl.col("pairs_row").cast(pl.Int64),
            pl.lit(side, pl.Int8).alias("side"), desirable.alias("desirable"),
            pl.lit("pairs").alias("source"), pl.lit(None, pl.Float32).alias("score"),
        ))
    out = pl.concat(sides).sort("pairs_row", "side")
    _count(counts, "desirable", out.filter(pl.col("desirable")).height)
    _count(counts, "undesirable", out.filter(~pl.col("desirable")).height)
    return out


def _col_or_null(df: pl.DataFrame, name: str, dtype) -> pl.Expr:
    return pl.col(name).cast(dtype) if name in df.columns else pl.lit(None, dtype).alias(name)


@dataclass(frozen=True)
class ScoreCuts:
    """How scores become labels: fractions per prompt, or absolute thresholds (one of the two)."""

    desirable_top: float | None = None
    undesirable_bottom: float | None = None
    desirable_above: float | None = None
    undesirable_below: float | None = None

    def check(self) -> None:
        fractions = (self.desirable_top, self.undesirable_bottom)
        thresholds = (self.desirable_above, self.undesirable_below)
        if any(v is not None for v in fractions) and any(v is not None for v in thresholds):
            raise PrefpipeError("--desirable-top/--undesirable-bottom (fractions per prompt) and --desirable-above/"
                                "--undesirable-below (absolute thresholds) exclude each other: give one kind")
        if all(v is None for v in fractions + thresholds):
            raise PrefpipeError("--from scores needs --desirable-top and/or --undesirable-bottom (fractions per prompt), "
                                "or --desirable-above and/or --undesirable-below (thresholds)")
        for name, v in (("--desirable-top", self.desirable_top), ("--undesirable-bottom", self.undesirable_bottom)):
            if v is not None and not 0 <= v <= 1:
                raise PrefpipeError(f"{name} {v}: a fraction of each prompt's images, in [0, 1]")
        if (self.desirable_top or 0) + (self.undesirable_bottom or 0) > 1:
            raise PrefpipeError(f"--desirable-top {self.desirable_top} + --undesirable-bottom {self.undesirable_bottom} "
                                "> 1: an image would be both")
        if None not in thresholds and self.undesirable_below >= self.desirable_above:
            raise PrefpipeError(f"--undesirable-below {self.undesirable_below} must be below --desirable-above "
                                f"{self.desirable_above}")


def feedback_from_scores(scores: pl.DataFrame, cuts: ScoreCuts, scorer: str | None = None,
                         counts: Counts | None = None) -> pl.DataFrame:
    """Per-image labels from a scores table (``prompt_id``, ``candidate``, ``scorer``, ``score``), see the
    module docstring for the rules. ``scorer``: which scorer's scores (needed when there are several)."""
    counts = counts if counts is not None else {}
    cuts.check()
    names = scores["scorer"].unique().sort().to_list()
    if scorer is None:
        if len(names) > 1:
            raise PrefpipeError(f"the scores hold several scorers ({', '.join(names)}): choose one with --by")
        scorer = names[0] if names else None
    elif scorer not in names and scores.height:
        raise PrefpipeError(f"--by {scorer}: the scores hold {', '.join(names)}")
    df = scores.filter(pl.col("scorer") == scorer).select("prompt_id", "candidate", pl.col("score").cast(pl.Float64))
    nonfinite = ~pl.col("score").is_finite()
    _count(counts, "nonfinite_scores", df.filter(nonfinite).height)
    df = df.filter(~nonfinite)
    if cuts.desirable_above is not None or cuts.undesirable_below is not None:
        above = math.inf if cuts.desirable_above is None else cuts.desirable_above
        below = -math.inf if cuts.undesirable_below is None else cuts.undesirable_below
        labelled = df.with_columns(
            pl.when(pl.col("score") >= above).then(True).when(pl.col("score") <= below).then(False)
            .otherwise(None).alias("desirable"))
    else:
        top, bottom = cuts.desirable_top or 0.0, cuts.undesirable_bottom or 0.0
        n = pl.len().over("prompt_id")
        # floor(n x fraction), with a hair of slack so that 0.3 x 10 is 3 in binary floating point too
        k_top = (n.cast(pl.Float64) * top + 1e-9).floor().cast(pl.Int64)
        k_bottom = (n.cast(pl.Float64) * bottom + 1e-9).floor().cast(pl.Int64)
        # ranks among the prompt's images: how many score strictly higher / strictly lower
        higher = pl.col("score").rank("min", descending=True).over("prompt_id") - 1
        lower = pl.col("score").rank("min").over("prompt_id") - 1
        ties_with = pl.len().over("prompt_id", "score")
        # desirable: all of its tied group fits in the top k (higher + group size <= k); undesirable likewise
        desirable = (higher + ties_with) <= k_top
        undesirable = (lower + ties_with) <= k_bottom
        labelled = df.with_columns(
            pl.when(desirable).then(True).when(undesirable).then(False).otherwise(None).alias("desirable"))
        per_prompt = df.group_by("prompt_id").agg(pl.len().alias("n"))
        _count(counts, "single_image_prompts", per_prompt.filter(pl.col("n") == 1).height)
        rounds_to_zero = ((top > 0) & ((pl.col("n") * top + 1e-9).floor() == 0)) | (
            (bottom > 0) & ((pl.col("n") * bottom + 1e-9).floor() == 0))
        _count(counts, "fraction_rounds_to_zero_prompts", per_prompt.filter(rounds_to_zero).height)
    _count(counts, "prompts", df["prompt_id"].n_unique())
    _count(counts, "images", df.height)
    out = labelled.filter(pl.col("desirable").is_not_null())
    _count(counts, "unlabelled", df.height - out.height)
    _count(counts, "desirable", out.filter(pl.col("desirable")).height)
    _count(counts, "undesirable", out.filter(~pl.col("desirable")).height)
    return out.sort("prompt_id", "candidate").select(
        "prompt_id", pl.lit(None, pl.String).alias("caption"), pl.col("candidate").cast(pl.Int32),
        pl.lit(None, pl.String).alias("image_uid"), pl.lit(None, pl.String).alias("pairs_file"),
        pl.lit(None, pl.Int64).alias("pairs_row"), pl.lit(None, pl.Int8).alias("side"), "desirable",
        pl.lit("scores").alias("source"), pl.col("score").cast(pl.Float32))


THUMBS_COLUMNS = {"prompt_id": (pa.string(), pa.large_string()),
                  "candidate": (pa.int8(), pa.int16(), pa.int32(), pa.int64()),
                  "thumbs": (pa.int8(), pa.int16(), pa.int32(), pa.int64())}


def feedback_from_thumbs(thumbs: pl.DataFrame, where: str = "thumbs", counts: Counts | None = None) -> pl.DataFrame:
    """Per-image labels from thumbs up (1) / down (-1) votes, summed per ``(prompt_id, candidate)``.
    A value other than 1, -1, 0 or null is a PrefpipeError naming `where` and the row."""
    counts = counts if counts is not None else {}
    bad = thumbs.with_row_index("row").filter(pl.col("thumbs").is_not_null() & ~pl.col("thumbs").is_in([-1, 0, 1]))
    if bad.height:
        row = bad.row(0, named=True)
        raise PrefpipeError(f"{where}: row {row['row']}: thumbs = {row['thumbs']}; the column holds 1 (up), -1 (down), "
                            f"0 or null (no vote)")
    caption = pl.col("caption").drop_nulls().first() if "caption" in thumbs.columns else pl.lit(None, pl.String)
    net = thumbs.group_by("prompt_id", "candidate").agg(
        pl.col("thumbs").fill_null(0).sum().alias("net"), caption.alias("caption"),
        (pl.col("thumbs").fill_null(0) != 0).sum().alias("votes"))
    _count(counts, "votes", int(net["votes"].sum() or 0))
    _count(counts, "images", net.height)
    out = net.filter(pl.col("net") != 0)
    _count(counts, "unlabelled", net.height - out.height)
    _count(counts, "desirable", out.filter(pl.col("net") > 0).height)
    _count(counts, "undesirable", out.filter(pl.col("net") < 0).height)
    return out.sort("prompt_id", "candidate").select(
        pl.col("prompt_id").cast(pl.String), pl.col("caption").cast(pl.String), pl.col("candidate").cast(pl.Int32),
        pl.lit(None, pl.String).alias("image_uid"), pl.lit(None, pl.String).alias("pairs_file"),
        pl.lit(None, pl.Int64).alias("pairs_row"), pl.lit(None, pl.Int8).alias("side"),
        (pl.col("net") > 0).alias("desirable"), pl.lit("thumbs").alias("source"), pl.col("net").cast(pl.Float32).alias("score"))


# ------------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackOptions:
    source: Literal["pairs", "scores", "thumbs"] = "pairs"
    ties: Literal["skip", "desirable", "undesirable"] = "skip"
    by: str | None = None
    desirable_top: float | None = None
    undesirable_bottom: float | None = None
    desirable_above: float | None = None
    undesirable_below: float | None = None

    def cuts(self) -> ScoreCuts:
        return ScoreCuts(self.desirable_top, self.undesirable_bottom, self.desirable_above, self.undesirable_below)


def build_feedback(inputs: str | Path, out: str | Path, opts: FeedbackOptions) -> ShardedDataset:
    """The FEEDBACK dataset of `inputs` (a pairs, scores or thumbs dataset: folder, file or glob), one shard
    per input file."""
    if opts.source == "scores":
        opts.cuts().check()  # before reading anything
    files = parquet_files(inputs)
    for f in files:
        names = parquet_file(f).schema_arrow
        required = {"pairs": {"label_0": None}, "scores": {"prompt_id": None, "candidate": None, "scorer": None,
                                                           "score": None}, "thumbs": THUMBS_COLUMNS}[opts.source]
        missing = [c for c in required if c not in names.names]
        if missing:
            raise PrefpipeError(f"{f}: --from {opts.source} needs the column(s) {', '.join(missing)}; "
                                f"columns present: {', '.join(names.names)}")
        if opts.source == "thumbs":
            check_columns(names, THUMBS_COLUMNS, f"{f} (a thumbs table)")
    rank, world = rank_world()
    ds = ShardedDataset(out, "feedback", asdict(opts), input_fingerprint(inputs), len(files), FEEDBACK).open()
    for unit in ds.claim_each(ds.pending(rank, world)):
        counts: Counts = {}
        f = files[unit]
        if opts.source == "pairs":
            cols = [c for c in ("label_0", "caption", "prompt_id", "image_0_uid", "image_1_uid")
                    if c in parquet_file(f).schema_arrow.names]
            rows = feedback_from_pairs(pl.read_parquet(f, columns=cols), f.name, opts.ties, counts)
        elif opts.source == "scores":
            rows = feedback_from_scores(pl.read_parquet(f), opts.cuts(), opts.by, counts)
        else:
            rows = feedback_from_thumbs(pl.read_parquet(f), str(f), counts)
        with ds.write_unit(unit) as writer:
            if rows.height:
                writer.write(conform(rows.to_arrow(), FEEDBACK))
            for k, v in counts.items():
                writer.count(k, v)
    barrier()
    return ds


@click.command("feedback")
@click.option("--from", "source", type=click.Choice(["pairs", "scores", "thumbs"]), required=True,
              help="What the labels come from: a pairs dataset, a scores dataset, or a thumbs up/down table.")
@click.option("--in", "inputs", required=True, type=click.Path(),
              help="The input dataset (folder, Parquet file or glob): pairs/ai, scores, or the thumbs table.")
@click.option("--out", required=True, type=click.Path(), help="Output feedback dataset folder.")
@click.option("--ties", type=click.Choice(["skip", "desirable", "undesirable"]), default="skip", show_default=True,
              help="pairs: a tie labels neither image (skip), or both.")
@click.option("--by", default=None, help="scores: the scorer whose scores decide (needed when several).")
@click.option("--desirable-top", type=finite_float(0.0), default=None,
              help="scores: the top fraction of each prompt's images is desirable (rounded down).")
@click.option("--undesirable-bottom", type=finite_float(0.0), default=None,
              help="scores: the bottom fraction of each prompt's images is undesirable (rounded down).")
@click.option("--desirable-above", type=finite_float(), default=None,
              help="scores: an image scoring >= this is desirable (instead of fractions).")
@click.option("--undesirable-below", type=finite_float(), default=None,
              help="scores: an image scoring <= this is undesirable (instead of fractions).")
def feedback_command(source, inputs, out, **options):
    """Per-image feedback (desirable / undesirable) for Diffusion-KTO, without copying images."""
    ds = build_feedback(inputs, out, FeedbackOptions(source=source, **options))
    if not is_main_process():
        return
    st = ds.stats()
    click.echo(f"feedback: {st.get('desirable', 0)} desirable and {st.get('undesirable', 0)} undesirable images "
               f"from {source} ({st.get('unlabelled', 0) + st.get('ties_skipped', 0) * 2} left unlabelled) -> {ds.folder}",
               err=True)
