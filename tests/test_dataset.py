import json

import datasets
import polars as pl
import pyarrow as pa
import pytest

from prefpipe.core.dataset import ShardedDataset
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.schema import SCORES
from prefpipe.core.tables import MANIFEST, iter_batches, parquet_files, read_manifest, row_group_units


def _ds(folder, n_units=3, **options):
    return ShardedDataset(folder, "score", options or {"k": 1}, "fp0", n_units, SCORES)


def _rows(unit, n=2):
    return pa.table({"prompt_id": [f"p{unit}"] * n, "candidate": list(range(n)), "scorer": ["s"] * n,
                     "score": [float(unit)] * n})


def test_finished_units_are_skipped_and_recorded(tmp_path):
    ds = _ds(tmp_path).open()
    assert ds.pending() == [0, 1, 2]
    with ds.write_unit(1) as w:
        w.write(_rows(1))
        w.count("dropped_bad", 3)
    assert ds.pending() == [0, 2]
    m = read_manifest(tmp_path)
    assert m["units"]["train-00001-of-00003.parquet"] == {"rows": 2, "dropped_bad": 3}
    assert m["complete"] is False
    for u in (0, 2):
        with ds.write_unit(u) as w:
            w.write(_rows(u))
    assert read_manifest(tmp_path)["complete"] is True
    assert ds.stats() == {"rows": 6, "dropped_bad": 3}


def test_a_kill_between_recording_a_unit_and_its_rename_counts_it_once_after_the_rerun(tmp_path, monkeypatch):
    import prefpipe.core.dataset as dataset_module

    real_replace = dataset_module.os.replace

    def dies_at_the_shard_rename(src, dst):
        if str(dst).endswith(".parquet"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    ds = _ds(tmp_path).open()
    with ds.write_unit(0) as w:
        w.write(_rows(0))
        w.count("dropped_bad", 1)
    monkeypatch.setattr(dataset_module.os, "replace", dies_at_the_shard_rename)
    with pytest.raises(KeyboardInterrupt), ds.write_unit(1) as w:
        w.write(_rows(1))
        w.count("dropped_bad", 5)
    monkeypatch.setattr(dataset_module.os, "replace", real_replace)
    # the unit's counters were recorded, its shard never appeared: it is pending and not counted
    assert "train-00001-of-00003.parquet" in read_manifest(tmp_path)["units"]
    assert ds.pending() == [1, 2]
    assert ds.stats() == {"rows": 2, "dropped_bad": 1}
    for u in (1, 2):  # the re-run
        with ds.write_unit(u) as w:
            w.write(_rows(u))
            w.count("dropped_bad", 5 if u == 1 else 0)
    assert ds.stats() == {"rows": 6, "dropped_bad": 6}
    assert read_manifest(tmp_path)["complete"] is True


def test_a_failing_unit_leaves_no_shard_and_no_temporary_file(tmp_path):
    ds = _ds(tmp_path).open()
    with pytest.raises(RuntimeError), ds.write_unit(0) as w:
        w.write(_rows(0))
        raise RuntimeError("killed")
    assert not ds.is_done(0)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_stale_temporary_file_from_a_killed_run_is_replaced(tmp_path):
    ds = _ds(tmp_path).open()
    stale = tmp_path / ".train-00000-of-00003.parquet.99999.tmp"
    stale.write_bytes(b"half a file")
    with ds.write_unit(0) as w:
        w.write(_rows(0))
    assert not stale.exists() and ds.is_done(0)


def test_rerun_with_other_options_is_refused_and_nothing_is_lost(tmp_path):
    ds = _ds(tmp_path, steps=30).open()
    with ds.write_unit(0) as w:
        w.write(_rows(0))
    before = (tmp_path / "train-00000-of-00003.parquet").read_bytes()
    with pytest.raises(PrefpipeError) as e:
        _ds(tmp_path, steps=20).open()
    assert "steps: folder has 30, this run asks 20" in str(e.value)
    assert "choose a new --out" in str(e.value)
    with pytest.raises(PrefpipeError, match="input"):
        ShardedDataset(tmp_path, "score", {"steps": 30}, "other-input", 3, SCORES).open()
    with pytest.raises(PrefpipeError, match="output of 'score', not 'generate'"):
        ShardedDataset(tmp_path, "generate", {"steps": 30}, "fp0", 3, SCORES).open()
    assert (tmp_path / "train-00000-of-00003.parquet").read_bytes() == before
    _ds(tmp_path, steps=30).open()  # the same options resume


def test_folder_with_foreign_parquet_is_refused(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(_rows(0), tmp_path / "data.parquet")
    with pytest.raises(PrefpipeError, match="did not write"):
        _ds(tmp_path).open()


def test_ranks_take_disjoint_units_that_cover_all(tmp_path):
    ds = _ds(tmp_path, n_units=7)
    shares = [ds.units_for(r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(u for s in shares for u in s) == list(range(7))


def test_readers_stream_by_row_group_and_datasets_reads_the_folder(tmp_path):
    ds = _ds(tmp_path, n_units=2).open()
    for u in range(2):
        with ds.write_unit(u) as w:
            w.write(_rows(u, 3))
            w.write(_rows(u, 2))  # second row group
    assert len(row_group_units(tmp_path)) == 4
    batches = [b.num_rows for b in iter_batches(tmp_path, batch_size=2)]
    assert max(batches) <= 2 and sum(batches) == 10  # bounded batches, every row once
    assert pl.read_parquet(parquet_files(tmp_path)).height == 10
    loaded = datasets.load_dataset(str(tmp_path), split="train")  # ignores _prefpipe.json
    assert loaded.num_rows == 10 and loaded.column_names == SCORES.names
    assert json.loads((tmp_path / MANIFEST).read_text())["n_units"] == 2
