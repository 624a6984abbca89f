"""The eval stage: win-rate arithmetic on hand-made tables, holdout, run detection, and an end-to-end eval
of a tiny base against tiny tuned runs (LoRA and UNet). The pairs gallery (`prefpipe show`) is in test_show.py."""

import io
import json
import re

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import prefpipe.stages.eval as ev
from labelers.registry import parse_weights
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import PAIRS, conform
from prefpipe.core.stats import Z95
from prefpipe.core.tables import parquet_files
from prefpipe.stages.eval.compare import (
    RESULT_KEYS,
    compare,
    headline,
    select_checkpoints,
    summarize,
    win_counts,
)
from prefpipe.stages.eval.prompts import prepare_prompts
from prefpipe.stages.eval.runs import parse_tuned
from trainer.export import LORA_FILE

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# -- helpers (also used by test_show.py and test_report_browser.py) -----------------------------
def make_lora_run(base, out, seed: int = 0):
    """A `prefpipe train`-shaped LoRA run: non-zero adapters (outputs differ from base) + metrics.jsonl."""
    import peft
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.unet.add_adapter(peft.LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    )
    write_metrics(out / "metrics.jsonl")
    return out


def make_unet_run(base, out, seed: int = 1):
    """A full fine-tuning run: the base UNet with perturbed weights in RUN/unet."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
    unet.save_pretrained(out / "unet")
    return out


def write_metrics(path, steps: int = 30):
    with open(path, "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 0.6931 * 0.97**s, "implicit_acc": min(1.0, 0.5 + s / 60),
                                "reward_margin": s / 30, "lr": 1e-3}) + "\n")
        f.write("not json\n")  # a torn last line is skipped, not fatal


def png(color, size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_pairs(folder, rows, extra: dict | None = None, row_group_size: int = 2, files: int = 2):
    """A pairs dataset (PAIRS schema, plus `extra` columns) split over `files` files of small row groups."""
    folder.mkdir(parents=True, exist_ok=True)
    table = conform(pa.Table.from_pylist(rows), PAIRS)
    for name, values in (extra or {}).items():
        table = table.append_column(name, pa.array(values, pa.float64()))
    per = -(-table.num_rows // files)
    for i in range(files):
        part = table.slice(i * per, per)
        if part.num_rows:
            pq.write_table(part, folder / f"train-{i:05d}-of-{files:05d}.parquet", row_group_size=row_group_size)
    return folder


# -- win rate and interval ----------------------------------------------------------------------
def wilson_by_roots(points, n, z=Z95):
    """Wilson bounds as the roots p of (p_hat - p)^2 = z^2 p (1 - p) / n (independent of prefpipe.core.stats)."""
    ph = points / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    return sorted(float(r.real) for r in np.roots([a, b, c]))


def test_win_rate_counts_ties_as_half_with_a_wilson_interval():
    base = [1.0, 2.0, 3.0, 4.0, 5.0]
    tuned = [2.0, 2.0, 1.0, 5.0, 5.0]  # win, tie, loss, win, tie
    assert win_counts(base, tuned) == (2, 2, 1)
    stat = compare(base, tuned)
    assert stat["n"] == 5 and stat["win_rate"] == pytest.approx(3 / 5)
    assert stat["win_rate_ci"] == pytest.approx(wilson_by_roots(3, 5), abs=1e-9)
    assert stat["base_mean"] == pytest.approx(3.0) and stat["tuned_mean"] == pytest.approx(3.0)
    assert stat["base_median"] == 3.0 and stat["tuned_median"] == 2.0 and stat["median_diff"] == -1.0
    # lower is better: wins and losses swap, ties stay
    low = compare(base, tuned, higher_is_better=False)
    assert (low["wins"], low["ties"], low["losses"]) == (1, 2, 2) and low["win_rate"] == pytest.approx(2 / 5)
    # all ties: exactly even
    even = compare([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert even["win_rate"] == 0.5 and even["win_rate_ci"] == pytest.approx(wilson_by_roots(2, 4), abs=1e-9)
    # many comparisons: the interval narrows around the rate
    many = compare(np.zeros(400), np.r_[np.ones(300), -np.ones(100)])
    assert many["win_rate"] == 0.75
    assert many["win_rate_ci"] == pytest.approx(wilson_by_roots(300, 400), abs=1e-9)


def long_scores(rows):
    return pl.DataFrame(rows, schema=["model", "prompt_id", "candidate", "scorer", "score"], orient="row")


def test_summary_pairs_images_by_prompt_and_seed_and_selects_the_best_median():
    rows = []
    base = {("p", 0): 1.0, ("p", 1): 2.0, ("q", 0): 3.0, ("q", 1): 4.0}
    t1 = {("p", 0): 1.5, ("p", 1): 1.0, ("q", 0): 3.0, ("q", 1): 5.0}  # win, loss, tie, win
    t2 = {("p", 0): 9.0, ("p", 1): 9.0, ("q", 0): 9.0, ("q", 1): 0.0}  # win, win, win, loss
    for model, table in (("base", base), ("t1", t1), ("t2", t2)):
        for (p, c), v in table.items():
            rows.append((model, p, c, "up", v))
            rows.append((model, p, c, "down", -v))  # a lower-is-better scorer carrying the same ranking
    rows.append(("t1", "r", 0, "up", 100.0))  # no base partner: not compared
    results = summarize(long_scores(rows), ["t1", "t2"], {"up": True, "down": False})
    assert [tuple(r) for r in results] == [tuple(RESULT_KEYS)] * 4
    by = {(r["scorer"], r["tuned"]): r for r in results}
    r = by[("up", "t1")]
    assert (r["n"], r["wins"], r["ties"], r["losses"]) == (4, 2, 1, 1)
    assert r["win_rate"] == pytest.approx(2.5 / 4) and r["unmatched"] == 1
    assert r["base_median"] == 2.5 and r["tuned_median"] == pytest.approx(2.25)
    # prompt level: p mean 1.25 vs base 1.5 (loss), q mean 4.0 vs 3.5 (win)
    assert r["n_prompts"] == 2 and r["prompt_win_rate"] == 0.5
    assert by[("down", "t1")]["win_rate"] == pytest.approx(2.5 / 4)  # same ranking, sign handled
    assert by[("up", "t2")]["win_rate"] == 0.75 and by[("down", "t2")]["mean_diff"] == pytest.approx(-(27 - 10) / 4)
    sel = select_checkpoints(results)
    assert sel["up"]["best"] == "t2" and sel["up"]["medians"] == {"t1": 2.25, "t2": 9.0}
    assert sel["down"]["best"] == "t2" and sel["down"]["best_beats_base"]
    line = headline(results, ["up", "down"])
    assert "t1 beats base 62.5%" in line and "t2 beats base 75.0%" in line


# -- runs, weights, holdout ---------------------------------------------------------------------
def test_tuned_runs_are_detected_named_and_checked(tmp_path):
    lora = tmp_path / "a" / "final"
    lora.mkdir(parents=True)
    (lora / LORA_FILE).write_bytes(b"")
    (tmp_path / "a" / "metrics.jsonl").write_text("{}\n")
    unet = tmp_path / "b" / "final"
    (unet / "unet").mkdir(parents=True)
    (unet / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    bare_unet = tmp_path / "bare"
    bare_unet.mkdir()
    (bare_unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    runs = parse_tuned([str(lora), str(unet), f"mine={bare_unet}"])
    assert [(r.name, r.kind) for r in runs] == [("a-final", "lora"), ("b-final", "unet"), ("mine", "unet")]
    assert runs[0].metrics == str(tmp_path / "a" / "metrics.jsonl") and runs[1].metrics is None
    empty = tmp_path / "run"
    (empty / "checkpoint-100").mkdir(parents=True)
    with pytest.raises(PrefpipeError, match="checkpoint-100"):
        parse_tuned([str(empty)])
    with pytest.raises(PrefpipeError, match="no such folder"):
        parse_tuned([str(tmp_path / "missing")])
    with pytest.raises(PrefpipeError, match="name 'base'"):
        parse_tuned([f"base={lora}"])
    with pytest.raises(PrefpipeError, match="SCORER=PATH"):
        parse_weights(["pickscore"], ["pickscore"])
    with pytest.raises(PrefpipeError, match="not one of the --scorer"):
        parse_weights(["hpsv2=x"], ["pickscore"])
    assert parse_weights(["pickscore=a=b"], ["pickscore"]) == {"pickscore": "a=b"}


def test_holdout_removes_exactly_the_prompts_of_the_training_pairs(tmp_path):
    prompts = ["a red circle", "a green square", "a purple cat", "a yellow star", "a blue sky", "a red circle"]
    f = tmp_path / "eval.txt"
    f.write_text("\n".join(prompts) + "\n")
    img = png("red")
    common = dict(jpg_0=img, jpg_1=img, label_0=1.0, label_1=0.0, source="human")
    write_pairs(tmp_path / "pairs_a", [
        dict(caption="a green square", prompt_id=prompt_id("a green square"), **common),
        dict(caption="  a purple cat ", prompt_id=None, **common),  # null id: computed from the caption
        dict(caption="a dog", prompt_id=prompt_id("a dog"), **common),  # trained on, not evaluated
        dict(caption="a green square", prompt_id=None, **common),
    ])
    only_caption = tmp_path / "pairs_b"
    only_caption.mkdir()
    pq.write_table(pa.table({"caption": ["a yellow star"], "jpg_0": [img], "jpg_1": [img], "label_0": [1.0]}),
                   only_caption / "train-0.parquet")
    info = prepare_prompts(f, tmp_path / "out", holdout=[str(tmp_path / "pairs_a"), str(only_caption)])
    assert info["texts"] == ["a red circle", "a blue sky"]
    assert info["removed_by_holdout"] == 3 and info["training_prompts"] == 4 and info["read"] == 5
    assert (tmp_path / "out" / "prompts.txt").read_text() == "a red circle\na blue sky\n"
    limited = prepare_prompts(f, tmp_path / "out2", holdout=[str(only_caption)], limit=2)
    assert limited["texts"] == ["a red circle", "a green square"] and limited["removed_by_holdout"] == 1
    write_pairs(tmp_path / "all", [dict(caption=p, **common) for p in prompts], files=1)
    with pytest.raises(PrefpipeError, match="no prompt left"):
        prepare_prompts(f, tmp_path / "out3", holdout=[str(tmp_path / "all")])


# -- end to end ---------------------------------------------------------------------------------
PROMPTS = ["a red circle on a blue background", "a green square", "a yellow star at night"]


@pytest.fixture(scope="module")
def runs(tiny_sd15, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"lora": make_lora_run(tiny_sd15, root / "lora-run"), "unet": make_unet_run(tiny_sd15, root / "unet-run")}


def _candidates(folder):
    return pl.read_parquet(parquet_files(folder)).sort(["prompt_id", "candidate"])


@pytest.mark.slow
def test_eval_compares_tuned_runs_with_base_on_identical_seeds_writes_every_output_and_resumes(
    tiny_sd15, runs, tmp_path
):
    from labelers.registry import build_scorer
    from prefpipe.stages.generate import GenerateOptions, generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "eval"
    opts = ev.EvalOptions(base=str(tiny_sd15), tuned=[str(runs["lora"]), str(runs["unet"])], prompts=str(prompts),
                          scorers=["compressibility", "incompressibility"], per_prompt=2, steps=2)
    report = ev.run_eval(opts, out, batch_size=2, progress=False)

    # every output, with the documented keys
    for name in ("report.json", "report.md", "report.html", "scores.parquet", "prompts.txt"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert tuple(on_disk) == ev.REPORT_KEYS
    for key in ev.REPORT_KEYS + RESULT_KEYS:
        assert re.search(rf"\b{key}\b", ev.__doc__), f"report key {key} is not documented"
    assert [(t["name"], t["kind"]) for t in on_disk["tuned"]] == [("lora-run", "lora"), ("unet-run", "unet")]
    assert on_disk["generation"]["images_generated"] == {"base": 6, "lora-run": 6, "unet-run": 6}
    assert set(on_disk["files"]["plots"]) == {"scores_compressibility", "scores_incompressibility", "win_rate", "curves"}
    for rel in on_disk["files"]["plots"].values():
        assert Image.open(out / rel).format == "PNG"
    assert len(on_disk["results"]) == 4 and all(tuple(r) == RESULT_KEYS for r in on_disk["results"])
    by = {(r["scorer"], r["tuned"]): r for r in on_disk["results"]}
    for name in ("lora-run", "unet-run"):
        up, down = by[("incompressibility", name)], by[("compressibility", name)]
        assert up["n"] == 6 and up["wins"] + up["ties"] + up["losses"] == 6
        assert up["win_rate"] + down["win_rate"] == pytest.approx(1.0)  # opposite scorers: wins swap
        assert up["mean_diff"] == pytest.approx(-down["mean_diff"], abs=1e-6)
    assert set(on_disk["selection"]) == {"compressibility", "incompressibility"}
    assert "beats base" in on_disk["headline"]
    md = (out / "report.md").read_text()
    assert "lora-run" in md and "plots/win_rate.png" in md and "plots/curves.png" in md

    # same seeds for every model; the tuned images differ from the base ones
    base = _candidates(out / "candidates" / "base")
    for name in ("lora-run", "unet-run"):
        tuned = _candidates(out / "candidates" / name)
        assert tuned["seed"].to_list() == base["seed"].to_list()
        assert tuned["prompt_id"].to_list() == base["prompt_id"].to_list()
        assert tuned["image"].to_list() != base["image"].to_list()

    # scores: a long table that matches the scorer applied directly
    scores = pl.read_parquet(out / "scores.parquet")
    assert scores.columns == ["model", "prompt_id", "candidate", "seed", "scorer", "score"]
    assert scores.height == 3 * 6 * 2
    direct = build_scorer("compressibility").score(
        [Image.open(io.BytesIO(b)) for b in base["image"]], base["prompt"].to_list())
    got = scores.filter((pl.col("model") == "base") & (pl.col("scorer") == "compressibility")).sort(
        ["prompt_id", "candidate"])["score"].to_numpy()
    np.testing.assert_allclose(got, direct)

    # the shared pipeline (adapters loaded and unloaded, UNet swapped) gives what a fresh load gives
    one = tmp_path / "one.txt"
    one.write_text(PROMPTS[0] + "\n")
    pid = prompt_id(PROMPTS[0])
    for name, kind in (("lora-run", "lora"), ("unet-run", "unet")):
        fresh = tmp_path / f"fresh-{name}"
        generate(GenerateOptions(model=str(tiny_sd15), per_prompt=2, steps=2, **{kind: str(runs[kind])}), one, fresh,
                 batch_size=2, progress=False)
        assert (_candidates(fresh)["image"].to_list()
                == _candidates(out / "candidates" / name).filter(pl.col("prompt_id") == pid)["image"].to_list())

    # the page: every image embedded, nothing fetched
    html = (out / "report.html").read_text()
    assert html.count("<img ") == 3 * 6 + 4
    assert html.count('src="data:image/') == html.count("<img ")
    assert not re.search(r"""(src|href)=["']?(https?:)?//|url\(\s*["']?https?:""", html)
    assert "sortBy(" in html and 'data-g0="' in html

    # a second run (through the CLI command, with a holdout that overlaps nothing) regenerates and rescores nothing
    shards = {f: f.read_bytes() for f in (out / "candidates").rglob("*.parquet")}
    mtimes = {f: f.stat().st_mtime_ns for f in shards}
    unrelated = write_pairs(tmp_path / "train-pairs", [dict(caption="a dog", jpg_0=png("red"), jpg_1=png("blue"),
                                                            label_0=1.0, label_1=0.0, source="ai")], files=1)
    args = ["--base", tiny_sd15, "--tuned", runs["lora"], "--tuned", runs["unet"], "--prompts", prompts,
            "--scorer", "compressibility", "--scorer", "incompressibility", "--per-prompt", 2, "--steps", 2,
            "--batch-size", 2, "--out", out, "--holdout", unrelated, "--no-progress"]
    result = CliRunner().invoke(ev.eval_command, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    again = json.loads((out / "report.json").read_text())
    assert again["generation"]["images_generated"] == {"base": 0, "lora-run": 0, "unet-run": 0}
    assert again["counters"]["images_scored"] == 0
    assert again["prompts"]["removed_by_holdout"] == 0 and again["prompts"]["training_prompts"] == 1
    assert again["results"] == on_disk["results"]
    assert {f: f.read_bytes() for f in shards} == shards
    assert {f: f.stat().st_mtime_ns for f in shards} == mtimes


def test_eval_stops_on_bad_options_before_generating(tiny_sd15, runs, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    base = dict(base=str(tiny_sd15), tuned=[str(runs["lora"])], prompts=str(prompts), scorers=["compressibility"])
    with pytest.raises(PrefpipeError, match="unknown scorer"):
        ev.run_eval(ev.EvalOptions(**{**base, "scorers": ["nope"]}), tmp_path / "o1", progress=False)
    with pytest.raises(PrefpipeError, match="no such folder"):
        ev.run_eval(ev.EvalOptions(**{**base, "tuned": [str(tmp_path / "x")]}), tmp_path / "o2", progress=False)
    with pytest.raises(PrefpipeError, match="model_index.json"):
        ev.run_eval(ev.EvalOptions(**{**base, "base": str(runs["lora"])}), tmp_path / "o3", progress=False)
    assert not (tmp_path / "o1" / "candidates").exists() and not (tmp_path / "o2").exists()
