"""Scorers beyond the seeds: plugins through entry points, ImageReward and HPSv3 against their references.

- Plugins: the tiny package under tests/plugins/prefpipe-brightness is installed with pip into a folder of its
  own (the venv is left unchanged) and put on PYTHONPATH; `prefpipe scorers` lists it with its distribution and
  version, and `prefpipe label --scorer brightness` labels with it. Broken and name-clashing plugins are given as
  hand-written dist-info folders (what pip writes) on sys.path.
- ImageReward: our scorer (transformers' BLIP blocks) against the `image-reward` package's own model code
  (`pip install --no-deps image-reward==1.5 fairscale==0.4.13`) on the same tiny checkpoint, images and prompts.
  The package cannot run as shipped here; the fixture supplies what it lacks (see `imagereward_reference`).
- HPSv3: the `hpsv3` package's own input side (instruction text, pixel budget and resize) and an independent
  per-image computation of its model (see the HPSv3 section: the package's model code cannot import here).
- The label stage with both new scorers: scores equal to the scorers' own, ensemble pairs, relabel agreement.

Runtime: about 2.5 minutes on this 2-core machine under load from other sessions (about 1.5 idle).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import types

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from labelers import BaseScorer, Scorer, available_scorers, build_scorer, scorer_names
from prefpipe.core.errors import PrefpipeError
from prefpipe.core.schema import PAIRS, conform
from prefpipe.core.tables import parquet_files
from prefpipe.testing.scorers import TINY_IMAGEREWARD_VISION, write_tiny_scorer
from tests.conftest import REPO, run_cli
from tests.test_label import png, write_candidates
from tests.test_scorers import PROMPTS, _assert_close_and_informative, _images, _pairs

PLUGIN_SOURCE = REPO / "tests" / "plugins" / "prefpipe-brightness"


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return _images()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_new_scorers")
    cache: dict[str, object] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = write_tiny_scorer(kind, root / kind, seed=0)
        return cache[kind]

    return get


# -- plugins ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The plugin package pip-installed into a folder of its own (built from a copy: the source stays clean)."""
    work = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PLUGIN_SOURCE, work / "src")
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(source)], check=True, capture_output=True, text=True, timeout=300)
    return site


def brightness(image: Image.Image) -> float:
    """Independent: ITU-R 601 luma of each RGB pixel in PIL's fixed point (16-bit weights, rounded), mean / 255."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    luma = (rgb @ np.array([19595, 38470, 7471]) + 0x8000) >> 16
    return float(luma.mean() / 255)


def _invoke(*args):
    from click.testing import CliRunner

    from prefpipe.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_prefpipe_scorers_lists_builtins_and_the_installed_plugin_with_its_distribution(plugin_site, monkeypatch):
    assert "brightness" not in _invoke("scorers").output  # not installed: not there
    monkeypatch.syspath_prepend(str(plugin_site))  # what PYTHONPATH does; entry points are read from sys.path
    rows = {r["name"]: r for r in json.loads(_invoke("scorers", "--json").output)}
    assert rows["brightness"]["source"] == "prefpipe-brightness" and rows["brightness"]["version"] == "0.3.1"
    assert rows["brightness"]["status"] == "ok" and rows["brightness"]["higher_is_better"] is True
    for name in ("pickscore", "hpsv2", "imagereward", "hpsv3"):
        assert rows[name]["source"] == "built-in" and rows[name]["status"] == "ok"
    assert rows["imagereward"]["default_weights"] == "THUDM/ImageReward"
    table = _invoke("scorers").output
    assert any(line.split()[:3] == ["brightness", "prefpipe-brightness", "0.3.1"] for line in table.splitlines())


def test_label_with_a_plugin_scorer_defined_outside_the_repository(plugin_site, tmp_path):
    prompts = {"a red cat": [0, 2, 1], "a blue dog": [2, 0]}
    cands = write_candidates(tmp_path / "candidates", prompts)
    run_cli("label", "--scorer", "brightness", "--scorer", "compressibility", "--ensemble", "mean-rank",
            "--candidates", cands, "--out", tmp_path / "w", "--no-progress", env={"PYTHONPATH": str(plugin_site)})
    scores = pl.read_parquet(parquet_files(tmp_path / "w" / "scores")).filter(pl.col("scorer") == "brightness")
    cand = pl.read_parquet(parquet_files(cands))
    expected = {(r["prompt_id"], r["candidate"]): brightness(Image.open(io.BytesIO(r["image"])))
                for r in cand.iter_rows(named=True)}
    assert scores.height == cand.height
    for row in scores.iter_rows(named=True):
        assert row["score"] == pytest.approx(expected[(row["prompt_id"], row["candidate"])], abs=1e-6)
    assert pl.read_parquet(parquet_files(tmp_path / "w" / "pairs" / "ai")).height == 2


def _dist_info(site, name: str, version: str, entry_points: dict[str, str]):
    """What pip writes for an installed distribution, reduced to what importlib.metadata reads."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[prefpipe.scorers]\n{lines}")


def test_a_broken_plugin_is_one_message_naming_it_and_cannot_shadow_a_builtin(tmp_path, monkeypatch):
    _dist_info(tmp_path, "broken-scorers", "1.2", {"broken": "no_such_module_here:Scorer",
                                                   "pickscore": "no_such_module_here:Fake"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "broken" in scorer_names()
    with pytest.raises(PrefpipeError, match=r"'broken' from plugin broken-scorers 1.2 .*failed to load"):
        build_scorer("broken")
    shadowed = [e for e in available_scorers() if e.name == "pickscore" and e.source == "broken-scorers"]
    assert shadowed and shadowed[0].shadowed_by == "built-in"
    listing = _invoke("scorers").output
    assert "note: broken (broken-scorers)" in listing and "note: pickscore (broken-scorers)" in listing
    cands = write_candidates(tmp_path / "candidates", {"a red cat": [0, 1]})
    result = _invoke("label", "--scorer", "broken", "--candidates", cands, "--out", tmp_path / "w")
    assert result.exit_code != 0 and "failed to load" in result.output and "Traceback" not in result.output


class _Wrong(BaseScorer):
    name = "wrong"

    def score_batch(self, images, prompts):
        return [0.0]  # one score whatever the batch


def test_base_scorer_checks_what_score_batch_returns(images):
    scorer = _Wrong(batch_size=8)
    assert isinstance(scorer, Scorer) and scorer.version == "wrong" and scorer.weights is None
    assert scorer.score(images[:1], PROMPTS[:1]).tolist() == [0.0]
    with pytest.raises(PrefpipeError, match="returned 1 scores for 2 images"):
        scorer.score(images[:2], PROMPTS[:2])


# -- ImageReward --------------------------------------------------------------------------------------------


class Payload:  # any object other than tensors and containers would run code when unpickled
    pass



@pytest.fixture(scope="module")
def imagereward_reference(tiny):
    """The `image-reward` package's `ImageReward` model class, built on the tiny checkpoint and loaded strictly.

    What the package lacks here, supplied for the duration of the module:
    - its `__init__` imports OpenAI's `clip` package (for another score): the model's own modules are imported
      under stub parent packages, so that `__init__` never runs;
    - `bert-base-uncased` comes from the hub: `BertTokenizer.from_pretrained` in its `blip.py` gets our offline
      WordPiece (the tiny checkpoint's tokenizer/);
    - transformers 5 dropped what its 4.x-era `med.py` calls: `apply_chunking_to_forward` and
      `prune_linear_layer` (now in `transformers.pytorch_utils`), `find_pruneable_heads_and_indices` (pruning
      only, never called), `invert_attention_mask` and `get_head_mask` (restored as 4.x wrote them:
      `(1 - mask) * finfo.min`, and no head mask), `init_weights` (skipped: every weight is loaded after), and
      the tokenizer's `additional_special_tokens_ids` (it stores `[ENC]`'s id, unused by the score);
    - its ViT is hard-coded to ViT-L: `create_vit` builds its own `VisionTransformer` at the tiny size.
    """
    if importlib.util.find_spec("ImageReward") is None or importlib.util.find_spec("fairscale") is None:
        pytest.skip("install the reference: pip install --no-deps image-reward==1.5 fairscale==0.4.13")
    import transformers
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils
    from transformers import BertTokenizer

    folder = tiny("imagereward")
    root = importlib.util.find_spec("ImageReward").submodule_search_locations[0]
    verbosity = transformers.logging.get_verbosity()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_utils, "apply_chunking_to_forward", pytorch_utils.apply_chunking_to_forward, raising=False)
        mp.setattr(modeling_utils, "prune_linear_layer", pytorch_utils.prune_linear_layer, raising=False)
        mp.setattr(modeling_utils, "find_pruneable_heads_and_indices", lambda *a, **k: None, raising=False)
        mp.setattr(BertTokenizer, "additional_special_tokens_ids",
                   property(lambda self: self.convert_tokens_to_ids(["[ENC]"])), raising=False)
        for name, sub in (("ImageReward", ""), ("ImageReward.models", "/models"), ("ImageReward.models.BLIP", "/models/BLIP")):
            stub = types.ModuleType(name)
            stub.__path__ = [root + sub]
            mp.setitem(sys.modules, name, stub)
        blip = importlib.import_module("ImageReward.models.BLIP.blip")
        med = importlib.import_module("ImageReward.models.BLIP.med")
        vit = importlib.import_module("ImageReward.models.BLIP.vit")
        blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
        package = importlib.import_module("ImageReward.ImageReward")

        class OfflineBert(BertTokenizer):
            @classmethod
            def from_pretrained(cls, name, *args, **kwargs):
                assert name == "bert-base-uncased"
                return BertTokenizer.from_pretrained(folder / "tokenizer")

        def invert_attention_mask(self, mask):
            mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
            mask = mask.to(dtype=self.dtype)
            return (1.0 - mask) * torch.finfo(self.dtype).min

        def create_tiny_vit(vit_name, image_size, *args, **kwargs):
            assert vit_name == "large"
            v = TINY_IMAGEREWARD_VISION
            return vit.VisionTransformer(img_size=image_size, patch_size=v["patch_size"], embed_dim=v["embed_dim"],
                                         depth=v["depth"], num_heads=v["num_heads"]), v["embed_dim"]

        mp.setattr(blip, "BertTokenizer", OfflineBert)
        mp.setattr(blip_pretrain, "create_vit", create_tiny_vit)
        mp.setattr(med.BertModel, "init_weights", lambda self: None)
        mp.setattr(med.BertModel, "invert_attention_mask", invert_attention_mask, raising=False)
        mp.setattr(med.BertModel, "get_head_mask", lambda self, mask, n, *a, **k: [None] * n, raising=False)
        model = package.ImageReward(med_config=str(folder / "med_config.json"), device="cpu")
        # as the package's `load`, but strict: every weight of the tiny file is used, none is missing
        model.load_state_dict(torch.load(folder / "ImageReward.pt", map_location="cpu", weights_only=True), strict=True)
        model.eval()
        yield model, folder
    for name in [n for n in sys.modules if n == "ImageReward" or n.startswith("ImageReward.")]:
        del sys.modules[name]
    transformers.logging.set_verbosity(verbosity)


LONG_PROMPT = ("a very long prompt about a red cube on a wooden table in a sunny garden with flowers and trees and a "
               "small dog and a cat and a bird on a branch and clouds in a blue sky over the hills at noon")


def test_imagereward_matches_the_reference_package(imagereward_reference, images):
    model, folder = imagereward_reference
    prompts = [*PROMPTS, LONG_PROMPT]  # the long one is cut at 35 tokens by both
    pair_images, pair_prompts = _pairs(images, prompts)
    with torch.no_grad():  # the package's one-pair API (`score`) and its per-prompt batch API (`inference_rank`)
        reference = np.array([model.score(p, im) for im, p in zip(pair_images, pair_prompts)], dtype=np.float32)
        _, ranked = model.inference_rank(PROMPTS[0], images)
    scorer = build_scorer("imagereward", weights=folder, batch_size=5, device="cpu")
    _assert_close_and_informative(scorer.score(pair_images, pair_prompts), reference, atol=1e-5)
    np.testing.assert_allclose(scorer.score(images, [PROMPTS[0]] * len(images)), ranked, rtol=1e-4, atol=1e-5)


def test_imagereward_reads_35_tokens_of_the_prompt(tiny, images):
    scorer = build_scorer("imagereward", weights=tiny("imagereward"), device="cpu")
    ids = scorer.tokenizer(LONG_PROMPT)["input_ids"]
    assert len(ids) > 40  # the tokenizer is a real WordPiece: the long prompt is longer than 35 tokens
    cut = scorer.tokenizer.decode(ids[1:34])  # [CLS] + 33 pieces + [SEP] = 35
    long, cut_only, cut_and_more = scorer.score([images[0]] * 3, [LONG_PROMPT, cut, cut + " and more words"])
    assert long == pytest.approx(cut_only, abs=1e-6) and long == pytest.approx(cut_and_more, abs=1e-6)
    assert scorer.score([images[0]], [cut[:-12]])[0] != pytest.approx(long, abs=1e-6)  # the 35 tokens matter


def test_imagereward_safetensors_conversion_scores_the_same_and_pickles_are_refused(tiny, images, tmp_path):
    from safetensors.torch import save_file

    folder = tiny("imagereward")
    copy = shutil.copytree(folder, tmp_path / "ir")
    (copy / "ImageReward.pt").unlink()
    save_file(torch.load(folder / "ImageReward.pt", weights_only=True), copy / "ImageReward.safetensors")
    prompts = PROMPTS[: len(images)]
    original = build_scorer("imagereward", weights=folder, device="cpu").score(images, prompts)
    np.testing.assert_array_equal(build_scorer("imagereward", weights=copy, device="cpu").score(images, prompts), original)

    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(folder / "med_config.json", evil)
    torch.save({"blip.visual_encoder.cls_token": Payload()}, evil / "ImageReward.pt")  # a pickled object
    with pytest.raises(PrefpipeError, match="not a readable torch state dict"):
        build_scorer("imagereward", weights=evil, device="cpu")


def test_imagereward_bad_weights_name_the_file_and_the_fix(tiny, tmp_path):
    with pytest.raises(PrefpipeError, match="holds neither ImageReward.safetensors nor ImageReward.pt"):
        build_scorer("imagereward", weights=tmp_path, device="cpu")
    shutil.copy(tiny("imagereward") / "ImageReward.pt", tmp_path)
    with pytest.raises(PrefpipeError, match="holds no med_config.json"):
        build_scorer("imagereward", weights=tmp_path / "ImageReward.pt", device="cpu")
    shutil.copy(tiny("imagereward") / "vision_config.json", tmp_path)
    med = json.loads((tiny("imagereward") / "med_config.json").read_text())
    (tmp_path / "med_config.json").write_text(json.dumps({**med, "num_hidden_layers": 3}))  # one layer too many
    with pytest.raises(PrefpipeError, match=r"ImageReward.pt: text weights do not match \(missing \['encoder.layer.2"):
        build_scorer("imagereward", weights=tmp_path, tokenizer=tiny("imagereward") / "tokenizer", device="cpu")


# -- HPSv3 --------------------------------------------------------------------------------------------------
#
# The `hpsv3` package cannot run here: its model module (`hpsv3/model/qwen2vl_trainer.py`, imported by
# `hpsv3/__init__.py` through `inference.py` and `train.py`) needs trl, deepspeed and transformers 4.45's Trainer
# internals, and its `Qwen2VLRewardModelBT.forward` reads `self.model.embed_tokens`, which transformers 5 moved to
# `model.language_model`. What does run is its input side: `hpsv3/dataset/utils.py` (`process_vision_info`: the
# pixel budget and resize) and `hpsv3/dataset/data_collator_qwen.py` (the instruction text), imported under stub
# parents. The model side is checked against an independent computation: one (image, prompt) at a time, unpadded,
# through transformers' Qwen2VLForConditionalGeneration loaded from the file by its own key mapping, explicit
# positions 0..L-1, the hidden state at <|Reward|> and the RankNet head in float64 numpy.


@pytest.fixture(scope="module")
def hpsv3_package():
    """(dataset.utils, dataset.data_collator_qwen) of the `hpsv3` package, without its __init__."""
    if importlib.util.find_spec("hpsv3") is None:
        pytest.skip("install the reference: pip install --no-deps hpsv3==1.0.0")
    root = importlib.util.find_spec("hpsv3").submodule_search_locations[0]
    with pytest.MonkeyPatch.context() as mp:
        for name, sub in (("hpsv3", ""), ("hpsv3.dataset", "/dataset")):
            stub = types.ModuleType(name)
            stub.__path__ = [root + sub]
            mp.setitem(sys.modules, name, stub)
        utils = importlib.import_module("hpsv3.dataset.utils")
        collator = importlib.import_module("hpsv3.dataset.data_collator_qwen")
        yield utils, collator
    for name in [n for n in sys.modules if n == "hpsv3" or n.startswith("hpsv3.")]:
        del sys.modules[name]


def _hpsv3_independent(folder, images, prompts, package) -> np.ndarray:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    utils, collator = package
    processor = AutoProcessor.from_pretrained(folder / "base", padding_side="right")  # hpsv3/train.py's processor
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    reward_id = processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
    state = load_file(folder / "HPSv3.safetensors")
    config = AutoConfig.from_pretrained(folder / "base")
    config.text_config.vocab_size = state["model.embed_tokens.weight"].shape[0]
    model = Qwen2VLForConditionalGeneration(config).eval()
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k if k.startswith("visual.")
                else k): v for k, v in state.items() if not k.startswith("rm_head.")}
    model.load_state_dict(renamed, strict=True)
    head = {k[8:]: v.double().numpy() for k, v in state.items() if k.startswith("rm_head.")}
    out = []
    for image, prompt in zip(images, prompts):
        pixels = 256 * 28 * 28  # hpsv3/inference.py prepare_batch, verbatim
        message = [{"role": "user", "content": [
            {"type": "image", "image": image, "min_pixels": pixels, "max_pixels": pixels},
            {"type": "text", "text": collator.INSTRUCTION.format(text_prompt=prompt) + collator.prompt_with_special_token},
        ]}]
        image_inputs, _ = utils.process_vision_info([message])
        batch = processor(text=processor.apply_chat_template([message], tokenize=False, add_generation_prompt=True),
                          images=image_inputs, padding=True, return_tensors="pt")
        ids = batch["input_ids"][0]
        with torch.no_grad():
            features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
            embeds = model.get_input_embeddings()(ids[None]).clone()
            embeds[0, ids == config.image_token_id] = features
            hidden = model.model.language_model(inputs_embeds=embeds,
                                                position_ids=torch.arange(len(ids))[None]).last_hidden_state[0]
        h = hidden[ids == reward_id].double().numpy()
        assert h.shape[0] == 1
        x = np.maximum(h[0] @ head["0.weight"].T + head["0.bias"], 0)
        x = np.maximum(x @ head["3.weight"].T + head["3.bias"], 0)
        out.append((x @ head["5.weight"].T + head["5.bias"])[0])  # (mu, sigma) -> mu
    return np.array(out, dtype=np.float32)


def test_hpsv3_uses_the_package_instruction_and_pixel_budget(hpsv3_package, images):
    from labelers import hpsv3

    utils, collator = hpsv3_package
    assert hpsv3.INSTRUCTION == collator.INSTRUCTION
    assert hpsv3.PROMPT_WITH_SPECIAL_TOKEN == collator.prompt_with_special_token
    for image in images:
        ours = hpsv3.hpsv3_image(image)
        theirs, _ = utils.process_vision_info([hpsv3.hpsv3_messages("x")[0] | {"content": [
            {"type": "image", "image": image, "min_pixels": hpsv3.PIXELS, "max_pixels": hpsv3.PIXELS}]}])
        assert ours.size == theirs[0].size and ours.width % 28 == 0 and ours.height % 28 == 0
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs[0]))


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 5000), width=st.integers(1, 5000))
def test_hpsv3_smart_resize_equals_the_package_for_any_size(hpsv3_package, height, width):
    from labelers import hpsv3

    utils, _ = hpsv3_package
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(PrefpipeError, match="aspect ratio under 200"):
            hpsv3.smart_resize(height, width)
        return
    assert hpsv3.smart_resize(height, width) == utils.smart_resize(height, width, 28, hpsv3.PIXELS, hpsv3.PIXELS)


def test_hpsv3_batched_score_is_mu_of_the_ranknet_head_at_the_reward_token(hpsv3_package, tiny, images):
    folder = tiny("hpsv3")
    prompts = [PROMPTS[0], PROMPTS[2], "a cat"]  # different lengths: the batch is padded on the right
    reference = _hpsv3_independent(folder, images, prompts, hpsv3_package)
    scorer = build_scorer("hpsv3", weights=folder, batch_size=3, device="cpu")
    _assert_close_and_informative(scorer.score(images, prompts), reference, atol=1e-5)
    one_at_a_time = build_scorer("hpsv3", weights=folder, batch_size=1, device="cpu").score(images, prompts)
    np.testing.assert_allclose(one_at_a_time, reference, rtol=1e-4, atol=1e-5)


def test_hpsv3_refuses_the_real_7b_on_cpu_naming_the_memory(tiny, tmp_path):
    from safetensors.torch import save_file

    from prefpipe.testing.scorers import QWEN2_VL_7B

    base = shutil.copytree(tiny("hpsv3") / "base", tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["text_config"] = {k: v for k, v in config["text_config"].items() if k not in ("layer_types", "max_window_layers")}
    config["text_config"].update(QWEN2_VL_7B["text_config"])
    config["vision_config"].update(QWEN2_VL_7B["vision_config"])
    (base / "config.json").write_text(json.dumps(config))
    vocab = config["text_config"]["vocab_size"] + 1
    save_file({"model.embed_tokens.weight": torch.zeros(vocab, 1)}, tmp_path / "HPSv3.safetensors")  # shape read only
    with pytest.raises(PrefpipeError, match=r"7\.\d B parameters: it needs about 1\d GiB of GPU memory in bf16.*--device cuda"):
        build_scorer("hpsv3", weights=tmp_path, device="cpu")


def test_hpsv3_bad_weights_name_the_file(tmp_path):
    with pytest.raises(PrefpipeError, match="holds no HPSv3.safetensors"):
        build_scorer("hpsv3", weights=tmp_path, device="cpu")
    (tmp_path / "HPSv3.pt").write_bytes(b"")
    with pytest.raises(PrefpipeError, match="safetensors only"):
        build_scorer("hpsv3", weights=tmp_path / "HPSv3.pt", device="cpu")


# -- the label stage with the new scorers --------------------------------------------------------------------


def test_label_with_imagereward_and_hpsv3_into_ensemble_pairs_and_relabel_agreement(tiny, tmp_path):
    from click.testing import CliRunner

    from prefpipe.cli import main

    weights = [f"--weights=imagereward={tiny('imagereward')}", f"--weights=hpsv3={tiny('hpsv3')}"]
    prompts = {"a red cat": [0, 2, 1], "a blue dog": [2, 0]}
    cands = write_candidates(tmp_path / "candidates", prompts)
    r = CliRunner().invoke(main, ["label", "--scorer", "imagereward", "--scorer", "hpsv3", *weights, "--ensemble",
                                  "mean-rank", "--strategy", "all", "--candidates", str(cands), "--out",
                                  str(tmp_path / "w"), "--no-progress", "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    scores = pl.read_parquet(parquet_files(tmp_path / "w" / "scores"))
    cand = pl.read_parquet(parquet_files(cands)).sort(["prompt_id", "candidate"])
    pil = [Image.open(io.BytesIO(b)) for b in cand["image"]]
    for name, folder in (("imagereward", tiny("imagereward")), ("hpsv3", tiny("hpsv3"))):
        direct = build_scorer(name, folder, device="cpu").score(pil, cand["prompt"].to_list())
        stage = scores.filter(pl.col("scorer") == name).sort(["prompt_id", "candidate"])["score"].to_numpy()
        np.testing.assert_allclose(stage, direct, rtol=1e-4, atol=1e-5)
    pairs = pl.read_parquet(parquet_files(tmp_path / "w" / "pairs" / "ai"))
    assert 0 < pairs.height <= 4  # all pairs of 3 + 1 of 2 candidates, less ensemble ties

    rows = []  # human pairs: relabelled by both new scorers, with an agreement figure each
    for i in range(4):
        a, b = png(Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8))), png(_images()[i % 3].resize((32, 32)))
        rows.append(dict(caption=f"prompt {i}", jpg_0=a, jpg_1=b, label_0=float(i % 2), label_1=1 - float(i % 2),
                         image_0_uid=f"u{i}a", image_1_uid=f"u{i}b"))
    human = tmp_path / "human"
    human.mkdir()
    pq.write_table(conform(pa.Table.from_pylist(rows), PAIRS), human / "train-00000-of-00001.parquet")
    r = CliRunner().invoke(main, ["label", "--scorer", "imagereward", "--scorer", "hpsv3", *weights, "--pairs",
                                  str(human), "--out", str(tmp_path / "r"), "--no-progress", "--device", "cpu"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r" / "relabel" / "agreement.json").read_text())
    for name in ("imagereward", "hpsv3"):
        assert report["scorers"][name]["non_tie_pairs"] == 4
        assert 0 <= report["scorers"][name]["accuracy_non_tie"] <= 1
