"""Scorers reproduce their reference computations.

Each model scorer is loaded from a tiny checkpoint (prefpipe.testing.scorers, real on-disk format) through the same
code path as the real weights, and compared with an independent computation written here: our own
PIL/numpy/torch preprocessing (resize, crop or pad, normalise) fed to the raw model, then the reference
formula. HPSv2 is also compared with the reference `hpsv2` package itself running on the tiny weights.
The inputs include a non-square image, an RGBA image with varying alpha and a grayscale ('L') image; the
non-square sizes are chosen so that the crop/pad offsets of the different reference pipelines disagree.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from labelers import Scorer, build_scorer, scorer_names
from prefpipe.core.errors import PrefpipeError
from prefpipe.testing.scorers import TINY_OPEN_CLIP_H, write_tiny_scorer

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PROMPTS = [
    "a red cube on a table",
    "a photo of a cat",
    "an astronaut riding a horse on the moon, oil painting",
]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)

    def smooth_noise(h: int, w: int, channels: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 / w), (yy * 255 / h), ((xx + yy) * 128 / (h + w))][:channels], axis=-1)
        base = base if channels > 1 else base[..., :1]
        noise = rng.normal(0, 40, (h, w, channels))
        return np.clip(base + noise, 0, 255).astype(np.uint8)

    wide = Image.fromarray(
        smooth_noise(200, 303, 3), "RGB"
    )  # shortest-side 224 -> 339 wide: crop offsets 57 vs 58
    rgba = smooth_noise(256, 256, 3)
    alpha = np.tile(np.linspace(0, 255, 256).astype(np.uint8), (256, 1))[..., None]  # transparent -> opaque
    rgba = Image.fromarray(np.concatenate([rgba, alpha], axis=-1), "RGBA")
    gray = Image.fromarray(smooth_noise(300, 181, 1)[..., 0], "L")  # HPS: 135 px wide, padded 44 | 45
    return [wide, rgba, gray]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return _images()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> weights path of a tiny checkpoint, written once per module."""
    root = tmp_path_factory.mktemp("tiny_scorers")
    cache: dict[str, object] = {}

    def get(kind: str, flavour: str = "open_clip"):
        key = f"{kind}-{flavour}"
        if key not in cache:
            cache[key] = write_tiny_scorer(kind, root / key, seed=0, flavour=flavour)
        return cache[key]

    return get


def _pairs(images, prompts):
    """Every (image, prompt) combination, so each image is scored against several texts."""
    return [im for im in images for _ in prompts], [p for _ in images for p in prompts]


def _assert_close_and_informative(ours: np.ndarray, reference: np.ndarray, atol: float) -> None:
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=atol)
    # The tiny models must tell the inputs apart, or agreement would prove nothing about preprocessing.
    assert np.ptp(reference) > 1000 * atol


# Independent preprocessing, written from the reference pipelines' definitions.


def _normalise_chw(rgb: np.ndarray) -> torch.Tensor:
    """uint8 or float HWC in [0, 255] -> normalised float32 CHW tensor."""
    x = rgb.astype(np.float32) / 255.0
    return torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1).copy())


def _shortest_side_size(width: int, height: int, size: int = 224) -> tuple[int, int]:
    """Both transformers and torchvision truncate the long side: int(size * long / short)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess_transformers_clip(image: Image.Image) -> torch.Tensor:
    """transformers' CLIP image processor (PIL): RGB first, resize, crop at floor((d - 224) / 2)."""
    image = image.convert("RGB")
    w, h = _shortest_side_size(*image.size)
    resized = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - 224) // 2, (h - 224) // 2
    return _normalise_chw(np.asarray(resized.crop((left, top, left + 224, top + 224))))


def preprocess_openai_clip(image: Image.Image) -> torch.Tensor:
    """OpenAI `clip` / open_clip eval transform: resize in the image's own mode, crop at
    round((d - 224) / 2) (half to even), then RGB."""
    w, h = _shortest_side_size(*image.size)
    resized = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = int(round((w - 224) / 2.0)), int(round((h - 224) / 2.0))
    return _normalise_chw(np.asarray(resized.crop((left, top, left + 224, top + 224)).convert("RGB")))


def preprocess_hps(image: Image.Image) -> torch.Tensor:
    """HPS: float tensor first, antialiased bicubic resize of the longest side to 224, zero pad, normalise."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    h, w = x.shape[1:]
    scale = 224 / max(h, w)
    if scale != 1.0:
        x = F.interpolate(
            x[None],
            size=(round(h * scale), round(w * scale)),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )[0]
    pad_h, pad_w = 224 - x.shape[1], 224 - x.shape[2]
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean, std = torch.from_numpy(MEAN)[:, None, None], torch.from_numpy(STD)[:, None, None]
    return (x - mean) / std


def _open_clip_tokens(prompts: list[str]) -> torch.Tensor:
    import open_clip

    return open_clip.tokenize(prompts)  # open_clip's own BPE, 77 tokens, zero padded


def _raw_open_clip(config: dict, state: dict):
    from open_clip.model import CLIP

    model = CLIP(**config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _hf_clip_cosines(folder, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosines, logit_scale) from a raw transformers CLIPModel and our own preprocessing."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess_transformers_clip(im) for im in images])
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        # No attention mask: the causal mask alone keeps padding out of the <|endoftext|> position.
        text_emb = model.text_projection(model.text_model(input_ids=_open_clip_tokens(prompts)).pooler_output)
        return (_unit(image_emb) * _unit(text_emb)).sum(-1), model.logit_scale.exp()


# Parity with independent computations.


def test_pickscore_is_logit_scale_times_cosine_with_clip_pil_preprocessing(tiny, images):
    weights = tiny("pickscore")
    scorer = build_scorer("pickscore", weights=weights, batch_size=2, device="cpu")
    pair_images, pair_prompts = _pairs(images, PROMPTS)
    cosines, logit_scale = _hf_clip_cosines(weights, pair_images, pair_prompts)
    reference = (logit_scale * cosines).numpy()
    _assert_close_and_informative(scorer.score(pair_images, pair_prompts), reference, atol=1e-4)


def test_clip_score_transformers_is_100_times_cosine_clamped_at_zero(tiny, images):
    weights = tiny("clip", flavour="transformers")
    scorer = build_scorer("clip", weights=weights, batch_size=2, device="cpu")
    assert scorer.backend == "transformers"
    pair_images, pair_prompts = _pairs(images, PROMPTS)
    cosines, _ = _hf_clip_cosines(weights, pair_images, pair_prompts)
    assert (cosines < 0).any() and (cosines > 0).any()  # both sides of the clamp are exercised
    reference = torch.clamp(100 * cosines, min=0).numpy()
    _assert_close_and_informative(scorer.score(pair_images, pair_prompts), reference, atol=1e-3)


def test_clip_score_open_clip_is_100_times_cosine_clamped_at_zero(tiny, images):
    from safetensors.torch import load_file

    folder = tiny("clip")
    scorer = build_scorer("clip", weights=folder, batch_size=2, device="cpu")
    assert scorer.backend == "open_clip"
    config = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    model = _raw_open_clip(config, load_file(folder / "open_clip_model.safetensors"))
    pair_images, pair_prompts = _pairs(images, PROMPTS)
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([preprocess_openai_clip(im) for im in pair_images]))
        text_emb = model.encode_text(_open_clip_tokens(pair_prompts))
        cosines = (_unit(image_emb) * _unit(text_emb)).sum(-1)
    assert (cosines < 0).any() and (cosines > 0).any()
    reference = torch.clamp(100 * cosines, min=0).numpy()
    _assert_close_and_informative(scorer.score(pair_images, pair_prompts), reference, atol=1e-3)


def test_aesthetic_is_linear_mlp_on_unit_openai_clip_image_embedding(tiny, images):
    from safetensors.torch import load_file

    folder = tiny("aesthetic")
    scorer = build_scorer("aesthetic", weights=folder, batch_size=2, device="cpu")
    config = json.loads((folder / "clip" / "open_clip_config.json").read_text())["model_cfg"]
    assert config["quick_gelu"] and config["embed_dim"] == 768  # OpenAI ViT-L/14's activation and width
    model = _raw_open_clip(config, load_file(folder / "clip" / "open_clip_model.safetensors"))
    mlp = torch.load(folder / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    with torch.no_grad():
        emb = model.encode_image(torch.stack([preprocess_openai_clip(im) for im in images])).numpy()
    x = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    for index in (0, 2, 4, 6, 7):  # Linear layers only; dropout is identity at inference, no activations
        x = x @ mlp[f"layers.{index}.weight"].numpy().T + mlp[f"layers.{index}.bias"].numpy()
    reference = x[:, 0]
    ours = scorer.score(images, ["ignored"] * len(images))
    _assert_close_and_informative(ours, reference, atol=1e-6)


def test_hpsv2_is_cosine_of_unit_features_after_longest_side_resize_and_zero_pad(tiny, images):
    folder = tiny("hpsv2")
    scorer = build_scorer("hpsv2", weights=folder, batch_size=2, device="cpu")
    state = torch.load(folder / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    model = _raw_open_clip(TINY_OPEN_CLIP_H, state)
    pair_images, pair_prompts = _pairs(images, PROMPTS)
    with torch.no_grad():
        image_features = _unit(model.encode_image(torch.stack([preprocess_hps(im) for im in pair_images])))
        text_features = _unit(model.encode_text(_open_clip_tokens(pair_prompts)))
    reference = (image_features * text_features).sum(-1).numpy()
    _assert_close_and_informative(scorer.score(pair_images, pair_prompts), reference, atol=1e-5)


# Parity with the reference HPSv2 package.


@pytest.fixture
def hpsv2_reference(tiny, monkeypatch, tmp_path):
    """The `hpsv2` package's `img_score.score`, its model built as in `initialize_model` but on the tiny arch."""
    img_score = pytest.importorskip(
        "hpsv2.img_score", reason="install the reference: pip install --no-deps hpsv2x clint"
    )
    from hpsv2.src.open_clip import factory

    monkeypatch.setitem(
        factory._MODEL_CONFIGS, "prefpipe-tiny-ViT-H-14", json.loads(json.dumps(TINY_OPEN_CLIP_H))  # noqa: SLF001 - the reference package has no public way to register an architecture
    )
    real_create = img_score.create_model_and_transforms

    def create_tiny(model_name, pretrained, **kwargs):  # same options, tiny arch, no LAION download
        assert model_name == "ViT-H-14"
        return real_create("prefpipe-tiny-ViT-H-14", None, **kwargs)

    monkeypatch.setattr(img_score, "create_model_and_transforms", create_tiny)
    monkeypatch.setattr(img_score, "model_dict", {})
    monkeypatch.setattr(img_score, "root_path", str(tmp_path))
    monkeypatch.setattr(img_score, "device", "cpu")
    return img_score, tiny("hpsv2") / "HPS_v2.1_compressed.pt"


def test_hpsv2_matches_reference_package(hpsv2_reference, images):
    img_score, checkpoint = hpsv2_reference
    # The package cannot score RGBA (see the next test); what we score is the image's RGB channels.
    reference_inputs = [im.convert("RGB") if im.mode == "RGBA" else im for im in images]
    for prompt in PROMPTS[:2]:
        reference = np.array(
            img_score.score(reference_inputs, prompt, cp=str(checkpoint), hps_version="v2.1"),
            dtype=np.float32,
        )
        # weights given as the checkpoint file; the arch comes from open_clip_config.json beside it
        scorer = build_scorer("hpsv2", weights=checkpoint, batch_size=2, device="cpu")
        _assert_close_and_informative(scorer.score(images, [prompt] * len(images)), reference, atol=1e-5)


def test_hpsv2_reference_package_cannot_score_rgba_so_we_use_its_rgb_channels(hpsv2_reference, images):
    img_score, checkpoint = hpsv2_reference
    rgba = images[1]
    assert rgba.mode == "RGBA"
    with pytest.raises(RuntimeError):  # it keeps the alpha channel: a 4-channel tensor into a 3-channel conv
        img_score.score([rgba], PROMPTS[0], cp=str(checkpoint), hps_version="v2.1")
    scorer = build_scorer("hpsv2", weights=checkpoint.parent, device="cpu")
    assert scorer.score([rgba], PROMPTS[:1]) == scorer.score([rgba.convert("RGB")], PROMPTS[:1])


# JPEG (in)compressibility.


def _ddpo_jpeg_kilobytes(image: Image.Image) -> float:
    """DDPO's reward: an RGB uint8 array saved by PIL as JPEG quality 95; bytes / 1000."""
    buffer = io.BytesIO()
    Image.fromarray(np.array(image.convert("RGB"), dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_incompressibility_is_jpeg_q95_size_in_kilobytes_and_compressibility_its_negation(images):
    prompts = ["unused"] * len(images)
    reference = np.array([_ddpo_jpeg_kilobytes(im) for im in images], dtype=np.float32)
    incompressibility = build_scorer("incompressibility").score(images, prompts)
    compressibility = build_scorer("compressibility").score(images, prompts)
    np.testing.assert_array_equal(incompressibility, reference)
    np.testing.assert_array_equal(compressibility, -reference)
    assert incompressibility.dtype == np.float32


def test_compressibility_prefers_a_flat_image_to_a_noisy_one():
    flat = Image.new("RGB", (64, 64), (200, 30, 30))
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    scorer = build_scorer("compressibility")
    flat_score, noisy_score = scorer.score([flat, noisy], ["", ""])
    assert scorer.higher_is_better and flat_score > noisy_score


# Registry and protocol.


def test_unknown_scorer_name_lists_the_known_names():
    with pytest.raises(PrefpipeError) as err:
        build_scorer("pickscroe")
    message = str(err.value)
    assert "pickscroe" in message
    for name in ("pickscore", "hpsv2", "clip", "aesthetic", "compressibility", "incompressibility"):
        assert name in message
    assert set(scorer_names()) >= {  # plugins may add more
        "pickscore",
        "hpsv2",
        "imagereward",
        "hpsv3",
        "clip",
        "aesthetic",
        "compressibility",
        "incompressibility",
    }


@pytest.mark.parametrize("kind", ["pickscore", "hpsv2", "clip", "aesthetic"])
def test_scorer_from_tiny_weights_follows_the_protocol_and_batches_transparently(tiny, images, kind):
    scorer = build_scorer(kind, weights=tiny(kind), batch_size=1, device="cpu")
    assert isinstance(scorer, Scorer) and scorer.name == kind and scorer.higher_is_better
    assert str(tiny(kind)) in scorer.version
    prompts = PROMPTS[: len(images)]
    one_at_a_time = scorer.score(images, prompts)
    scorer.batch_size = 8
    np.testing.assert_allclose(scorer.score(images, prompts), one_at_a_time, rtol=1e-5, atol=1e-5)
    assert scorer.score([], []).shape == (0,)


def test_images_and_prompts_of_different_lengths_are_refused(images):
    with pytest.raises(PrefpipeError, match="3 images but 2 prompts"):
        build_scorer("compressibility").score(images, ["a", "b"])


def test_hpsv2_weights_folder_without_the_version_checkpoint_says_which_file_is_missing(tiny):
    with pytest.raises(PrefpipeError, match="HPS_v2_compressed.pt"):
        build_scorer("hpsv2", weights=tiny("hpsv2"), version="v2.0", device="cpu")


def test_missing_local_weights_are_reported_without_a_download_attempt(tmp_path):
    with pytest.raises(PrefpipeError, match="neither an existing file or folder nor a hub id"):
        build_scorer("pickscore", weights=str(tmp_path / "no" / "such" / "model"), device="cpu")
