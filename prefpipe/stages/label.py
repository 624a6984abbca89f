"""The label stage: AI feedback. Score candidates, then build preference pairs.

    candidates ──score (every scorer, each image decoded once)──▶ WORKDIR/scores ──pair──▶ WORKDIR/pairs/ai
    human pairs ──score jpg_0 / jpg_1──▶ WORKDIR/relabel (AI labels beside human ones) + agreement report

Units: one scores shard per candidates file, one pairs shard per scores shard (a prompt's candidates
live in one candidates shard, as `prefpipe generate` writes them). Both datasets follow the stage
contract: resumable, sharded by rank, bad images counted, logged with their key, and skipped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np
import polars as pl
import pyarrow as pa

from labelers.registry import parse_weights
from prefpipe.core.background import prefetch
from prefpipe.core.dataset import ShardedDataset, barrier, is_main_process, rank_world
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import write_atomic
from prefpipe.core.identity import fingerprint, input_fingerprint
from prefpipe.core.options import finite_float
from prefpipe.core.progress import progress
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import PAIRS, SCORES, check_columns, conform
from prefpipe.core.stats import best_tie_threshold, stable_halves, tie_aware_points, wilson_interval
from prefpipe.core.tables import parquet_file, parquet_files
from prefpipe.stages.pairs import PairCounts, PairOptions, build_pairs
from prefpipe.stages.scoring import decode_rows, load_scorers, preparing_workers, score_decoded

log = logging.getLogger("prefpipe.label")


# score_rows' reasons -> the counters label and relabel keep
SCORE_DROPS = {"bad_image": "bad_images", "size_mismatch": "size_mismatch", "nonfinite_score": "nonfinite_scores",
               "empty_caption": "empty_captions"}


def _progress(total: int, desc: str, enabled: bool):
    return progress(total=total, unit="img", desc=desc, enabled=enabled)


# -- scores -----------------------------------------------------------------------------------------
def score_candidates(
    candidates: str | Path,
    out: str | Path,
    scorer_names: list[str],
    weights: dict[str, str],
    *,
    batch_size: int = 32,
    device: str = "auto",
    dtype: str | None = None,
    progress: bool = True,
    scorers=None,
) -> ShardedDataset:
    """Score every candidate image with every scorer into a long scores dataset at `out`.

    Each process scores its share of the candidates files; the function returns when every share is done.
    """
    files = parquet_files(candidates)
    check_columns(parquet_file(files[0]).schema_arrow, {"prompt_id": pa.string(), "candidate": pa.int32(),
                                              "prompt": pa.string(), "image": pa.binary()}, str(files[0]))
    rank, world = rank_world()
    ds = ShardedDataset(
        out, "score", {"scorers": scorer_names, "weights": weights}, input_fingerprint(candidates), len(files), SCORES,
        runtime={"batch_size": batch_size, "device": device, "world": world},
    ).open()
    todo = ds.pending(rank, world)
    if not todo:
        barrier()
        return ds
    scorers = scorers or load_scorers(scorer_names, weights, batch_size=batch_size, device=device, dtype=dtype)
    total = sum(parquet_file(files[u]).metadata.num_rows for u in todo)
    bar = _progress(total, "score", progress)
    for unit in ds.claim_each(todo):
        with ds.write_unit(unit) as writer:
            pf = parquet_file(files[unit])
            sized = {"width", "height"} <= set(pf.schema_arrow.names)
            columns = ["prompt_id", "candidate", "prompt", "image"] + (["width", "height"] if sized else [])
            def decoded(batch, sized=sized):  # in worker threads, batches ahead of the scorers
                rows = batch.to_pydict()
                return rows, decode_rows([rows["image"]], rows["prompt"],
                                         sizes=list(zip(rows["width"], rows["height"])) if sized else None)

            for rows, ready in prefetch(pf.iter_batches(batch_size=max(batch_size, 64), columns=columns), decoded,
                                           workers=preparing_workers(scorers)):
                scored = score_decoded(scorers, ready)
                for i, reason, why in scored.bad:
                    writer.count(SCORE_DROPS[reason])
                    log.warning("score: %s/%s in %s skipped: %s", rows["prompt_id"][i], rows["candidate"][i],
                                files[unit].name, why)
                for i, note in scored.converted:
                    writer.count("images_converted")
                    log.info("score: %s/%s in %s: %s", rows["prompt_id"][i], rows["candidate"][i], files[unit].name, note)
                keep = scored.kept
                for scorer in scorers:
                    writer.write(pa.table({
                        "prompt_id": [rows["prompt_id"][i] for i in keep],
                        "candidate": pa.array([rows["candidate"][i] for i in keep], pa.int32()),
                        "scorer": [scorer.name] * len(keep),
                        "score": pa.array(scored.column(scorer.name), pa.float32()),
                    }, schema=SCORES))
                writer.count("images", len(keep))
                bar.update(len(rows["image"]))
    bar.close()
    barrier()  # every process's shards are there: the scores are complete wherever this returns
    return ds


# -- pairs ------------------------------------------------------------------------------------------
def build_pair_dataset(
    scores: str | Path,
    candidates: str | Path,
    out: str | Path,
    opts: PairOptions,
) -> ShardedDataset:
    """AI preference pairs (PAIRS schema, source=ai) from a scores dataset and its candidates."""
    score_files = parquet_files(scores)
    cand_files = parquet_files(candidates)
    if len(score_files) != len(cand_files):
        raise PrefpipeError(
            f"{scores} has {len(score_files)} shards but {candidates} has {len(cand_files)}: "
            "the scores were made from other candidates; re-run the score step"
        )
    rank, world = rank_world()
    ds = ShardedDataset(
        out, "pair", asdict(opts), fingerprint(input_fingerprint(scores), input_fingerprint(candidates)),
        len(score_files), PAIRS,
    ).open()
    for unit in ds.claim_each(ds.pending(rank, world)):
        counts = PairCounts()
        pairs = build_pairs(pl.read_parquet(score_files[unit]), opts, counts)
        with ds.write_unit(unit) as writer:
            if pairs.height:
                writer.write(_pairs_table(pairs, cand_files[unit]))
            for k, v in counts.as_dict().items():
                writer.count(k, v)
    barrier()  # the pairs are complete wherever this returns
    return ds


def _pairs_table(pairs: pl.DataFrame, cand_file: Path) -> pa.Table:
    wanted = pl.concat([
        pairs.select(pl.col("prompt_id"), pl.col("candidate_0").alias("candidate")),
        pairs.select(pl.col("prompt_id"), pl.col("candidate_1").alias("candidate")),
    ]).unique()
    cands = (
        pl.read_parquet(cand_file, columns=["prompt_id", "candidate", "prompt", "image", "model"])
        .join(wanted, on=["prompt_id", "candidate"], how="semi")
    )
    c0 = cands.rename({"candidate": "candidate_0", "image": "jpg_0", "model": "model_0", "prompt": "caption"})
    c1 = cands.select(pl.col("prompt_id"), pl.col("candidate").alias("candidate_1"), pl.col("image").alias("jpg_1"),
                      pl.col("model").alias("model_1"))
    df = (
        pairs.join(c0, on=["prompt_id", "candidate_0"], how="inner")
        .join(c1, on=["prompt_id", "candidate_1"], how="inner")
        .with_columns(
            image_0_uid=pl.col("prompt_id") + "-" + pl.col("candidate_0").cast(pl.String),
            image_1_uid=pl.col("prompt_id") + "-" + pl.col("candidate_1").cast(pl.String),
            source=pl.lit("ai"),
            has_label=pl.lit(True),
            are_different=pl.lit(True),
        )
        .with_columns(
            best_image_uid=pl.when(pl.col("label_0") == 1.0).then(pl.col("image_0_uid"))
            .when(pl.col("label_0") == 0.0).then(pl.col("image_1_uid")).otherwise(pl.lit(None)),
        )
        .drop(["candidate_0", "candidate_1"])
    )
    return conform(df.to_arrow(), PAIRS)


# -- relabel human pairs ----------------------------------------------------------------------------
def relabel_pairs(
    pairs: str | Path,
    out: str | Path,
    scorer_names: list[str],
    weights: dict[str, str],
    *,
    batch_size: int = 32,
    device: str = "auto",
    dtype: str | None = None,
    progress: bool = True,
    scorers=None,
) -> ShardedDataset:
    """Score both images of human pairs; write AI labels beside the human ones.

    Output rows: the pair's keys and human label, and per scorer `<name>_score_0`, `<name>_score_1`,
    `<name>_label_0` (1 / 0 / 0.5 on equal scores). Images are not copied. `scorers`: scorers already
    built, named as `scorer_names` in that order (default: built from the names and `weights`).
    """
    files = parquet_files(pairs)
    check_columns(parquet_file(files[0]).schema_arrow, {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(),
                                              "label_0": pa.float64()}, str(files[0]))
    rank, world = rank_world()
    fields = [pa.field("prompt_id", pa.string()), pa.field("caption", pa.string()),
              pa.field("image_0_uid", pa.string()), pa.field("image_1_uid", pa.string()),
              pa.field("label_0", pa.float64())]
    for n in scorer_names:
        fields += [pa.field(f"{n}_score_0", pa.float32()), pa.field(f"{n}_score_1", pa.float32()),
                   pa.field(f"{n}_label_0", pa.float64())]
    schema = pa.schema(fields)
    ds = ShardedDataset(out, "relabel", {"scorers": scorer_names, "weights": weights}, input_fingerprint(pairs),
                        len(files), schema, runtime={"batch_size": batch_size, "device": device}).open()
    todo = ds.pending(rank, world)
    if not todo:
        barrier()
        return ds
    if scorers is None:
        scorers = load_scorers(scorer_names, weights, batch_size=batch_size, device=device, dtype=dtype)
    elif [s.name for s in scorers] != list(scorer_names):
        raise PrefpipeError(f"scorers {[s.name for s in scorers]} do not match the names {list(scorer_names)}")
    bar = _progress(sum(parquet_file(files[u]).metadata.num_rows for u in todo), "relabel", progress)
    for unit in ds.claim_each(todo):
        pf = parquet_file(files[unit])
        cols = [c for c in ("caption", "jpg_0", "jpg_1", "label_0", "image_0_uid", "image_1_uid", "prompt_id")
                if c in pf.schema_arrow.names]
        with ds.write_unit(unit) as writer:
            def decoded(batch):  # in worker threads, batches ahead of the scorers
                rows = batch.to_pydict()
                return rows, decode_rows([rows["jpg_0"], rows["jpg_1"]], rows["caption"], keep_reason="empty_caption",
                                         keep=lambda j: None if (rows["caption"][j] or "").strip() else "empty caption")

            for rows, ready in prefetch(pf.iter_batches(batch_size=max(batch_size, 64), columns=cols), decoded,
                                           workers=preparing_workers(scorers)):
                n = len(rows["caption"])
                scored = score_decoded(scorers, ready)
                for i, reason, why in scored.bad:
                    writer.count("bad_rows")
                    writer.count(SCORE_DROPS[reason])
                    log.warning("relabel: bad row %s in %s skipped: %s", (rows.get("image_0_uid") or [None] * n)[i] or i,
                                files[unit].name, why)
                for _i, _note in scored.converted:
                    writer.count("images_converted")
                keep = scored.kept
                out_rows = {
                    "prompt_id": [(rows.get("prompt_id") or [None] * n)[i] or prompt_id(rows["caption"][i]) for i in keep],
                    "caption": [rows["caption"][i] for i in keep],
                    "image_0_uid": [(rows.get("image_0_uid") or [None] * n)[i] for i in keep],
                    "image_1_uid": [(rows.get("image_1_uid") or [None] * n)[i] for i in keep],
                    "label_0": [rows["label_0"][i] for i in keep],
                }
                for scorer in scorers:
                    s0, s1 = scored.column(scorer.name, 0), scored.column(scorer.name, 1)
                    out_rows[f"{scorer.name}_score_0"] = s0
                    out_rows[f"{scorer.name}_score_1"] = s1
                    out_rows[f"{scorer.name}_label_0"] = np.where(s0 > s1, 1.0, np.where(s0 < s1, 0.0, 0.5))
                writer.write(pa.table(out_rows, schema=schema))
                writer.count("pairs", len(keep))
                bar.update(n)
    bar.close()
    barrier()  # the relabelled table is complete wherever this returns
    return ds


def agreement_report(relabel: str | Path, scorer_names: list[str]) -> dict:
    """Per scorer, :func:`scorer_agreement` of the relabelled pairs' human labels and score differences.

    The table is read a batch at a time; only each pair's label, half and score differences are kept."""
    columns = ["image_0_uid", "image_1_uid", "caption", "label_0"] + [f"{n}_score_{i}" for n in scorer_names for i in (0, 1)]
    parts: dict[str, list[np.ndarray]] = {"split": [], "label_0": [], **{n: [] for n in scorer_names}}
    for f in parquet_files(relabel):
        for batch in parquet_file(f).iter_batches(batch_size=65_536, columns=columns):
            df = pl.from_arrow(batch)
            parts["split"].append(pair_halves(df["image_0_uid"].to_list(), df["image_1_uid"].to_list(),
                                              df["caption"].to_list()))
            parts["label_0"].append(df["label_0"].to_numpy().astype(float))
            for name in scorer_names:
                parts[name].append((df[f"{name}_score_0"] - df[f"{name}_score_1"]).to_numpy().astype(float))
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    human = cat["label_0"]
    report = {"pairs": len(human), "human_ties": int((human == 0.5).sum()), "scorers": {}}
    for name in scorer_names:
        report["scorers"][name] = scorer_agreement(human, cat[name], cat["split"])
    return report


def pair_halves(image_0_uids: list[str | None], image_1_uids: list[str | None], captions: list[str | None]) -> np.ndarray:
    """The half (0 or 1) of each pair in the agreement statistics: :func:`stable_halves` of its key,
    image_0_uid + image_1_uid + caption (missing parts as empty text)."""
    return stable_halves((a or "") + (b or "") + (c or "") for a, b, c in zip(image_0_uids, image_1_uids, captions))


def scorer_agreement(human: np.ndarray, diff: np.ndarray, split: np.ndarray) -> dict:
    """How well a scorer agrees with people: the relabel report's statistics, one dict.

    human: label_0 per judgment (1 / 0 / 0.5 tie); diff: the scorer's score_0 - score_1 on that pair; split:
    its half (:func:`pair_halves`). Accuracy against the human label on non-tie judgments (95% Wilson
    interval; equal scores count half), and the PickScore paper's tie-aware accuracy (tie threshold chosen on
    half 0, reported on half 1)."""
    human, diff, split = np.asarray(human, float), np.asarray(diff, float), np.asarray(split)
    decided = human != 0.5
    correct = float(np.sum(np.where(diff[decided] == 0, 0.5, (diff[decided] > 0) == (human[decided] > 0.5))))
    n = int(decided.sum())
    lo, hi = wilson_interval(correct, n)
    a, b = split == 0, split == 1
    threshold = best_tie_threshold(human[a], diff[a]) if a.any() else 0.0
    tie_acc = float(tie_aware_points(human[b], diff[b], threshold).mean()) if b.any() else float("nan")
    return {
        "accuracy_non_tie": correct / n if n else float("nan"),
        "accuracy_ci95": [lo, hi],
        "non_tie_pairs": n,
        "tie_aware_accuracy": tie_acc,
        "tie_threshold": threshold,
        "tie_threshold_split_pairs": int(a.sum()),
        "tie_aware_split_pairs": int(b.sum()),
    }


# -- CLI --------------------------------------------------------------------------------------------
@click.command()
@click.option("--scorer", "scorers", multiple=True, required=True,
              help="Scorer name (repeatable): pickscore, hpsv2, imagereward, hpsv3, clip, aesthetic, compressibility, incompressibility, or a plugin's (`prefpipe scorers` lists them).")
@click.option("--weights", multiple=True, help="NAME=PATH_OR_HUB_ID: weights of a scorer (default: its real hub checkpoint).")
@click.option("--candidates", type=click.Path(), default=None, help="Candidates dataset (from `prefpipe generate`).")
@click.option("--pairs", "human_pairs", type=click.Path(), default=None, help="Relabel these (human) pairs instead of candidates.")
@click.option("--out", "workdir", required=True, type=click.Path(), help="WORKDIR: writes WORKDIR/scores and WORKDIR/pairs/ai (or WORKDIR/relabel).")
@click.option("--strategy", type=click.Choice(["best-worst", "all", "random-k"]), default="best-worst", show_default=True, help="Which candidates of a prompt to pair.")
@click.option("--by", default=None, help="Pair by this scorer (needed when several scorers and no --ensemble).")
@click.option("--ensemble", type=click.Choice(["mean-rank", "unanimous"]), default=None, help="Pair by all scorers: mean of per-scorer ranks, or unanimous vote.")
@click.option("--min-margin", type=finite_float(0.0), default=0.0, show_default=True, help="Pairs closer than this (scorer units) are ties.")
@click.option("--ties", type=click.Choice(["drop", "keep"]), default="drop", show_default=True, help="Drop ties, or keep them labelled 0.5 (reference trainers read 0.5 as a win!).")
@click.option("--k", type=click.IntRange(min=1), default=2, show_default=True, help="Pairs per prompt for --strategy random-k.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random-k and of pair positions.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per scorer call.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True, help="auto: fp16 on GPU, fp32 on CPU.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def label(scorers, weights, candidates, human_pairs, workdir, strategy, by, ensemble, min_margin, ties, k, seed,
          batch_size, device, dtype, no_progress):
    """Score images with AI feedback and build preference pairs (or relabel human pairs)."""
    names = list(scorers)
    w = parse_weights(weights, names)
    workdir = Path(workdir)
    t0 = time.perf_counter()
    if (candidates is None) == (human_pairs is None):
        raise PrefpipeError("give either --candidates DIR (score and pair) or --pairs DIR (relabel human pairs)")
    if human_pairs is not None:
        ds = relabel_pairs(human_pairs, workdir / "relabel", names, w, batch_size=batch_size, device=device,
                           dtype=dtype, progress=not no_progress)
        if not is_main_process():  # the whole table is there: one process reports on it
            return
        report = agreement_report(ds.folder, names)
        ds.record(agreement=report)
        write_atomic(workdir / "relabel" / "agreement.json", json.dumps(report, indent=2))
        for name, r in report["scorers"].items():
            lo, hi = r["accuracy_ci95"]
            click.echo(f"label: {name} agrees with humans on {100 * r['accuracy_non_tie']:.1f}% of {r['non_tie_pairs']} "
                       f"non-tie pairs (95% CI {100 * lo:.1f}-{100 * hi:.1f}); tie-aware {100 * r['tie_aware_accuracy']:.1f}%",
                       err=True)
        return
    opts = PairOptions(strategy=strategy, by=by, ensemble=ensemble, min_margin=min_margin, ties=ties, k=k, seed=seed)
    if len(names) > 1 and by is None and ensemble is None:
        raise PrefpipeError(f"several scorers ({', '.join(names)}): pair --by one of them, or --ensemble mean-rank|unanimous")
    if by is not None and by not in names:
        raise PrefpipeError(f"--by {by}: not one of the --scorer names ({', '.join(names)})")
    scores_ds = score_candidates(candidates, workdir / "scores", names, w, batch_size=batch_size, device=device,
                                 dtype=dtype, progress=not no_progress)
    pairs_ds = build_pair_dataset(scores_ds.folder, candidates, workdir / "pairs" / "ai", opts)
    if not is_main_process():  # both datasets are complete: one process reports on them
        return
    s, p = scores_ds.stats(), pairs_ds.stats()
    click.echo(
        f"label: scored {s.get('images', 0)} images with {', '.join(names)} ({s.get('bad_images', 0)} undecodable skipped) "
        f"-> {scores_ds.folder}; {p.get('pairs', 0)} pairs over {p.get('prompts', 0)} prompts "
        f"({p.get('ties_dropped', 0)} ties dropped, {p.get('single_candidate_prompts', 0)} single-candidate prompts) "
        f"-> {pairs_ds.folder} in {time.perf_counter() - t0:.1f}s",
        err=True,
    )


@click.command("pairs")
@click.option("--scores", required=True, type=click.Path(), help="Scores dataset (WORKDIR/scores).")
@click.option("--candidates", required=True, type=click.Path(), help="The candidates those scores were made from.")
@click.option("--out", required=True, type=click.Path(), help="Output pairs dataset folder.")
@click.option("--strategy", type=click.Choice(["best-worst", "all", "random-k"]), default="best-worst", show_default=True)
@click.option("--by", default=None, help="Pair by this scorer.")
@click.option("--ensemble", type=click.Choice(["mean-rank", "unanimous"]), default=None)
@click.option("--min-margin", type=finite_float(0.0), default=0.0, show_default=True)
@click.option("--ties", type=click.Choice(["drop", "keep"]), default="drop", show_default=True)
@click.option("--k", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def pairs_command(scores, candidates, out, **options):
    """Build AI preference pairs from an existing scores dataset (no scoring)."""
    ds = build_pair_dataset(scores, candidates, out, PairOptions(**options))
    if not is_main_process():
        return
    st = ds.stats()
    click.echo(f"pairs: {st.get('pairs', 0)} pairs over {st.get('prompts', 0)} prompts "
               f"({st.get('ties_dropped', 0)} ties dropped) -> {ds.folder}", err=True)

