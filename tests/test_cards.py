"""Cards the hub reads: a dataset card in every stage folder (agreeing with `load_dataset`), a model card in every
run folder (updated by eval with its results and samples)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, ModelCard
from PIL import Image

from prefpipe.core.dataset import ShardedDataset
from prefpipe.core.schema import CANDIDATES, PAIRS, SCORES
from prefpipe.core.tables import read_manifest
from tests.test_label import PROMPTS, invoke, write_candidates
from trainer.config import TrainConfig
from trainer.export import is_hub_id, render_model_card
from trainer.recipes import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Candidates (written through the stage contract) and `prefpipe label`'s scores and AI pairs."""
    root = tmp_path_factory.mktemp("cards")
    write_candidates(root / "candidates", PROMPTS)
    r = invoke("label", "--scorer", "compressibility", "--candidates", root / "candidates", "--out", root / "work",
               "--no-progress")
    assert r.exit_code == 0, r.output
    return root


def _card_features(folder: Path) -> tuple[datasets.Features, int]:
    card = DatasetCard.load(folder / "README.md")
    info = DatasetInfosDict.from_dataset_card_data(card.data)["default"]
    return info.features, info.splits["train"].num_examples


@pytest.mark.parametrize(("name", "schema"), [("candidates", CANDIDATES), ("work/scores", SCORES),
                                              ("work/pairs/ai", PAIRS)])
def test_every_stage_folder_has_a_dataset_card_that_load_dataset_agrees_with(labelled, name, schema):
    folder = labelled / name
    features, rows = _card_features(folder)
    assert features == datasets.Features.from_arrow_schema(schema)  # generated from our Arrow schema
    loaded = datasets.load_dataset(str(folder))  # reads the card's configs (and checks its row count)
    assert list(loaded) == ["train"]
    assert loaded["train"].features == features and loaded["train"].num_rows == rows
    card = DatasetCard.load(folder / "README.md")
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "train-*.parquet"}]}]
    manifest = read_manifest(folder)
    assert f"stage: `{manifest['stage']}`" in card.text and manifest["digest"] in card.text
    assert "prefpipe" in card.data.tags


def test_the_pairs_card_shows_the_stage_options_and_counters(labelled):
    text = (labelled / "work/pairs/ai/README.md").read_text()
    assert "# AI preference pairs" in text
    assert '"strategy": "best-worst"' in text  # the options
    assert "| single_candidate_prompts | 1 |" in text and "| rows | 3 |" in text  # the counters, summed over units
    for field in PAIRS:
        assert f"| `{field.name}` |" in text


def test_the_card_is_written_when_the_last_unit_is_and_shows_what_the_stage_records(tmp_path):
    schema = pa.schema([pa.field("x", pa.int64(), nullable=False), pa.field("name", pa.string())])
    ds = ShardedDataset(tmp_path / "d", "toy", {"k": 1}, "fp", 2, schema).open()
    with ds.write_unit(0) as w:
        w.write(pa.table({"x": [1, 2], "name": ["a", None]}, schema=schema))
        w.count("dropped_bad", 3)
    assert not (tmp_path / "d" / "README.md").exists()  # half a dataset has no card
    with ds.write_unit(1) as w:
        w.write(pa.table({"x": [3], "name": ["c"]}, schema=schema))
    features, rows = _card_features(tmp_path / "d")
    assert rows == 3 and features == datasets.Features({"x": datasets.Value("int64"), "name": datasets.Value("string")})
    assert "| dropped_bad | 3 |" in (tmp_path / "d" / "README.md").read_text()
    ds.record(summary={"kept": 3, "note": "from the stage"})
    text = (tmp_path / "d" / "README.md").read_text()
    assert "## summary" in text and '"note": "from the stage"' in text
    (tmp_path / "d" / "README.md").unlink()  # a folder finished before cards existed gets one when reopened
    ShardedDataset(tmp_path / "d", "toy", {"k": 1}, "fp", 2, schema).open()
    assert datasets.load_dataset(str(tmp_path / "d"), split="train")["x"] == [1, 2, 3]


@pytest.fixture(scope="module")
def run(labelled, tiny_sd15) -> Path:
    out = labelled / "runs" / "dpo"
    train(TrainConfig(model=str(tiny_sd15), out=str(out), workdir=str(labelled / "work"), source=("ai",),
                      resolution=32, batch_size=1, max_steps=2, learning_rate=1e-3, checkpoint_every=0,
                      no_progress=True))
    return out


def test_a_run_folder_has_a_model_card_with_base_objective_and_where_the_pairs_came_from(run, labelled, tiny_sd15):
    card = ModelCard.load(run / "README.md")
    data = card.data
    assert {"diffusers", "lora", "text-to-image", "diffusion-dpo"} <= set(data.tags)
    assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image"
    assert data.base_model is None  # a local folder is no hub id: named in the card's facts and text instead
    facts = data.prefpipe
    config = json.loads((run / "train_config.json").read_text())
    assert facts["base_model"] == str(tiny_sd15) and facts["objective"] == "dpo" and facts["kind"] == "lora"
    assert facts["hyperparameters"]["beta"] == 5000 and facts["hyperparameters"]["lr"] == pytest.approx(1e-3)
    assert facts["data"]["digest"] == config["resolved"]["data_digest"]
    pairs_dir = labelled / "work" / "pairs" / "ai"
    [source] = facts["data"]["sources"]
    assert source == {"path": str(pairs_dir), "stage": "pair", "source": "ai", "scorer": "compressibility",
                      "rows": 3, "digest": read_manifest(pairs_dir)["digest"]}
    assert facts["data"]["counts"]["rows_read"] == 3
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert facts["training"]["steps"] == 2 and facts["training"]["last"]["loss"] == pytest.approx(last["loss"], abs=1e-6)
    assert str(tiny_sd15) in card.text and "pipe.load_lora_weights(" in card.text and "eval" not in facts
    assert not (run / "logs").exists()  # --report-to none (the default): no tracker


def test_eval_adds_its_headline_results_and_sample_images_to_the_card(run, tiny_sd15, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\nan orange fox\n")
    r = invoke("eval", "--base", tiny_sd15, "--tuned", run, "--prompts", prompts, "--scorer", "compressibility",
               "--per-prompt", "2", "--steps", "2", "--size", "32", "--dtype", "fp32", "--out", tmp_path / "eval",
               "--no-progress")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    card = ModelCard.load(run / "README.md")
    evaluation = card.data.prefpipe["eval"]
    [result] = report["results"]
    assert evaluation["results"][0]["win_rate"] == result["win_rate"] and evaluation["prompts"] == 3
    assert evaluation["headline"].startswith("eval [compressibility]: dpo beats base")
    assert evaluation["headline"] in card.text
    samples = card.data.prefpipe["samples"]
    assert [s["prompt"] for s in samples] == ["a red cat", "a blue dog", "an orange fox"]
    assert card.data.widget == [{"text": s["prompt"], "output": {"url": s["file"]}} for s in samples]
    for s in samples:
        assert Image.open(io.BytesIO((run / s["file"]).read_bytes())).size == (32, 32)
        assert f"![{s['prompt']}]({s['file']})" in card.text
    # the training facts are kept
    assert card.data.prefpipe["objective"] == "dpo" and card.data.prefpipe["data"]["sources"][0]["scorer"] == "compressibility"


def test_the_card_tags_follow_the_objective_and_a_hub_base_is_its_base_model(tmp_path):
    facts = {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "objective": "sft", "kind": "unet",
             "family": "sdxl", "hyperparameters": {"lr": 1e-5}, "options": {}, "training": {"steps": 1, "last": {}},
             "data": {"digest": "d", "pairs": 1, "sources": [], "counts": {}}}
    card = render_model_card(tmp_path / "run", facts)
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "sft" in card.data.tags and "lora" not in card.data.tags and "stable-diffusion-xl" in card.data.tags
    assert 'UNet2DConditionModel.from_pretrained("USER/REPO", subfolder="unet")' in card.text
    assert is_hub_id("org/name") and not is_hub_id(str(tmp_path)) and not is_hub_id("a/b/c")
