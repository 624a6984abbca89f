"""Issue 16, a fuzz pass over `prefpipe ingest`: hostile or broken inputs.

- HPDv2 image paths are confined to the folder given as --from (absolute paths, `../`, symlinks out);
  such pairs are dropped as `outside_folder`, logged with their key, and the file is never opened.
- Rows dropped by the filters (unlabeled, tie, same images, empty caption, duplicate) are logged with their
  key, like the faults, for both sources (INFO; the faults stay at WARNING).
- A file named *.parquet that is not Parquet, a truncated shard, a shard corrupt mid-run, or a JSON file that
  is not UTF-8: one message naming the file, exit 1, no traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from prefpipe.core.tables import parquet_files, read_manifest
from prefpipe.stages.ingest import ingest
from prefpipe.stages.ingest.hpdv2 import ingest_hpdv2
from prefpipe.stages.ingest.options import IngestOptions
from prefpipe.stages.ingest.pickapic import ingest_pickapic
from tests.test_ingest import fixture_shards, jpeg, row, unique_jpeg, write_pickapic

SECRET = b"SECRET: a file outside the input folder"


def _hpdv2(tmp_path: Path, entries: list, images: dict[str, bytes], split: str = "train") -> Path:
    root = tmp_path / "HPD"
    (root / split).mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (root / split / name).write_bytes(data)
    (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def _ingest_hpdv2(root: Path, out: Path, **opts) -> dict:
    return ingest_hpdv2(root, out, IngestOptions(**opts), progress=False, rank=0, world=1)


def _stored_images(out: Path) -> list[bytes]:
    t = pq.read_table(parquet_files(out / "pairs" / "human"), columns=["jpg_0", "jpg_1"])
    return t.column("jpg_0").to_pylist() + t.column("jpg_1").to_pylist()


def _messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "prefpipe.ingest" and r.levelno == level]


# -- 1. HPDv2 image paths stay inside the folder given -------------------------------------------------
def test_hpdv2_paths_outside_the_folder_are_dropped_logged_and_never_read(tmp_path, caplog, monkeypatch):
    secret = tmp_path / "secret.jpg"  # beside the HPDv2 folder, not in it
    secret.write_bytes(SECRET)
    entries = [
        {"prompt": "inside", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]},  # kept
        {"prompt": "absolute", "file_path": ["a.jpg", str(secret)], "human_preference": [1, 0]},
        {"prompt": "dotdot", "file_path": ["../../secret.jpg", "b.jpg"], "human_preference": [0, 1]},
        {"prompt": "symlink", "file_path": ["a.jpg", "link.jpg"], "human_preference": [1, 0]},
        {"prompt": "dotdot inside", "file_path": ["../train/c.jpg", "a.jpg"], "human_preference": [1, 0]},  # kept
    ]
    root = _hpdv2(tmp_path, entries, {"a.jpg": jpeg(1), "b.jpg": jpeg(2), "c.jpg": jpeg(3)})
    (root / "train" / "link.jpg").symlink_to(secret)
    opened: list[Path] = []
    read_bytes = Path.read_bytes

    def spy(self):
        opened.append(self.resolve())
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", spy)
    with caplog.at_level(logging.INFO, logger="prefpipe.ingest"):
        c = _ingest_hpdv2(root, tmp_path / "work", verify_images="none")  # no check would catch the bytes
    assert (c["pairs_read"], c["kept"], c["dropped_outside_folder"], c.get("dropped_bad_image", 0)) == (5, 2, 3, 0)
    assert secret.resolve() not in opened  # never opened
    assert SECRET not in _stored_images(tmp_path / "work")
    warned = _messages(caplog, logging.WARNING)
    for key in (f"train.json entry 1 image {secret}", "train.json entry 2 image ../../secret.jpg",
                "train.json entry 3 image link.jpg"):
        assert any(m.startswith(f"skipped outside_folder: {key}: ") and "outside the input folder" in m
                   for m in warned), (key, warned)
    summary = read_manifest(tmp_path / "work" / "pairs" / "human")["summary"]
    assert summary["dropped_outside_folder"] == 3 and summary["kept"] == 2


def test_hpdv2_outside_pairs_show_in_the_summary_line(tmp_path):
    entries = [{"prompt": "p", "file_path": ["a.jpg", "/etc/hostname"], "human_preference": [1, 0]},
               {"prompt": "q", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]}]
    root = _hpdv2(tmp_path, entries, {"a.jpg": jpeg(1), "b.jpg": jpeg(2)})
    result = CliRunner().invoke(ingest, ["hpdv2", "--from", str(root), "--out", str(tmp_path / "w"),
                                         "--no-progress", "--verify-images", "none"])
    assert result.exit_code == 0, result.output
    assert "kept 1 pairs over 1 prompts; dropped outside folder 1;" in result.output


def test_hpdv2_a_split_folder_that_is_a_link_is_inside(tmp_path):
    """The split folder may be a link to another disk: what it holds counts as inside."""
    elsewhere = tmp_path / "disk2" / "train"
    elsewhere.mkdir(parents=True)
    for name, seed in (("a.jpg", 1), ("b.jpg", 2)):
        (elsewhere / name).write_bytes(jpeg(seed))
    root = tmp_path / "HPD"
    root.mkdir()
    (root / "train").symlink_to(elsewhere)
    (root / "train.json").write_text(json.dumps([{"prompt": "p", "file_path": ["a.jpg", "b.jpg"],
                                                  "human_preference": [1, 0]}]))
    c = _ingest_hpdv2(root, tmp_path / "w")
    assert c["kept"] == 1 and c.get("dropped_outside_folder", 0) == 0


def test_hpdv2_unusable_paths_are_bad_images_not_a_crash(tmp_path, caplog):
    entries = [{"prompt": "nul", "file_path": ["a.jpg", "b\x00.jpg"], "human_preference": [1, 0]},
               {"prompt": "loop", "file_path": ["a.jpg", "loop.jpg"], "human_preference": [1, 0]},
               {"prompt": "ok", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]}]
    root = _hpdv2(tmp_path, entries, {"a.jpg": jpeg(1), "b.jpg": jpeg(2)})
    (root / "train" / "loop.jpg").symlink_to(root / "train" / "loop.jpg")
    with caplog.at_level(logging.WARNING, logger="prefpipe.ingest"):
        c = _ingest_hpdv2(root, tmp_path / "w")
    assert (c["kept"], c["dropped_bad_image"]) == (1, 2)
    warned = _messages(caplog, logging.WARNING)
    assert any(m.startswith("skipped bad_image: train.json entry 0 image b\x00.jpg: cannot read") for m in warned)
    assert any(m.startswith("skipped bad_image: train.json entry 1 image loop.jpg: cannot read") for m in warned)


# -- 2. every dropped row is logged with its key -----------------------------------------------------
def test_pickapic_filter_drops_are_logged_with_their_keys(tmp_path, caplog):
    write_pickapic(tmp_path / "pp", fixture_shards())
    with caplog.at_level(logging.INFO, logger="prefpipe.ingest"):
        c = ingest_pickapic(tmp_path / "pp", tmp_path / "work", IngestOptions(), progress=False, rank=0, world=1)
    shard0, shard1 = (f.name for f in sorted((tmp_path / "pp" / "data").glob("*.parquet"))[:2])
    info = _messages(caplog, logging.INFO)
    expected = [
        f"skipped unlabeled: {shard0} row 3 (ranking_id=4): has_label is false",
        f"skipped tie: {shard0} row 2 (ranking_id=3): labels (0.5, 0.5): a tie",
        f"skipped same_images: {shard0} row 4 (ranking_id=5): are_different is false",
        f"skipped empty_caption: {shard0} row 6 (ranking_id=7): the caption is empty or blank",
        f"skipped duplicate: {shard0} row 7 (ranking_id=8): repeats an earlier pair (same caption, same image uids",
        f"skipped duplicate: {shard1} row 0 (ranking_id=11): repeats an earlier pair (same caption, same image uids",
        f"skipped duplicate: {shard1} row 2 (ranking_id=13): repeats an earlier pair of this shard (same caption, "
        "same image bytes",
        f"skipped same_images: {shard1} row 5 (ranking_id=16): the two images have identical bytes",
    ]
    for line in expected:
        assert any(m.startswith(line) for m in info), (line, info)
    drops = sum(c.get(f"dropped_{r}", 0) for r in ("unlabeled", "tie", "same_images", "empty_caption", "duplicate"))
    assert len(info) == drops == 8  # each filter drop once, at INFO
    warned = _messages(caplog, logging.WARNING)  # the faults stay warnings, and the only examples
    assert len(warned) == c["dropped_bad_label"] + c["dropped_bad_image"] == 4
    assert len(c["bad_row_examples"]) == 4
    assert all(e.split(":")[0] in ("bad_label", "bad_image") for e in c["bad_row_examples"])


def test_filter_drops_are_logged_up_to_the_cap_per_reason(tmp_path, caplog):
    rows = [row(f"tie {i}", f"T{i}", f"U{i}", 0.5, unique_jpeg(jpeg(1), i), unique_jpeg(jpeg(2), i),
                ranking_id=i) for i in range(60)]
    write_pickapic(tmp_path / "pp", [rows])
    with caplog.at_level(logging.INFO, logger="prefpipe.ingest"):
        c = ingest_pickapic(tmp_path / "pp", tmp_path / "w", IngestOptions(), progress=False, rank=0, world=1)
    info = _messages(caplog, logging.INFO)
    assert c["dropped_tie"] == 60
    assert sum(m.startswith("skipped tie: ") for m in info) == 50
    assert info[-1] == "more tie rows are not logged (see the counts in the summary)"


def test_hpdv2_filter_drops_are_logged_with_their_keys(tmp_path, caplog):
    twin = jpeg(7)
    entries = [
        {"prompt": "a cat", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]},  # kept
        {"prompt": "tie", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 1]},  # tie
        {"prompt": "same", "file_path": ["a.jpg", "./a.jpg"], "human_preference": [1, 0]},  # same path
        {"prompt": " ", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]},  # empty caption
        {"prompt": "a cat", "file_path": ["b.jpg", "a.jpg"], "human_preference": [0, 1]},  # duplicate (paths)
        {"prompt": "twins", "file_path": ["t1.jpg", "t2.jpg"], "human_preference": [1, 0]},  # same bytes
        {"prompt": "a cat", "file_path": ["c.jpg", "b.jpg"], "human_preference": [1, 0]},  # duplicate (bytes)
    ]
    root = _hpdv2(tmp_path, entries, {"a.jpg": jpeg(1), "b.jpg": jpeg(2), "c.jpg": jpeg(1),
                                      "t1.jpg": twin, "t2.jpg": twin})
    with caplog.at_level(logging.INFO, logger="prefpipe.ingest"):
        c = _ingest_hpdv2(root, tmp_path / "w")
    assert (c["kept"], c["dropped_tie"], c["dropped_same_images"], c["dropped_empty_caption"],
            c["dropped_duplicate"]) == (1, 1, 2, 1, 2)
    info = _messages(caplog, logging.INFO)
    for line in ("skipped tie: train.json entry 1 images a.jpg, b.jpg: the two images are ranked equal",
                 "skipped same_images: train.json entry 2 images a.jpg, ./a.jpg: the same image path twice",
                 "skipped empty_caption: train.json entry 3 images a.jpg, b.jpg: the prompt is empty",
                 "skipped duplicate: train.json entry 4 images b.jpg, a.jpg: repeats an earlier pair (same prompt, "
                 "same image paths",
                 "skipped same_images: train.json entry 5 images t1.jpg, t2.jpg: the two images have identical bytes",
                 "skipped duplicate: train.json entry 6 images c.jpg, b.jpg: repeats an earlier pair of this shard"):
        assert any(m.startswith(line) for m in info), (line, info)
    assert len(info) == 6 and not _messages(caplog, logging.WARNING)


# -- 3. unreadable Parquet files: one message naming the file ----------------------------------------
def _cli_pickapic(source: Path, out: Path):
    return CliRunner().invoke(ingest, ["pickapic", "--from", str(source), "--out", str(out), "--no-progress"])


def _assert_clean_error(result, *names: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output and "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    for name in names:
        assert name in result.output, (name, result.output)


@pytest.mark.parametrize("name", ["notes.parquet", "train-00009-of-00010-0000.parquet"])
def test_a_text_file_named_parquet_stops_naming_it(tmp_path, name):
    write_pickapic(tmp_path / "pp", fixture_shards()[:1])
    if not name.startswith("train-"):  # plain names: every file of the folder is read
        for f in (tmp_path / "pp" / "data").glob("*.parquet"):
            f.rename(f.with_name("shard.parquet"))
    (tmp_path / "pp" / "data" / name).write_text("these are my notes, not a Parquet file\n")
    result = _cli_pickapic(tmp_path / "pp", tmp_path / "w")
    _assert_clean_error(result, name, "not a Parquet file", "Remove it")
    assert not (tmp_path / "w" / "pairs" / "human").exists()


def test_a_truncated_shard_stops_naming_it(tmp_path):
    files = write_pickapic(tmp_path / "pp", fixture_shards())
    files[1].write_bytes(files[1].read_bytes()[: files[1].stat().st_size // 2])
    result = _cli_pickapic(tmp_path / "pp", tmp_path / "w")
    _assert_clean_error(result, files[1].name, "truncated or corrupt")


def _corrupt_column(path: Path, column: str) -> None:
    """Overwrite the start of `column`'s first column chunk (its page header): the footer stays valid."""
    md = pq.ParquetFile(path).metadata.row_group(0)
    col = next(md.column(c) for c in range(md.num_columns) if md.column(c).path_in_schema == column)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))


def test_a_shard_corrupt_mid_run_stops_naming_it_and_the_run_resumes_once_fixed(tmp_path):
    files = write_pickapic(tmp_path / "pp", fixture_shards())
    good = files[1].read_bytes()
    _corrupt_column(files[1], "jpg_0")  # met only when unit 1 reads its images, after unit 0 is written
    result = _cli_pickapic(tmp_path / "pp", tmp_path / "w")
    _assert_clean_error(result, files[1].name, "truncated or corrupt", "a re-run resumes")
    folder = tmp_path / "w" / "pairs" / "human"
    assert [f.name for f in parquet_files(folder)] == ["train-00000-of-00003.parquet"]
    files[1].write_bytes(good)  # downloaded again
    c = ingest_pickapic(tmp_path / "pp", tmp_path / "w", IngestOptions(), progress=False, rank=0, world=1)
    assert (c["units_skipped"], c["units_written"], c["total"]["kept"]) == (1, 2, 7)


def test_a_corrupt_light_column_stops_at_the_start_naming_the_file(tmp_path):
    files = write_pickapic(tmp_path / "pp", fixture_shards())
    _corrupt_column(files[2], "caption")  # read up front (the input's fingerprint, the duplicate plan)
    result = _cli_pickapic(tmp_path / "pp", tmp_path / "w")
    _assert_clean_error(result, files[2].name, "truncated or corrupt")
    assert not list((tmp_path / "w" / "pairs" / "human").glob("*.parquet"))


# -- 4. a JSON file that is not UTF-8 ------------------------------------------------------------------
def test_a_non_utf8_hpdv2_json_stops_naming_the_file(tmp_path):
    root = _hpdv2(tmp_path, [], {"a.jpg": jpeg(1), "b.jpg": jpeg(2)})
    (root / "train.json").write_bytes(
        b'[{"prompt": "a", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]},\n'
        b' {"prompt": "caf\xe9", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]}]'
    )
    result = CliRunner().invoke(ingest, ["hpdv2", "--from", str(root), "--out", str(tmp_path / "w"), "--no-progress"])
    _assert_clean_error(result, str(root / "train.json"), "not UTF-8 text (in entry 1)")
