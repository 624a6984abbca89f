"""The ingest stage on fixtures written with exactly the published Pick-a-Pic v2 schema, and on HPDv2 layouts.

The Pick-a-Pic fixture (`FIXTURE`) holds one row per drop reason, so every counter has a known value;
`EXPECTED` is what the default options must report.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.prompts import prompt_id
from prefpipe.core.schema import PAIRS, PICKAPIC_V2
from prefpipe.core.tables import parquet_files, read_manifest
from prefpipe.stages.ingest import ingest
from prefpipe.stages.ingest.duplicates import plan_duplicates
from prefpipe.stages.ingest.hpdv2 import ingest_hpdv2, iter_json_array, ranking_pairs
from prefpipe.stages.ingest.options import IngestOptions
from prefpipe.stages.ingest.pickapic import StreamingSource, ingest_pickapic
from tests.conftest import REPO

# The published schema, stray pandas index included (PICKAPIC_V2 is it minus `__index_level_0__`).
PUBLISHED = pa.schema(list(PICKAPIC_V2) + [pa.field("__index_level_0__", pa.int64())])


# -- fixture writers (also used by benchmarks/ingest.py) -------------------------------------------
_JPEGS: dict[tuple, bytes] = {}


def jpeg(seed: int, side: int = 32, quality: int = 85) -> bytes:
    """A real JPEG, distinct per seed (a noisy gradient, so sizes are realistic for its side)."""
    key = (seed, side, quality)
    if key not in _JPEGS:
        rng = np.random.default_rng(seed)
        ramp = np.linspace(0, 255, side)[None, :, None] * rng.uniform(0.2, 1, 3)
        arr = (ramp + rng.normal(0, 25, (side, side, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        _JPEGS[key] = buf.getvalue()
    return _JPEGS[key]


def unique_jpeg(base: bytes, tag: int) -> bytes:
    """`base` made byte-distinct by a JPEG comment segment after SOI (still a valid, identical image)."""
    text = f"prefpipe {tag}".encode()
    return base[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + base[2:]


def row(caption, uid0, uid1, label_0, jpg_0=None, jpg_1=None, *, has_label=True, are_different=True,
        ranking_id=0, label_1=None, user_id=7, model_0="sdxl", model_1="sd21", n_per_prompt=1) -> dict:
    """One row in the published schema (images default to distinct JPEGs derived from the uids)."""
    label_1 = 1.0 - label_0 if label_1 is None else label_1
    best = uid0 if label_0 == 1 else uid1 if label_1 == 1 else None
    return {
        "are_different": are_different, "best_image_uid": best, "caption": caption,
        "created_at": dt.datetime(2023, 5, 1, 12, 0, 0), "has_label": has_label,
        "image_0_uid": uid0, "image_0_url": f"https://example.org/{uid0}.png",
        "image_1_uid": uid1, "image_1_url": f"https://example.org/{uid1}.png",
        "jpg_0": jpg_0 if jpg_0 is not None else jpeg(hash(uid0) % 10_000),
        "jpg_1": jpg_1 if jpg_1 is not None else jpeg(hash(uid1) % 10_000),
        "label_0": float(label_0), "label_1": float(label_1), "model_0": model_0, "model_1": model_1,
        "ranking_id": ranking_id, "user_id": user_id, "num_example_per_prompt": n_per_prompt,
    }


def write_pickapic(folder: Path, shards: list[list[dict]], split: str = "train", images: bool = True,
                   row_group_size: int | None = None, schema: pa.Schema = PUBLISHED) -> list[Path]:
    """Write `shards` in the published layout: data/<split>-NNNNN-of-NNNNN-<hash>.parquet."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    if not images:
        schema = pa.schema([f for f in schema if f.name not in ("jpg_0", "jpg_1")])
    paths, index = [], 0
    for k, rows in enumerate(shards):
        cols = {f.name: [r.get(f.name) for r in rows] for f in schema if f.name != "__index_level_0__"}
        if "__index_level_0__" in schema.names:
            cols["__index_level_0__"] = list(range(index, index + len(rows)))
        index += len(rows)
        path = data / f"{split}-{k:05d}-of-{len(shards):05d}-{1000 + k:016x}.parquet"
        pq.write_table(pa.table(cols, schema=schema), path, row_group_size=row_group_size or max(1, len(rows)))
        paths.append(path)
    return paths


def _jpeg_without_end() -> bytes:
    """A JPEG cut in its scan data: the header parses, the image does not decode."""
    full = jpeg(99, side=96)
    return full[: len(full) * 2 // 3]


# One row per reason; comments give the expected fate under the default options.
def fixture_shards() -> list[list[dict]]:
    twin = jpeg(500)
    g0, g1 = jpeg(600), jpeg(601)
    return [
        [
            row("a red cat", "A0", "A1", 1, ranking_id=1),                             # kept
            row("a blue dog", "B0", "B1", 0, ranking_id=2),                            # kept
            row("a tie", "C0", "C1", 0.5, ranking_id=3),                               # tie
            row("unlabeled", "D0", "D1", 0.5, has_label=False, ranking_id=4),          # unlabeled
            row("same", "E0", "E1", 1, twin, twin, are_different=False, ranking_id=5),  # same_images (flag)
            row("garbage", "F0", "F1", 1, b"not a jpeg at all", ranking_id=6),         # bad_image (header)
            row("   ", "G0", "G1", 1, ranking_id=7),                                   # empty_caption
            row("a red cat", "A1", "A0", 0, ranking_id=8),                             # duplicate (swapped, same winner)
            row("a blue dog", "B0", "B1", 1, ranking_id=9),                            # kept (a conflicting judgement)
            row("zero", "Z0", "Z1", 0, jpeg(7), b"", ranking_id=10),                   # bad_image (0 bytes)
        ],
        [
            row("a red cat", "A0", "A1", 1, ranking_id=11),                            # duplicate (other shard)
            row("a green bird", "H0", "H1", 1, g0, g1, ranking_id=12),                 # kept
            row("a green bird", "H2", "H3", 1, g0, g1, ranking_id=13),                 # duplicate (same bytes)
            row("odd label", "I0", "I1", 0.3, ranking_id=14),                          # bad_label
            row("a yellow sun", "J0", "J1", 0, ranking_id=15),                         # kept
            row("twins", "K0", "K1", 1, twin, twin, ranking_id=16),                    # same_images (bytes)
        ],
        [
            row("a purple fish", "L0", "L1", 1, ranking_id=17),                        # kept
            row("a purple fish", "L2", "L3", 0, ranking_id=18),                        # kept
            row("cut", "M0", "M1", 1, _jpeg_without_end(), ranking_id=19),             # bad_image (no end marker)
        ],
    ]


EXPECTED = {"rows_read": 19, "kept": 7, "dropped_unlabeled": 1, "dropped_bad_label": 1, "dropped_tie": 1,
            "dropped_same_images": 2, "dropped_empty_caption": 1, "dropped_duplicate": 3, "dropped_bad_image": 3}
KEPT_RANKINGS = [1, 2, 9, 12, 15, 17, 18]


@pytest.fixture
def pickapic(tmp_path) -> Path:
    folder = tmp_path / "pickapic_v2"
    write_pickapic(folder, fixture_shards())
    return folder


def _pairs(out: Path) -> pa.Table:
    return pq.read_table(parquet_files(out / "pairs" / "human"))


def _run(src, out, **opts) -> dict:
    return ingest_pickapic(src, out, IngestOptions(**opts), progress=False, rank=0, world=1)


# -- Pick-a-Pic ------------------------------------------------------------------------------------
def test_published_rows_are_counted_per_reason_and_kept_rows_are_pairs(pickapic, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="prefpipe.ingest"):
        counters = _run(pickapic, tmp_path / "work")
    assert {k: counters[k] for k in EXPECTED} == EXPECTED
    bad = [r.getMessage() for r in caplog.records]  # bad rows are logged with their key
    assert any("row 5 (ranking_id=6) image_0_uid=F0" in m and "train-00000-of-00003" in m for m in bad)
    assert any("ranking_id=10) image_1_uid=Z1: image is empty" in m for m in bad)
    assert any("ranking_id=19) image_0_uid=M0: OSError" in m for m in bad)
    assert any("ranking_id=14): labels (0.3, 0.7)" in m for m in bad)
    out = tmp_path / "work" / "pairs" / "human"
    assert pq.read_schema(parquet_files(out)[0]) == PAIRS
    t = _pairs(tmp_path / "work")
    assert t.column("ranking_id").to_pylist() == KEPT_RANKINGS  # (file, row) order
    assert "__index_level_0__" not in t.column_names
    for r in t.to_pylist():
        assert r["source"] == "human" and r["prompt_id"] == prompt_id(r["caption"])
        assert r["label_0"] + r["label_1"] == 1 and r["label_0"] in (0.0, 1.0)
        assert Image.open(io.BytesIO(r["jpg_0"])).format == "JPEG"
        assert r["scorer"] is None and r["score_0"] is None
    first = t.to_pylist()[0]  # published columns carried unchanged
    assert (first["image_0_uid"], first["model_1"], first["user_id"], first["best_image_uid"]) == ("A0", "sd21", 7, "A0")
    assert first["created_at"] == dt.datetime(2023, 5, 1, 12, 0, 0)
    m = read_manifest(out)
    assert {k: m["summary"][k] for k in EXPECTED} == EXPECTED and m["summary"]["prompts"] == 5
    assert m["complete"] and m["stage"] == "ingest pickapic"
    # the Diffusion-DPO reference trainers' loader reads the folder as the `train` split
    import datasets

    loaded = datasets.load_dataset(str(out), split="train")
    assert loaded.num_rows == 7 and loaded.features["jpg_0"].dtype == "binary"


@pytest.mark.parametrize("switch, changed", [
    ({"ties": "keep"}, {"kept": 8, "dropped_tie": 0, "ties_kept": 1}),
    ({"unlabeled": "keep"}, {"kept": 7, "dropped_unlabeled": 0, "dropped_tie": 2}),  # its labels are a tie
    ({"duplicates": "keep"}, {"kept": 10, "dropped_duplicate": 0}),
    ({"same_images": "keep"}, {"kept": 9, "dropped_same_images": 0}),
    ({"empty_captions": "keep"}, {"kept": 8, "dropped_empty_caption": 0}),
    ({"verify_images": "none"}, {"kept": 9, "dropped_bad_image": 1}),  # only the 0-byte image is still bad
    ({"verify_images": "full"}, {}),
])
def test_each_filter_can_be_switched_off(pickapic, tmp_path, switch, changed):
    counters = _run(pickapic, tmp_path / "work", **switch)
    assert {k: counters.get(k, 0) for k in {**EXPECTED, **changed}} == {**EXPECTED, **changed}
    labels = _pairs(tmp_path / "work").column("label_0").to_pylist()
    assert (0.5 in labels) == (switch == {"ties": "keep"})


def test_duplicates_are_global_and_do_not_depend_on_ranks_or_order_of_runs(pickapic, tmp_path):
    _run(pickapic, tmp_path / "single")
    for rank in (1, 0):  # rank 1 (the shard with a repeat of shard 0's row) finishes first
        ingest_pickapic(pickapic, tmp_path / "sharded", IngestOptions(), progress=False, rank=rank, world=2)
    assert _pairs(tmp_path / "sharded").equals(_pairs(tmp_path / "single"))
    total = read_manifest(tmp_path / "sharded" / "pairs" / "human")["summary"]
    assert {k: total[k] for k in EXPECTED} == EXPECTED


def test_the_duplicate_plan_keeps_the_first_occurrence_in_file_then_row_order():
    plan = plan_duplicates(iter([(0, [0, 1, 2], [5, 6, 5]), (1, [], []), (2, [0, 3], [6, 7]), (3, [1, 2], [7, 5])]))
    assert {u: rows.tolist() for u, rows in plan.items()} == {0: [2], 2: [0], 3: [1, 2]}


def test_the_no_images_variant_gives_captions_and_labels_only(tmp_path):
    write_pickapic(tmp_path / "noimg", fixture_shards(), images=False)
    counters = _run(tmp_path / "noimg", tmp_path / "work")
    # no image checks: the bad images, the byte-level duplicate and the byte twins stay
    assert counters["kept"] == 7 + 3 + 1 + 1 and counters.get("dropped_bad_image", 0) == 0
    t = _pairs(tmp_path / "work")
    assert t.schema == PAIRS and t.column("jpg_0").null_count == t.num_rows


@pytest.mark.parametrize("change, message", [
    (lambda s: s.remove(s.get_field_index("has_label")), "column 'has_label' is missing (expected bool)"),
    (lambda s: s.set(s.get_field_index("label_0"), pa.field("label_0", pa.string())),
     "column 'label_0' has type string, expected double"),
    (lambda s: s.set(s.get_field_index("jpg_1"), pa.field("jpg_1", pa.string())),
     "column 'jpg_1' has type string, expected binary"),
    (lambda s: s.remove(s.get_field_index("jpg_0")), "column 'jpg_0' is missing"),
])
def test_a_wrong_schema_stops_at_once_naming_the_column(tmp_path, change, message):
    schema = change(PUBLISHED)
    rows = [{**r, "label_0": str(r["label_0"]) if schema.field("label_0").type == pa.string() else r["label_0"],
             "jpg_1": "x" if "jpg_1" in schema.names and schema.field("jpg_1").type == pa.string() else r["jpg_1"]}
            for r in fixture_shards()[0]]
    write_pickapic(tmp_path / "bad", [rows], schema=schema)
    with pytest.raises(PrefpipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(tmp_path / "bad", tmp_path / "work")
    assert not (tmp_path / "work" / "pairs" / "human").exists()


def test_max_side_reencodes_large_images_keeping_the_aspect_ratio(tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 120, 3), np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    write_pickapic(tmp_path / "pp", [[row("wide", "W0", "W1", 1, buf.getvalue(), jpeg(3, side=16))]])
    counters = _run(tmp_path / "pp", tmp_path / "work", max_side=40)
    assert counters["images_resized"] == 1
    r = _pairs(tmp_path / "work").to_pylist()[0]
    im0 = Image.open(io.BytesIO(r["jpg_0"]))
    assert (im0.format, im0.size) == ("JPEG", (40, 20))
    assert r["jpg_1"] == jpeg(3, side=16)  # small enough: bytes untouched


def test_limit_takes_the_first_rows_in_file_order(pickapic, tmp_path):
    counters = _run(pickapic, tmp_path / "work", limit=12)
    assert counters["rows_read"] == 12
    assert _pairs(tmp_path / "work").column("ranking_id").to_pylist() == [1, 2, 9, 12]
    assert len(parquet_files(tmp_path / "work" / "pairs" / "human")) == 2


def test_the_split_comes_from_the_published_file_names(tmp_path):
    shards = fixture_shards()
    write_pickapic(tmp_path / "pp", shards[:2], split="train")
    write_pickapic(tmp_path / "pp", [shards[2]], split="validation")
    write_pickapic(tmp_path / "pp", [shards[0][:2]], split="validation_unique")
    assert _run(tmp_path / "pp", tmp_path / "val", split="validation")["rows_read"] == 3
    assert _run(tmp_path / "pp", tmp_path / "train")["rows_read"] == 16
    with pytest.raises(PrefpipeError, match="no 'test' files; splits present: train, validation, validation_unique"):
        _run(tmp_path / "pp", tmp_path / "test", split="test")


def test_a_rerun_with_other_filters_is_refused(pickapic, tmp_path):
    _run(pickapic, tmp_path / "work")
    with pytest.raises(PrefpipeError, match="ties: folder has 'drop', this run asks 'keep'"):
        _run(pickapic, tmp_path / "work", ties="keep")
    assert _run(pickapic, tmp_path / "work")["units_skipped"] == 3  # the same options resume (nothing left)


def test_datasets_streaming_reads_the_same_pairs_as_local_files(pickapic, tmp_path):
    """The hub path (units = data files, light columns projected) run by `datasets` on local files."""
    import datasets

    files = [str(f) for f in sorted((pickapic / "data").glob("*.parquet"))]

    def builder_for(columns):
        kw = {"columns": columns} if columns else {}
        return datasets.load_dataset_builder("parquet", data_files={"train": files}, **kw)

    src = StreamingSource(builder_for, "train", "local-parquet")
    assert src.n_units == 3
    counters = _run(src, tmp_path / "streamed")
    assert {k: counters[k] for k in EXPECTED} == EXPECTED
    _run(pickapic, tmp_path / "local")
    assert _pairs(tmp_path / "streamed").equals(_pairs(tmp_path / "local"))


def test_a_hub_id_without_network_stops_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(PrefpipeError, match=r"(?s)hub could not be reached.*hf download yuvalkirstain/pickapic_v2"):
        _run("yuvalkirstain/pickapic_v2", tmp_path / "work")
    with pytest.raises(PrefpipeError, match="no such file or folder"):
        _run(str(tmp_path / "nowhere" / "data"), tmp_path / "work")


_SLOW_RUN = """
import sys, time
import prefpipe.stages.ingest.pickapic as m
from prefpipe.stages.ingest.options import IngestOptions
from prefpipe.stages.ingest.pickapic import ingest_pickapic
slow = m.pickapic_unit
def unit(*a, **k):
    time.sleep(0.4)  # make the window between shards wide enough to kill in
    return slow(*a, **k)
m.pickapic_unit = unit
ingest_pickapic(sys.argv[1], sys.argv[2], IngestOptions(), progress=False)
"""


def test_a_killed_multi_shard_ingest_resumes_to_the_same_table(tmp_path):
    shards = [[row(f"prompt {s}", f"U{s}_{i}", f"V{s}_{i}", i % 2, ranking_id=100 * s + i) for i in range(4)]
              + [row(f"prompt {s}", f"U{s}_0", f"V{s}_0", 0, ranking_id=100 * s + 9)]  # a duplicate
              + [row("prompt 0", "U0_1", "V0_1", 1, ranking_id=100 * s + 8)]  # a duplicate of shard 0's row
              for s in range(8)]
    write_pickapic(tmp_path / "pp", shards)
    reference = _run(tmp_path / "pp", tmp_path / "uninterrupted")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(tmp_path / "pp"), str(out)],
                            cwd=REPO, stderr=subprocess.DEVNULL)
    folder = out / "pairs" / "human"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(folder.glob("train-*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(folder.glob("train-*.parquet")))
    assert 3 <= done < 8, "the kill must land mid-run"
    resumed = _run(tmp_path / "pp", out)
    assert resumed["units_skipped"] == done and resumed["units_written"] == 8 - done
    assert _pairs(out).equals(_pairs(tmp_path / "uninterrupted"))
    assert resumed["total"] == reference["total"]
    assert reference["total"]["dropped_duplicate"] == 8 + 8  # each shard's own repeat + its repeat of shard 0
    assert not list(folder.glob(".*.tmp"))


# -- HPDv2 -----------------------------------------------------------------------------------------
def _write_image(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg(seed))
    return path.name


@pytest.fixture
def hpdv2(tmp_path) -> Path:
    root = tmp_path / "HPD"
    for i, name in enumerate("abcde"):
        _write_image(root / "train" / f"{name}.jpg", 1000 + i)
    (root / "train" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    for i, name in enumerate("xyzw"):
        _write_image(root / "test" / f"{name}.jpg", 2000 + i)
    train = [
        {"prompt": "a cat", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0], "user_hash": "u1"},  # kept
        {"prompt": "a dog", "image_path": ["c.jpg", "d.jpg"], "human_preference": [0, 1]},  # kept (alias key)
        {"prompt": "a cat", "file_path": ["b.jpg", "a.jpg"], "human_preference": [0, 1]},  # duplicate (swapped)
        {"prompt": "lost", "file_path": ["e.jpg", "missing.jpg"], "human_preference": [1, 0]},  # bad image
        {"prompt": "odd", "file_path": ["a.jpg", "c.jpg"], "human_preference": [1]},  # bad entry
        {"prompt": "  ", "file_path": ["a.jpg", "c.jpg"], "human_preference": [1, 0]},  # empty caption
        {"prompt": "same", "file_path": ["a.jpg", "a.jpg"], "human_preference": [1, 0]},  # same images
        {"prompt": "broken", "file_path": ["broken.jpg", "a.jpg"], "human_preference": [0, 1]},  # bad image
    ]
    test = [{"prompt": "four", "image_path": ["x.jpg", "y.jpg", "z.jpg", "w.jpg"], "rank": [1, 2, 3, 3],
             "raw_annotation": [{"rank": [1, 2, 3, 4], "user_hash": "u2"}]}]
    (root / "train.json").write_text(json.dumps(train, indent=1))
    (root / "test.json").write_text(json.dumps(test))
    return root


def test_hpdv2_train_rankings_become_pairs_with_counted_drops(hpdv2, tmp_path):
    c = ingest_hpdv2(hpdv2, tmp_path / "work", IngestOptions(entries_per_shard=3), progress=False, rank=0, world=1)
    assert (c["entries_read"], c["bad_entries"], c["pairs_read"], c["kept"]) == (8, 1, 7, 2)
    assert (c["dropped_duplicate"], c["dropped_bad_image"], c["dropped_empty_caption"], c["dropped_same_images"]) == (1, 2, 1, 1)
    t = _pairs(tmp_path / "work")
    assert t.schema == PAIRS and len(parquet_files(tmp_path / "work" / "pairs" / "human")) == 3
    cat, dog = t.to_pylist()
    assert (cat["caption"], cat["image_0_uid"], cat["label_0"], cat["best_image_uid"]) == ("a cat", "a.jpg", 1.0, "a.jpg")
    assert (dog["label_0"], dog["label_1"], dog["ranking_id"], dog["source"]) == (0.0, 1.0, 1, "human")
    assert cat["jpg_0"] == (hpdv2 / "train" / "a.jpg").read_bytes() and cat["prompt_id"] == prompt_id("a cat")


@pytest.mark.parametrize("mode, ties, expected", [
    ("all", "drop", [(0, 1, 1.0), (0, 2, 1.0), (0, 3, 1.0), (1, 2, 1.0), (1, 3, 1.0)]),
    ("all", "keep", [(0, 1, 1.0), (0, 2, 1.0), (0, 3, 1.0), (1, 2, 1.0), (1, 3, 1.0), (2, 3, 0.5)]),
    ("best-worst", "drop", [(0, 2, 1.0)]),
])
def test_hpdv2_test_ranks_give_all_pairs_or_best_worst(hpdv2, tmp_path, mode, ties, expected):
    c = ingest_hpdv2(hpdv2, tmp_path / "w", IngestOptions(split="test", pairs=mode, ties=ties),
                     progress=False, rank=0, world=1)
    names = ["x.jpg", "y.jpg", "z.jpg", "w.jpg"]
    got = [(names.index(r["image_0_uid"]), names.index(r["image_1_uid"]), r["label_0"]) for r in _pairs(tmp_path / "w").to_pylist()]
    assert got == expected and c["kept"] == len(expected)
    assert c.get("dropped_tie", 0) == (1 if (mode, ties) == ("all", "drop") else 0)


def test_ranking_pairs_label_the_better_image():
    assert ranking_pairs([0.0, 1.0], "all") == [(0, 1, 0.0)]
    assert ranking_pairs([-1.0, -1.0, -3.0], "best-worst") == [(0, 2, 1.0)]
    assert ranking_pairs([2.0, 2.0], "best-worst") == [(0, 1, 0.5)]


def test_a_file_that_is_not_hpdv2_stops_at_once(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"caption": "x", "images": ["a.jpg"]}]))
    with pytest.raises(PrefpipeError, match="not an HPDv2 annotation file: entry 0"):
        ingest_hpdv2(tmp_path, tmp_path / "w", progress=False, rank=0, world=1)
    with pytest.raises(PrefpipeError, match=r"no test.json \(JSON files present: train.json\)"):
        ingest_hpdv2(tmp_path, tmp_path / "w", IngestOptions(split="test"), progress=False, rank=0, world=1)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_the_json_array_streams_in_chunks_of_any_size(tmp_path, chunk):
    entries = [{"prompt": "a \"quoted\" [bracket], {brace}", "n": [1, 2, 3]}, 12345, "s", [], {"k": None}]
    path = tmp_path / "a.json"
    path.write_text("  [\n" + ",\n ".join(json.dumps(e) for e in entries) + "\n]\n")
    assert list(iter_json_array(path, chunk_size=chunk)) == entries
    path.write_text(json.dumps(entries)[:-3])
    with pytest.raises(PrefpipeError, match="not closed|malformed"):
        list(iter_json_array(path, chunk_size=chunk))


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_runs_both_sources_and_prints_a_one_line_summary(pickapic, hpdv2, tmp_path):
    runner = CliRunner()
    result = runner.invoke(ingest, ["pickapic", "--from", str(pickapic / "data"), "--out", str(tmp_path / "w1"),
                                    "--no-progress", "--ties", "keep"])
    assert result.exit_code == 0, result.output
    assert "ingest pickapic: read 19 rows, kept 8 pairs over 6 prompts; dropped" in result.output
    result = runner.invoke(ingest, ["hpdv2", "--from", str(hpdv2), "--out", str(tmp_path / "w2"), "--no-progress",
                                    "--split", "test", "--pairs", "best-worst"])
    assert result.exit_code == 0, result.output
    assert "ingest hpdv2: read 1 entries (1 candidate pairs), kept 1 pairs over 1 prompts" in result.output
    result = runner.invoke(ingest, ["pickapic", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "w3")])
    assert result.exit_code == 1 and "Error: --from" in result.output and "Traceback" not in result.output


def test_ingested_pairs_train_with_source_human(pickapic, tmp_path, tiny_sd15):
    """The whole human path: published shards -> ingest -> `prefpipe train --source human` -> a LoRA."""
    import json

    from tests.conftest import run_cli

    work = tmp_path / "work"
    _run(pickapic, work)
    run_cli("train", "--model", tiny_sd15, "--source", "human", "--workdir", work, "--out", tmp_path / "run",
            "--max-steps", "2", "--batch-size", "2", "--resolution", "32", "--no-progress",
            env={"OMP_NUM_THREADS": "1"})
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(np.isfinite(m["loss"]) for m in lines)
