"""`make demo-feedback`'s own commands: the control's reversed pairs, and the headline judged by the oracle.

The chain itself is the real stages, run by the Makefile (README, "make demo-feedback"):

    demo-clip ─▶ CLIP (open_clip format) ──┐
    base candidates ──label --scorer clip ─┴─▶ pairs/ai ──demo-reverse──▶ pairs/ai-reversed (the control)
    base candidates ──demo-annotate (simulated people)──▶ Pick-a-Pic v2 shards ──ingest pickapic──▶ pairs/human
    pairs/human ──label --pairs (CLIP relabels them)──▶ relabel/agreement.json
    train: human | ai | both (--source human --source ai) | control ──▶ eval on the held-out prompts
    demo-feedback-headline: the oracle (prefpipe/demo/oracle.py) reads every eval image

- `prefpipe demo-reverse`: the CLIP pairs with each preference flipped (the control: trained on it, the
  model should move *away* from what CLIP prefers; if it improved too, the gain came from training noise).
- `prefpipe demo-feedback-headline`: per evaluated model the oracle's alignment accuracy on the held-out
  prompts (95% Wilson intervals), the CLIP score and its win rate against the base, the paired oracle
  comparison with the base (same prompt, same seed: images made right against images made wrong), the
  CLIP's agreement with the simulated annotators, and, when `make demo` has run, the compressibility
  arm read by the same oracle. `--check` fails unless the CLIP arm's shape-colour accuracy is above the
  base's and the control's is not.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.files import atomic_output, write_atomic
from prefpipe.core.schema import PAIRS, conform
from prefpipe.core.stats import wilson_interval
from prefpipe.core.tables import iter_batches, parquet_file, parquet_files
from prefpipe.demo import oracle

BASE = "base"  # the base model's name in eval's reports
ARMS = {"human": "simulated annotators' pairs (Pick-a-Pic v2 shards, ingested)",
        "ai": "CLIP's pairs", "both": "both (human + CLIP)", "control": "CLIP's pairs reversed",
        "ai-kto": "CLIP's scores, per image (KTO)", "control-kto": "CLIP's scores reversed, per image (KTO)"}
# (CLIP arm, its control): the verdict needs every pair present to hold, and at least one present
VERDICT_PAIRS = (("ai", "control"), ("ai-kto", "control-kto"))


# ------------------------------------------------------------------------------------------------------
# The control: reversed pairs
# ------------------------------------------------------------------------------------------------------


def reverse_pairs(pairs: str | Path, out: str | Path) -> int:
    """Write `pairs` with every preference flipped (label_0 <-> label_1, best_image_uid the other image,
    scorer "<scorer>-reversed"; scores kept) into `out`, one shard per input file. Returns the rows."""
    files = parquet_files(pairs)
    rows = 0
    with atomic_output(out) as tmp:
        tmp.mkdir(parents=True)
        for k, f in enumerate(files):
            t = parquet_file(f).read()
            d = t.to_pydict()
            best = [u1 if b == u0 else u0 if b == u1 else None
                    for b, u0, u1 in zip(d["best_image_uid"], d["image_0_uid"], d["image_1_uid"])]
            flipped = t.set_column(t.schema.get_field_index("label_0"), "label_0", t.column("label_1"))
            flipped = flipped.set_column(t.schema.get_field_index("label_1"), "label_1", t.column("label_0"))
            flipped = flipped.set_column(t.schema.get_field_index("best_image_uid"), "best_image_uid",
                                         pa.array(best, pa.string()))
            if "scorer" in t.column_names:
                flipped = flipped.set_column(t.schema.get_field_index("scorer"), "scorer",
                                             pa.array([None if s is None else f"{s}-reversed" for s in d["scorer"]], pa.string()))
            pq.write_table(conform(flipped, PAIRS), tmp / f"train-{k:05d}-of-{len(files):05d}.parquet")
            rows += t.num_rows
    return rows


def reverse_scores(scores: str | Path, out: str | Path) -> int:
    """Write a scores dataset with every score negated (same scorer name, so `prefpipe feedback --by` still
    finds it) into `out`, one shard per input file: the top of each prompt becomes its bottom. Returns the rows."""
    files = parquet_files(scores)
    rows = 0
    with atomic_output(out) as tmp:
        tmp.mkdir(parents=True)
        for k, f in enumerate(files):
            t = parquet_file(f).read()
            if "score" not in t.column_names:
                raise PrefpipeError(f"{f}: not a scores table (no column 'score')")
            i = t.schema.get_field_index("score")
            t = t.set_column(i, t.schema.field(i), pc.negate(t.column("score")))
            pq.write_table(t, tmp / f"scores-{k:05d}-of-{len(files):05d}.parquet")
            rows += t.num_rows
    return rows


@click.command("demo-reverse")
@click.option("--pairs", type=click.Path(exists=True), default=None, help="A pairs dataset (e.g. WORKDIR/pairs/ai).")
@click.option("--scores", type=click.Path(exists=True), default=None,
              help="Or a scores dataset (e.g. WORKDIR/scores): every score negated (the per-image control).")
@click.option("--out", required=True, type=click.Path(), help="Folder to write the reversed pairs or scores to.")
def demo_reverse(pairs, scores, out):
    """Write a pairs dataset with every preference flipped, or a scores dataset with every score negated: the
    demo's control arms train on them."""
    if (pairs is None) == (scores is None):
        raise PrefpipeError("demo-reverse: give --pairs or --scores (one of them)")
    if pairs is not None:
        n = reverse_pairs(pairs, out)
        click.echo(f"demo-reverse: {n} pairs of {pairs} with their preference flipped -> {out}", err=True)
    else:
        n = reverse_scores(scores, out)
        click.echo(f"demo-reverse: {n} scores of {scores} negated -> {out}", err=True)


# ------------------------------------------------------------------------------------------------------
# The oracle over eval's candidates
# ------------------------------------------------------------------------------------------------------


def read_folder(folder: str | Path) -> dict[tuple[str, int], oracle.Reading]:
    """(prompt_id, candidate) -> the oracle's reading, for every image of an eval candidates folder."""
    out = {}
    for batch in iter_batches(folder, columns=["prompt_id", "candidate", "prompt", "image"]):
        d = batch.to_pydict()
        for pid, c, prompt, image in zip(d["prompt_id"], d["candidate"], d["prompt"], d["image"]):
            out[(pid, c)] = oracle.read(oracle.to_pixels(image), prompt)
    return out


def read_report(eval_dir: Path) -> dict:
    path = eval_dir / "report.json"
    if not path.exists():
        raise PrefpipeError(f"{path}: no eval report; run the eval first")
    return json.loads(path.read_text())


def oracle_of_eval(eval_dir: Path) -> dict[str, dict[tuple[str, int], oracle.Reading]]:
    """model name -> readings of its images, for every candidates folder the eval report lists."""
    report = read_report(eval_dir)
    return {m: read_folder(eval_dir / rel) for m, rel in report["files"]["candidates"].items()}


def paired(base: dict, tuned: dict, part: str) -> dict:
    """Same prompt and seed: images the tuned model got right where the base got it wrong, and the reverse."""
    keys = sorted(set(base) & set(tuned))
    gained = sum(tuned[k].parts[part] and not base[k].parts[part] for k in keys)
    lost = sum(base[k].parts[part] and not tuned[k].parts[part] for k in keys)
    lo, hi = wilson_interval(gained, gained + lost)
    return {"n": len(keys), "gained": gained, "lost": lost, "gained_share": gained / max(1, gained + lost),
            "gained_share_ci95": [lo, hi]}


def clip_results(report: dict, scorer: str) -> dict[str, dict]:
    """tuned name -> its eval result on `scorer` (win rate against the base, means)."""
    return {r["tuned"]: r for r in report["results"] if r["scorer"] == scorer}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(acc: dict) -> str:
    lo, hi = acc["ci95"]
    return f"{_pct(acc['accuracy'])}% [{_pct(lo)}, {_pct(hi)}]"


def feedback_headline(eval_dir: str | Path, *, scorer: str = "clip", agreement: str | Path | None = None,
                      annotators: str | Path | None = None, compressibility_eval: str | Path | None = None,
                      clip_record: str | Path | None = None) -> dict:
    """The headline's numbers (also written to EVAL_DIR/feedback.json and EVAL_DIR/feedback.md)."""
    eval_dir = Path(eval_dir)
    report = read_report(eval_dir)
    readings = oracle_of_eval(eval_dir)
    if BASE not in readings:
        raise PrefpipeError(f"{eval_dir}: the eval has no base model's candidates")
    results = clip_results(report, scorer)
    models = [BASE] + [m for m in readings if m != BASE]
    out: dict = {"eval": str(eval_dir), "prompts": report["prompts"]["count"],
                 "per_prompt": report["generation"]["per_prompt"], "models": {}}
    for m in models:
        entry = {"oracle": oracle.accuracy(list(readings[m].values()))}
        if m != BASE:
            entry["paired"] = {p: paired(readings[BASE], readings[m], p) for p in ("shape_colour", "all")}
            if m in results:
                r = results[m]
                entry[scorer] = {"mean": r["tuned_mean"], "win_rate": r["win_rate"], "win_rate_ci": r["win_rate_ci"]}
        elif results:
            entry[scorer] = {"mean": next(iter(results.values()))["base_mean"]}
        out["models"][m] = entry
    if agreement and Path(agreement).exists():
        a = json.loads(Path(agreement).read_text())["scorers"].get(scorer)
        if a:
            out["agreement"] = a
    if annotators and Path(annotators).exists():
        out["annotators"] = json.loads(Path(annotators).read_text())
    if clip_record and Path(clip_record).exists():
        out["clip"] = json.loads(Path(clip_record).read_text()).get("metrics")
    if compressibility_eval and (Path(compressibility_eval) / "report.json").exists():
        ce = Path(compressibility_eval)
        rep = read_report(ce)
        cr = oracle_of_eval(ce)
        comp = {}
        for m, rd in cr.items():
            comp[m] = {"oracle": oracle.accuracy(list(rd.values()))}
        for r in rep["results"]:
            if r["scorer"] == "compressibility":
                comp[r["tuned"]]["compressibility"] = {"mean": r["tuned_mean"], "win_rate": r["win_rate"],
                                                       "win_rate_ci": r["win_rate_ci"]}
                comp[BASE]["compressibility"] = {"mean": r["base_mean"]}
        out["compressibility_arm"] = {"eval": str(ce), "models": comp}
    out["passed"] = verdict({m: e["oracle"]["shape_colour"]["accuracy"] for m, e in out["models"].items()})
    out["lines"] = headline_lines(out, scorer)
    write_atomic(eval_dir / "feedback.json", json.dumps(out, indent=2) + "\n")
    write_atomic(eval_dir / "feedback.md", "\n".join(out["lines"]) + "\n")
    return out


def verdict(shape_colour: dict[str, float]) -> bool:
    """The check on the oracle's shape-colour accuracy per model: for every (CLIP arm, control) of
    :data:`VERDICT_PAIRS` evaluated, the arm above the base and the control not above it; at least one such pair."""
    base = shape_colour[BASE]
    present = [(shape_colour[a], shape_colour[c]) for a, c in VERDICT_PAIRS if a in shape_colour and c in shape_colour]
    return bool(present) and all(a > base and c <= base for a, c in present)


def headline_lines(h: dict, scorer: str) -> list[str]:
    n = h["prompts"] * h["per_prompt"]
    lines = [f"demo-feedback: oracle alignment on {h['prompts']} held-out prompts x {h['per_prompt']} seeds = {n} "
             f"images per model (same seeds for every model; 95% Wilson intervals)", "",
             f"| model | trained on | shape colour | background colour | both colours | shape | all three | "
             f"{scorer} score | wins on {scorer} vs base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, e in h["models"].items():
        o = e["oracle"]
        s = e.get(scorer, {})
        mean = f"{s['mean']:.2f}" if "mean" in s else "-"
        wins = (f"{_pct(s['win_rate'])}% [{_pct(s['win_rate_ci'][0])}, {_pct(s['win_rate_ci'][1])}]"
                if "win_rate" in s else "-")
        lines.append(f"| {m} | {ARMS.get(m, '-') if m != BASE else '-'} | " + " | ".join(_cell(o[p]) for p in oracle.PARTS)
                     + f" | {mean} | {wins} |")
    lines.append("")
    for m, e in h["models"].items():
        if "paired" in e:
            p = e["paired"]["shape_colour"]
            lines.append(f"demo-feedback: {m}: same prompt and seed as the base, shape colour made right in {p['gained']} "
                         f"images and made wrong in {p['lost']}")
    if "agreement" in h:
        a = h["agreement"]
        lo, hi = a["accuracy_ci95"]
        lines.append(f"demo-feedback: {scorer} agrees with the simulated annotators on {_pct(a['accuracy_non_tie'])}% "
                     f"[{_pct(lo)}, {_pct(hi)}] of {a['non_tie_pairs']} non-tie pairs")
    if "annotators" in h:
        a = h["annotators"]
        o = a["options"]
        lines.append(
            f"demo-feedback: simulated annotators: {o['annotators']} people, {a['pairs']} pairs of base candidates; "
            f"asked {_pct(o['agreement'])}% agreement with the oracle and {_pct(o['tie_rate'])}% ties, realised "
            f"{_pct(a['realised']['agreement_where_oracle_separates'] or 0)}% and {_pct(a['realised']['ties'])}%; "
            f"the oracle separated {a['oracle_separates']} pairs (the rest judged by a coin)")
    if "compressibility_arm" in h:
        lines.append("")
        lines.append("demo-feedback: `make demo`'s compressibility arm, read by the same oracle:")
        for m, e in h["compressibility_arm"]["models"].items():
            c = e.get("compressibility", {})
            extra = f"; wins on compressibility {_pct(c['win_rate'])}%" if "win_rate" in c else ""
            lines.append(f"  {m}: shape colour {_cell(e['oracle']['shape_colour'])}, both colours "
                         f"{_cell(e['oracle']['colours'])}, mean compressibility {c.get('mean', float('nan')):.4f}{extra}")
    base = h["models"][BASE]["oracle"]["shape_colour"]["accuracy"]
    if h["passed"]:
        lines.append(f"demo-feedback verdict: CLIP's feedback raised the oracle's shape-colour accuracy above the base's "
                     f"({_pct(base)}%), and the reversed feedback did not")
    else:
        lines.append("demo-feedback verdict: NOT shown: a CLIP arm is not above the base on shape colour, or its "
                     "control is above it (or no CLIP arm and control were evaluated)")
    return lines


@click.command("demo-feedback-headline")
@click.option("--eval", "eval_dir", required=True, type=click.Path(), help="The eval folder of the feedback arms.")
@click.option("--scorer", default="clip", show_default=True, help="The AI feedback scorer (its eval results are shown).")
@click.option("--agreement", type=click.Path(), default=None, help="relabel/agreement.json: the scorer against the annotators.")
@click.option("--annotators", type=click.Path(), default=None, help="The simulated annotators' annotators.json.")
@click.option("--clip-record", type=click.Path(), default=None, help="The CLIP's prefpipe_demo_clip.json.")
@click.option("--compressibility-eval", type=click.Path(), default=None,
              help="`make demo`'s eval-compressibility folder: its images are read by the oracle too (skipped if absent).")
@click.option("--check", is_flag=True, help="Exit with status 1 unless the verdict holds.")
def demo_feedback_headline(eval_dir, scorer, agreement, annotators, clip_record, compressibility_eval, check):
    """Print `make demo-feedback`'s headline: oracle alignment of base and every arm on held-out prompts."""
    h = feedback_headline(eval_dir, scorer=scorer, agreement=agreement, annotators=annotators,
                          compressibility_eval=compressibility_eval, clip_record=clip_record)
    for line in h["lines"]:
        click.echo(line)
    if check and not h["passed"]:
        raise SystemExit(1)


__all__ = ["ARMS", "feedback_headline", "reverse_pairs", "reverse_scores", "verdict"]
