"""The label stage: scores, AI pairs, relabelled human pairs and agreement, run as a user runs it."""

import io
import json

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from prefpipe.cli import main
from prefpipe.core.dataset import ShardedDataset
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import CANDIDATES, PAIRS, conform
from prefpipe.core.tables import parquet_files, read_manifest


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_kb(data: bytes) -> float:
    """An independent JPEG-size computation (quality 95, kB = bytes / 1000)."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def drawn(kind: int, seed: int) -> Image.Image:
    """Images whose JPEG size grows with `kind`: flat, stripes, noise."""
    rng = np.random.default_rng(seed)
    a = np.zeros((32, 32, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    if kind >= 1:
        a[::2] = 255 - a[::2]
    if kind >= 2:
        a = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(a)


def write_candidates(folder, prompts_kinds, corrupt=()):
    """A candidates dataset in two shards, each prompt's candidates in one shard."""
    rows = []
    for p, kinds in prompts_kinds.items():
        for c, kind in enumerate(kinds):
            data = b"not an image" if (p, c) in corrupt else png(drawn(kind, c))
            rows.append(dict(prompt_id=prompt_id(p), prompt=p, candidate=c, seed=c, image=data, width=32, height=32,
                             model="drawn", scheduler="none", steps=0, guidance=0.0))
    ds = ShardedDataset(folder, "generate", {"drawn": True}, "fp", 2, CANDIDATES)
    half = len(prompts_kinds) // 2
    names = list(prompts_kinds)
    for unit, chunk in enumerate([names[:half], names[half:]]):
        with ds.write_unit(unit) as w:
            w.write(pa.Table.from_pylist([r for r in rows if r["prompt"] in chunk], schema=CANDIDATES))
    return folder


PROMPTS = {"a red cat": [0, 2, 1], "a blue dog": [2, 0], "a green tree": [1, 1], "a lone star": [2]}


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_label_scores_each_image_and_pairs_best_against_worst(tmp_path):
    cands = write_candidates(tmp_path / "candidates", PROMPTS)
    r = invoke("label", "--scorer", "compressibility", "--scorer", "incompressibility", "--by", "compressibility",
               "--candidates", cands, "--out", tmp_path / "work", "--no-progress")
    assert r.exit_code == 0, r.output
    scores = pl.read_parquet(parquet_files(tmp_path / "work" / "scores"))
    n_images = sum(len(v) for v in PROMPTS.values())
    assert scores.height == 2 * n_images
    cand = pl.read_parquet(parquet_files(cands))
    expected = {(row["prompt_id"], row["candidate"]): -jpeg_kb(row["image"]) for row in cand.iter_rows(named=True)}
    for row in scores.filter(pl.col("scorer") == "compressibility").iter_rows(named=True):
        assert row["score"] == pytest.approx(expected[(row["prompt_id"], row["candidate"])], abs=1e-4)
    inc = scores.filter(pl.col("scorer") == "incompressibility").sort(["prompt_id", "candidate"])
    com = scores.filter(pl.col("scorer") == "compressibility").sort(["prompt_id", "candidate"])
    assert np.allclose(inc["score"].to_numpy(), -com["score"].to_numpy())

    pairs_dir = tmp_path / "work" / "pairs" / "ai"
    assert pq.read_schema(parquet_files(pairs_dir)[0]) == PAIRS
    pairs = pl.read_parquet(parquet_files(pairs_dir))
    # "a red cat": flat (0) beats noise (2); "a blue dog": flat beats noise; "a green tree": equal kinds
    # but different draws, so a real (small) margin; "a lone star": one candidate, no pair.
    assert set(pairs["caption"]) == {"a red cat", "a blue dog", "a green tree"}
    for row in pairs.iter_rows(named=True):
        w = row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"]
        lo = row["jpg_1"] if row["label_0"] == 1.0 else row["jpg_0"]
        assert jpeg_kb(w) < jpeg_kb(lo)  # the compressible image wins
        assert row["source"] == "ai" and row["scorer"] == "compressibility"
        assert row["margin"] == pytest.approx(abs(row["score_0"] - row["score_1"]), abs=1e-5)
        assert row["best_image_uid"] == (row["image_0_uid"] if row["label_0"] == 1.0 else row["image_1_uid"])
    red = pairs.filter(pl.col("caption") == "a red cat").row(0, named=True)
    assert {red["image_0_uid"], red["image_1_uid"]} == {f"{prompt_id('a red cat')}-0", f"{prompt_id('a red cat')}-1"}
    assert read_manifest(pairs_dir)["units"]["train-00001-of-00002.parquet"]["single_candidate_prompts"] == 1
    # the reference trainers' loader reads our pairs: plain bytes, labels as floats
    ds = datasets.load_dataset(str(pairs_dir), split="train")
    assert ds.num_rows == 3 and isinstance(ds[0]["jpg_0"], bytes)


def test_undecodable_images_are_counted_and_left_out(tmp_path):
    cands = write_candidates(tmp_path / "c", PROMPTS, corrupt={("a red cat", 0)})
    r = invoke("label", "--scorer", "compressibility", "--candidates", cands, "--out", tmp_path / "w", "--no-progress")
    assert r.exit_code == 0
    m = read_manifest(tmp_path / "w" / "scores")
    assert sum(u.get("bad_images", 0) for u in m["units"].values()) == 1
    pairs = pl.read_parquet(parquet_files(tmp_path / "w" / "pairs" / "ai"))
    red = pairs.filter(pl.col("caption") == "a red cat").row(0, named=True)
    assert f"{prompt_id('a red cat')}-0" not in (red["image_0_uid"], red["image_1_uid"])


def test_a_lost_shard_is_redone_identically_and_finished_ones_are_kept(tmp_path):
    cands = write_candidates(tmp_path / "c", PROMPTS)
    args = ("label", "--scorer", "compressibility", "--candidates", cands, "--out", tmp_path / "w", "--no-progress")
    invoke(*args)
    files = {f: f.read_bytes() for d in ("scores", "pairs/ai") for f in parquet_files(tmp_path / "w" / d)}
    lost = [f for f in files if f.name.startswith("train-00001")]
    for f in lost:
        f.unlink()  # as if killed before these units finished
    kept_mtime = {f: f.stat().st_mtime_ns for f in files if f not in lost}
    assert invoke(*args).exit_code == 0
    assert {f: f.read_bytes() for f in files} == files
    assert all(f.stat().st_mtime_ns == t for f, t in kept_mtime.items())


def test_pairs_command_rebuilds_pairs_with_other_options_from_existing_scores(tmp_path):
    cands = write_candidates(tmp_path / "c", PROMPTS)
    invoke("label", "--scorer", "compressibility", "--candidates", cands, "--out", tmp_path / "w", "--no-progress")
    r = invoke("pairs", "--scores", tmp_path / "w" / "scores", "--candidates", cands, "--out", tmp_path / "all",
               "--strategy", "all")
    assert r.exit_code == 0
    assert pl.read_parquet(parquet_files(tmp_path / "all")).height == 3 + 1 + 1  # C(3,2) + 1 + 1
    # different pair options into the existing folder are refused, not mixed
    r = invoke("label", "--scorer", "compressibility", "--candidates", cands, "--out", tmp_path / "w",
               "--strategy", "all", "--no-progress")
    assert r.exit_code != 0 and "strategy: folder has 'best-worst', this run asks 'all'" in r.output


@pytest.mark.parametrize("args, message", [
    (["--scorer", "nope"], "unknown scorer 'nope'; known scorers: pickscore"),
    (["--scorer", "compressibility", "--scorer", "incompressibility"], "pair --by one of them"),
    (["--scorer", "compressibility", "--by", "hpsv2"], "--by hpsv2: not one of the --scorer names"),
    (["--scorer", "compressibility", "--weights", "pickscore=x"], "'pickscore' is not one of the --scorer names"),
])
def test_bad_label_options_name_the_option(tmp_path, args, message):
    cands = write_candidates(tmp_path / "c", PROMPTS)
    r = invoke("label", *args, "--candidates", cands, "--out", tmp_path / "w", "--no-progress")
    assert r.exit_code != 0 and message in r.output, r.output


def test_relabel_human_pairs_reports_agreement_with_known_answers(tmp_path):
    # 6 decided human pairs: the compressibility scorer prefers the flat image (kind 0) over noise (kind 2);
    # humans agree on 4 of them. 2 human ties.
    rows = []
    for i in range(8):
        flat, noisy = png(drawn(0, i)), png(drawn(2, i))
        flat_first = i % 2 == 0
        human_prefers_flat = i not in (1, 4)
        label_0 = 0.5 if i >= 6 else float(human_prefers_flat == flat_first)
        rows.append(dict(caption=f"prompt {i}", jpg_0=flat if flat_first else noisy, jpg_1=noisy if flat_first else flat,
                         label_0=label_0, label_1=1 - label_0, image_0_uid=f"u{i}a", image_1_uid=f"u{i}b"))
    human = tmp_path / "human"
    human.mkdir()
    pq.write_table(conform(pa.Table.from_pylist(rows), PAIRS), human / "train-00000-of-00001.parquet")
    r = invoke("label", "--scorer", "compressibility", "--pairs", human, "--out", tmp_path / "w", "--no-progress")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "w" / "relabel" / "agreement.json").read_text())
    c = report["scorers"]["compressibility"]
    assert c["non_tie_pairs"] == 6 and c["accuracy_non_tie"] == pytest.approx(4 / 6)
    lo, hi = c["accuracy_ci95"]
    assert lo < 4 / 6 < hi
    assert report["human_ties"] == 2 and report["pairs"] == 8
    relabel = pl.read_parquet(parquet_files(tmp_path / "w" / "relabel"))
    for row in relabel.iter_rows(named=True):
        assert row["compressibility_label_0"] == float(row["compressibility_score_0"] > row["compressibility_score_1"])
    assert "agrees with humans on 66.7% of 6 non-tie pairs" in r.output


def test_model_scorers_label_through_the_stage_with_an_ensemble(tmp_path):
    from labelers.registry import build_scorer
    from prefpipe.testing.scorers import write_tiny_scorer

    weights = {k: write_tiny_scorer(k, tmp_path / k) for k in ("pickscore", "hpsv2")}
    cands = write_candidates(tmp_path / "c", PROMPTS)
    r = invoke("label", "--scorer", "pickscore", "--scorer", "hpsv2", *[f"--weights={k}={v}" for k, v in weights.items()],
               "--ensemble", "mean-rank", "--strategy", "all", "--candidates", cands, "--out", tmp_path / "w",
               "--no-progress")
    assert r.exit_code == 0, r.output
    scores = pl.read_parquet(parquet_files(tmp_path / "w" / "scores"))
    cand = pl.read_parquet(parquet_files(cands)).sort(["prompt_id", "candidate"])
    images = [Image.open(io.BytesIO(b)) for b in cand["image"]]
    for name in ("pickscore", "hpsv2"):  # the stage's numbers are the scorer's own, image for image
        direct = build_scorer(name, weights[name], device="cpu").score(images, cand["prompt"].to_list())
        got = scores.filter(pl.col("scorer") == name).sort(["prompt_id", "candidate"])["score"].to_numpy()
        assert np.allclose(got, direct, atol=1e-5)
    pairs = pl.read_parquet(parquet_files(tmp_path / "w" / "pairs" / "ai"))
    assert set(pairs["scorer"]) == {"mean-rank(hpsv2,pickscore)"} and pairs.height >= 3


def test_worker_threads_change_nothing_in_the_scores_and_a_bad_count_is_one_message(tmp_path, monkeypatch):
    """The stage decodes and prepares batches in PREFPIPE_WORKERS threads (prefpipe.core.background): one thread and
    four give the same scores bit for bit, in the same rows; a bad value of the variable is one message."""
    from prefpipe.testing.scorers import write_tiny_scorer

    weights = {k: write_tiny_scorer(k, tmp_path / k) for k in ("clip", "hpsv2")}
    many = {f"a shape number {i}": [i % 3, (i + 1) % 3, 2] for i in range(50)}  # 150 images: 2 row batches a shard
    cands = write_candidates(tmp_path / "c", many, corrupt={("a shape number 5", 1)})
    tables = {}
    for workers in ("1", "4"):
        monkeypatch.setenv("PREFPIPE_WORKERS", workers)
        r = invoke("label", "--scorer", "clip", "--scorer", "hpsv2", *[f"--weights={k}={v}" for k, v in weights.items()],
                   "--by", "clip", "--candidates", cands, "--out", tmp_path / f"w{workers}", "--batch-size", "8",
                   "--no-progress")
        assert r.exit_code == 0, r.output
        tables[workers] = pl.read_parquet(parquet_files(tmp_path / f"w{workers}" / "scores"))
    assert tables["1"].height == 2 * (150 - 1)  # the corrupt image left out, in both
    assert tables["1"].equals(tables["4"])  # same rows in the same order, same float32 bits
    monkeypatch.setenv("PREFPIPE_WORKERS", "many")
    r = CliRunner().invoke(main, ["label", "--scorer", "compressibility", "--candidates", str(cands), "--out",
                                  str(tmp_path / "bad"), "--no-progress"])
    assert r.exit_code != 0 and "PREFPIPE_WORKERS='many'" in r.output and "Traceback" not in r.output
