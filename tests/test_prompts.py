import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.prompts import prompt_id, read_prompts


def test_prompt_id_is_stable_and_ignores_surrounding_whitespace():
    assert prompt_id("a red cat") == prompt_id("  a red cat\n")
    assert prompt_id("a red cat") != prompt_id("a red Cat")
    assert len(prompt_id("x")) == 16


def test_txt_skips_blank_lines_and_merges_duplicates(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cat\n\n  \na blue dog\na red cat\n a blue dog \nsun\n")
    ps = read_prompts(f)
    assert ps.prompts == ["a red cat", "a blue dog", "sun"]
    assert (ps.read, ps.blank, ps.duplicates) == (7, 2, 2)
    assert len(set(ps.ids)) == 3


def test_jsonl_and_parquet_accept_prompt_or_caption_columns(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps({"caption": c, "other": 1}) for c in ["x", "y", "x"]))
    assert read_prompts(j).prompts == ["x", "y"]
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["u", None, "v"]}), p)
    ps = read_prompts(p)
    assert ps.prompts == ["u", "v"] and ps.blank == 1


def test_partiprompts_tsv_reads_all_distinct_prompts(parti_prompts):
    ps = read_prompts(parti_prompts)
    lines = parti_prompts.read_text(encoding="utf-8").splitlines()[1:]
    distinct = {line.split("\t")[0].strip() for line in lines if line.split("\t")[0].strip()}
    assert len(ps) == len(distinct)
    assert ps.prompts[0] == "bond"
    assert read_prompts(parti_prompts, limit=10).prompts == ps.prompts[:10]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "\n\n  \n", "no prompts in the file"),
        ("bad.tsv", "Text\tCategory\nhello\tx\n", "no prompt column; expected one of prompt, caption, Prompt"),
        ("bad.jsonl", '{"prompt": "a"}\n{not json\n', "line 2: not valid JSON"),
        ("p.yaml", "- a\n", "unsupported prompt file type '.yaml'"),
    ],
)
def test_bad_prompt_files_name_the_file_and_problem(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PrefpipeError, match=message) as e:
        read_prompts(f)
    assert name in str(e.value)


def test_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(PrefpipeError, match="no such file"):
        read_prompts(tmp_path / "nope.txt")
