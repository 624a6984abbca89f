import datasets
import pyarrow as pa
import pytest

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.schema import CANDIDATES, PAIRS, PICKAPIC_V2, SCORES, check_columns, conform


def test_pairs_schema_is_a_superset_of_pickapic_v2_with_the_same_types():
    for field in PICKAPIC_V2:
        assert PAIRS.field(field.name).type == field.type, field.name
    for ours in ("source", "scorer", "score_0", "score_1", "margin", "prompt_id"):
        assert ours in PAIRS.names


def test_documented_columns_exist():
    assert {"prompt_id", "prompt", "candidate", "seed", "image", "width", "height", "model", "scheduler", "steps",
            "guidance", "trajectory"} <= set(CANDIDATES.names)
    assert SCORES.names == ["prompt_id", "candidate", "scorer", "score"]


def test_conform_fills_absent_nullable_columns_and_casts():
    t = pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [1], "label_1": [0]})
    out = conform(t, PAIRS)
    assert out.schema == PAIRS
    assert out.column("label_0").to_pylist() == [1.0]
    assert out.column("user_id").null_count == 1


def test_conform_names_a_missing_required_column():
    with pytest.raises(PrefpipeError, match="column 'score'"):
        conform(pa.table({"prompt_id": ["a"], "candidate": [0], "scorer": ["x"]}), SCORES)


def test_check_columns_names_column_and_expected_type():
    schema = pa.schema([("caption", pa.string()), ("label_0", pa.string())])
    with pytest.raises(PrefpipeError, match="'jpg_0' is missing"):
        check_columns(schema, {"caption": pa.string(), "jpg_0": pa.binary()}, "pairs.parquet")
    with pytest.raises(PrefpipeError, match="'label_0' has type string, expected double"):
        check_columns(schema, {"label_0": pa.float64()}, "pairs.parquet")


def test_pairs_written_by_us_load_like_pickapic_in_datasets(tmp_path):
    import pyarrow.parquet as pq

    t = conform(pa.table({"caption": ["a", "b"], "jpg_0": [b"\x89PNG", b"x"], "jpg_1": [b"y", b"z"],
                          "label_0": [1.0, 0.0], "label_1": [0.0, 1.0]}), PAIRS)
    pq.write_table(t, tmp_path / "train-00000-of-00001.parquet")
    ds = datasets.load_dataset(str(tmp_path), split="train")
    assert ds.features["jpg_0"] == datasets.Value("binary")  # plain bytes, as the reference trainers need
    assert ds[0]["jpg_0"] == b"\x89PNG" and ds[1]["label_0"] == 0.0
