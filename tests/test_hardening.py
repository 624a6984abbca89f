"""Hardening: every finding of the fuzz pass, as a test, and property-based fuzzing of the boundaries that
read outside data (images, prompt files, tables, options). Each stage finishes with counted skips or stops
with one clean message: never a traceback, a non-finite number in a table, or a half-written result."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from prefpipe.cli import main
from prefpipe.core.dataset import ShardedDataset
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.images import BadImage, ImageChecker, decode, to_rgb
from prefpipe.core.prompts import prompt_id, read_prompts
from prefpipe.core.schema import CANDIDATES, SCORES
from prefpipe.core.tables import parquet_files, read_manifest
from prefpipe.stages.label import score_candidates
from prefpipe.stages.pairs import PairOptions, build_pairs
from tests.conftest import REPO

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_candidates(folder, images: list[bytes], width: int = 64, height: int = 64):
    ds = ShardedDataset(folder, "generate", {"t": 1}, "fp", 1, CANDIDATES)
    rows = [dict(prompt_id=prompt_id("p"), prompt="p", candidate=c, seed=c, image=data, width=width, height=height,
                 model="m", scheduler="s", steps=1, guidance=1.0) for c, data in enumerate(images)]
    with ds.write_unit(0) as w:
        w.write(pa.Table.from_pylist(rows, schema=CANDIDATES))
    return folder


# -- numbers are finite, or refused --------------------------------------------------------------------
@pytest.mark.parametrize("args, option", [
    (["train", "--model", "m", "--out", "o", "--pairs", "p", "--beta", "nan"], "--beta"),
    (["train", "--model", "m", "--out", "o", "--pairs", "p", "--learning-rate", "inf"], "--learning-rate"),
    (["generate", "--model", "m", "--prompts", "p", "--out", "o", "--guidance", "nan"], "--guidance"),
    (["label", "--scorer", "compressibility", "--candidates", "c", "--out", "o", "--min-margin", "nan"], "--min-margin"),
    (["pairs", "--scores", "s", "--candidates", "c", "--out", "o", "--min-margin", "-inf"], "--min-margin"),
])
def test_a_non_finite_float_option_is_refused_before_any_work(args, option):
    r = invoke(*args)
    assert r.exit_code == 2 and option in r.output and "not a finite number" in r.output, r.output


def test_the_python_api_refuses_non_finite_options_too():
    from trainer.config import TrainConfig

    with pytest.raises(PrefpipeError, match="--beta nan: must be a finite number"):
        TrainConfig(model="m", out="o", pairs=("p",), beta=float("nan")).validate()
    with pytest.raises(PrefpipeError, match="--min-margin nan"):
        PairOptions(min_margin=float("nan")).check(["s"])


class NonFinite:
    """A scorer (the labelers' protocol) whose second image's score is NaN and third's inf."""

    name, version, higher_is_better = "odd", "1", True

    def score(self, images, prompts):
        return np.array([[1.0, math.nan, math.inf][i % 3] for i in range(len(images))], np.float32)


def test_a_non_finite_score_is_a_counted_keyed_skip_never_a_row(tmp_path, caplog):
    cands = write_candidates(tmp_path / "c", [png(Image.new("RGB", (64, 64), c)) for c in ("red", "green", "blue")])
    with caplog.at_level("WARNING", logger="prefpipe.label"):
        ds = score_candidates(cands, tmp_path / "scores", ["odd"], {}, progress=False, scorers=[NonFinite()])
    table = pl.read_parquet(parquet_files(ds.folder))
    assert table["candidate"].to_list() == [0] and np.isfinite(table["score"].to_numpy()).all()
    assert ds.stats()["nonfinite_scores"] == 2
    assert f"{prompt_id('p')}/1" in caplog.text and f"{prompt_id('p')}/2" in caplog.text and "odd gave" in caplog.text


# -- image sanity ----------------------------------------------------------------------------------------
def test_an_image_not_the_size_its_row_declares_is_skipped_not_scored(tmp_path):
    big = png(Image.effect_noise((64, 64), 60).convert("RGB"))
    tiny = png(Image.new("RGB", (1, 1), "white"))  # would win every compressibility pair
    cands = write_candidates(tmp_path / "c", [big, tiny, big])
    r = invoke("label", "--scorer", "compressibility", "--candidates", cands, "--out", tmp_path / "w", "--no-progress")
    assert r.exit_code == 0, r.output
    scores = pl.read_parquet(parquet_files(tmp_path / "w" / "scores"))
    assert sorted(scores["candidate"].to_list()) == [0, 2]
    assert read_manifest(tmp_path / "w" / "scores")["units"]["train-00000-of-00001.parquet"]["size_mismatch"] == 1


def test_odd_modes_become_8_bit_rgb_and_say_how():
    sixteen = Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16))
    assert sixteen.mode == "I;16"
    rgb, note = to_rgb(decode(png(sixteen)))
    # independent: 16-bit v -> round(v * 255 / 65535) in every channel (Pillow's own conversion clips to 255)
    assert np.asarray(rgb)[..., 0].tolist() == [[0, 100], [255, 7]] and "scaled to 8-bit" in note
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    rgb, note = to_rgb(decode(png(cmyk, "JPEG")))
    assert rgb.mode == "RGB" and "CMYK converted" in note
    palette = Image.new("P", (4, 4))
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)  # a palette image with a transparent colour
    rgb, note = to_rgb(decode(buf.getvalue()))
    assert rgb.mode == "RGB" and "alpha dropped" in note
    assert to_rgb(Image.new("RGB", (2, 2)))[1] is None


# -- one message per bad input -----------------------------------------------------------------------------
def test_a_non_utf8_prompts_file_names_the_file_and_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"a cat\na \xff dog\n")
    with pytest.raises(PrefpipeError, match=r"prompts.txt, line 2: not UTF-8"):
        read_prompts(f)
    r = invoke("generate", "--model", tmp_path, "--prompts", f, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "not UTF-8" in r.output


def test_a_text_file_named_parquet_in_a_pairs_folder_is_one_message_and_debug_shows_the_traceback(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train-00000-of-00001.parquet").write_text("not parquet")
    args = [sys.executable, "-m", "prefpipe", "train", "--model", str(tmp_path), "--pairs", str(folder),
            "--out", str(tmp_path / "run")]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1 and "train-00000-of-00001.parquet: not a readable Parquet file" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "prefpipe", "--debug", *args[3:]], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


# -- durability and concurrency -----------------------------------------------------------------------------
def _scores(unit: int) -> pa.Table:
    return pa.table({"prompt_id": [f"p{unit}"], "candidate": [0], "scorer": ["s"], "score": [1.0]})


def test_a_kill_after_the_last_rename_is_made_complete_by_the_rerun(tmp_path, monkeypatch):
    import prefpipe.core.dataset as dataset_module

    ds = ShardedDataset(tmp_path, "score", {"k": 1}, "fp", 2, SCORES).open()
    with ds.write_unit(0) as w:
        w.write(_scores(0))

    def killed_before_saying_so(self):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(dataset_module.ShardedDataset, "_mark_complete", killed_before_saying_so)
    with pytest.raises(KeyboardInterrupt):
        with ds.write_unit(1) as w:
            w.write(_scores(1))
    monkeypatch.undo()
    assert read_manifest(tmp_path)["complete"] is False and ds.pending() == []
    again = ShardedDataset(tmp_path, "score", {"k": 1}, "fp", 2, SCORES).open()  # the re-run
    assert again.pending() == [] and read_manifest(tmp_path)["complete"] is True
    assert read_manifest(tmp_path)["digest"]


_HOLD = """
import sys, time
from prefpipe.core.dataset import ShardedDataset
from prefpipe.core.schema import SCORES
ds = ShardedDataset(sys.argv[1], "score", {"k": 1}, "fp", 3, SCORES)
with ds.claim(1) as mine:
    print("held" if mine else "busy", flush=True)
    time.sleep(60)
"""


def test_a_second_launch_into_the_folder_skips_the_unit_a_live_process_holds(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        ds = ShardedDataset(tmp_path, "score", {"k": 1}, "fp", 3, SCORES).open()
        written = []
        for unit in ds.claim_each(ds.pending()):
            with ds.write_unit(unit) as w:
                w.write(_scores(unit))
            written.append(unit)
        assert written == [0, 2] and ds.busy == [1]
        with pytest.raises(PrefpipeError, match="another process is writing unit 1"):
            with ds.write_unit(1):
                pass
    finally:
        holder.kill()
        holder.wait()
    # its process gone, the unit is free again (the system released the lock)
    ds = ShardedDataset(tmp_path, "score", {"k": 1}, "fp", 3, SCORES).open()
    assert list(ds.claim_each(ds.pending())) == [1]


def test_temporary_names_say_whose_they_are(tmp_path):
    ds = ShardedDataset(tmp_path, "score", {"k": 1}, "fp", 1, SCORES).open()
    with ds.write_unit(0) as w:
        w.write(_scores(0))
        tmp = w.path.name
    assert str(os.getpid()) in tmp and os.uname().nodename in tmp


# -- property-based fuzzing of the boundaries ------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes_decode_to_an_image_or_a_bad_image(data):
    try:
        im = decode(data)
    except BadImage as e:
        assert str(e)
    else:
        assert im.width > 0 and im.height > 0
        assert to_rgb(im)[0].mode == "RGB"
    stored, why = ImageChecker("header").check(data)
    assert (stored is None) != (why is None)


@FUZZ
@given(st.binary(max_size=256), st.sampled_from([".txt", ".jsonl", ".csv", ".tsv", ".parquet"]))
def test_any_prompt_file_reads_or_stops_with_a_message(tmp_path_factory, data, suffix):
    f = tmp_path_factory.mktemp("p") / f"prompts{suffix}"
    f.write_bytes(data)
    try:
        ps = read_prompts(f)
    except PrefpipeError as e:
        assert str(f) in str(e)
    else:
        assert len(ps) >= 1 and all(p.strip() for p in ps.prompts)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3),
                          st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                    st.sampled_from([math.nan, math.inf, -math.inf]))), max_size=24),
       st.sampled_from(["best-worst", "all", "random-k"]), st.floats(0, 5))
def test_pairs_never_hold_a_non_finite_score_or_margin(rows, strategy, min_margin):
    rows = list({(p, c): (p, c, v) for p, c, v in rows}.values())  # one score per candidate
    scores = pl.DataFrame(rows, schema={"prompt_id": pl.String, "candidate": pl.Int32, "score": pl.Float32},
                          orient="row").with_columns(scorer=pl.lit("s"))
    df = build_pairs(scores, PairOptions(strategy=strategy, min_margin=min_margin))
    for col in ("score_0", "score_1", "margin"):
        assert np.isfinite(df[col].to_numpy()).all()


@FUZZ
@given(st.text(max_size=12))
def test_any_float_option_value_is_a_finite_number_or_a_usage_error(value):
    r = CliRunner().invoke(main, ["label", "--scorer", "compressibility", "--candidates", "nowhere", "--out", "o",
                                  "--min-margin", value])
    assert "Traceback" not in r.output
    assert r.exit_code in (1, 2)  # 2: the option itself is refused; 1: the option passed, the missing input is not
    if r.exit_code == 1:
        assert math.isfinite(float(value)) and float(value) >= 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n"])), min_size=1,
                max_size=4), st.integers(1, 8), st.integers(1, 8))
def test_label_on_random_image_bytes_finishes_with_counted_skips(tmp_path_factory, blobs, width, height):
    good = png(Image.new("RGB", (width, height), "red"))
    cands = write_candidates(tmp_path_factory.mktemp("c") / "c", [good, *blobs], width=width, height=height)
    out = tmp_path_factory.mktemp("w")
    r = invoke("label", "--scorer", "compressibility", "--candidates", cands, "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    scores = pl.read_parquet(parquet_files(out / "scores"))
    assert 0 in scores["candidate"].to_list() and np.isfinite(scores["score"].to_numpy()).all()
    stats = ShardedDataset(out / "scores", "score", {}, "", 1, SCORES).stats()
    assert stats["images"] + stats.get("bad_images", 0) + stats.get("size_mismatch", 0) == 1 + len(blobs)


COLUMN_TYPES = [pa.string(), pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.binary(), pa.bool_()]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["prompt_id", "prompt", "candidate", "image", "width", "height", "caption",
                                        "jpg_0", "jpg_1", "label_0", "extra"]),
                       st.sampled_from(range(len(COLUMN_TYPES))), min_size=1, max_size=8))
def test_a_table_of_any_schema_is_labelled_or_trained_or_refused_in_one_message(tmp_path_factory, columns):
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("schema")
    rows = 2
    values = {"string": ["x", ""], "int32": [1, 0], "int64": [7, -1], "float": [0.5, math.nan],
              "double": [1.0, math.inf], "binary": [png(Image.new("RGB", (8, 8))), b"junk"], "bool": [True, False]}
    table = pa.table({name: pa.array(values[str(COLUMN_TYPES[t])][:rows], COLUMN_TYPES[t]) for name, t in columns.items()})
    (root / "t").mkdir()
    pq.write_table(table, root / "t" / "train-00000-of-00001.parquet")
    for args in (["label", "--scorer", "compressibility", "--candidates", root / "t", "--out", root / "w", "--no-progress"],
                 ["label", "--scorer", "compressibility", "--pairs", root / "t", "--out", root / "w2", "--no-progress"]):
        r = invoke(*args)
        assert r.exit_code in (0, 1), r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        if r.exit_code == 1:
            assert r.output.startswith("Error:")
