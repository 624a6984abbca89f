"""HPSv3 (Ma et al., 2025): Qwen2-VL-7B-Instruct fine-tuned on HPDv3 with an uncertainty-aware RankNet head.

Reference: the `hpsv3` package 1.0.0 (github.com/MizzenAI/HPSv3): `hpsv3/inference.py`
(`HPSv3RewardInferencer.prepare_batch` and `reward`), `hpsv3/model/qwen2vl_trainer.py`
(`Qwen2VLRewardModelBT.forward`, rm_head_type "ranknet", reward_token "special"), `hpsv3/train.py`
(`create_model_and_processor`), `hpsv3/dataset/utils.py` (`smart_resize`, `fetch_image`) and
`hpsv3/dataset/data_collator_qwen.py` (the instruction). For each (image, prompt):

    image    -> RGB, resized (PIL bicubic) to h x w, multiples of 28 near the original aspect, at the package's
                pixel budget min = max = 256 * 28 * 28 (`smart_resize`), then Qwen2-VL's image processor
                (OpenAI mean/std, 14 px patches, 2x2 merge: about 256 image tokens)
    text     -> one user turn of Qwen2-VL's chat template: the image, then INSTRUCTION(prompt) + "Please provide the
                overall ratings of this image: <|Reward|>" ..., and the assistant header (add_generation_prompt)
    hidden   -> Qwen2-VL: image features scattered into the `<|image_pad|>` embeddings, the language model run with
                plain 1-D positions 0..L-1 (the package calls the decoder with position_ids=None, so it never
                uses Qwen2-VL's 3-D M-RoPE positions), right padding
    (mu, sigma) = rm_head(hidden at the `<|Reward|>` token), in fp32:
                Linear(d, 1024) - ReLU - Dropout - Linear(1024, 16) - ReLU - Linear(16, 2)
    score    = mu

Weights: `HPSv3.safetensors` of the hub repo `MizzenAI/HPSv3` (the whole model, transformers 4.45 key names:
`model.*` the decoder, `visual.*`, `lm_head.*` unused here, `rm_head.*`), and the base model's config and
processor from `Qwen/Qwen2-VL-7B-Instruct`. A local folder holding HPSv3.safetensors works as weights; its
`base/` subfolder, if any, is the base (config + processor). The `<|Reward|>` token is added to the tokenizer as
the package does. bf16 on a GPU (the authors' precision); the 7B is refused on the CPU (see `MAX_CPU_PARAMETERS`).
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from labelers.base import TorchScorer, from_pretrained, hub_file, is_local, require_hub_id
from prefpipe.core.errors import PrefpipeError

DEFAULT_WEIGHTS = "MizzenAI/HPSv3"
DEFAULT_BASE = "Qwen/Qwen2-VL-7B-Instruct"
CHECKPOINT = "HPSv3.safetensors"
BASE_SUBFOLDER = "base"
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # the package's min_pixels = max_pixels
FACTOR = 28
MAX_RATIO = 200
MAX_CPU_PARAMETERS = 2e9  # above this, CPU scoring would take minutes per image and tens of GiB: refused

# hpsv3/dataset/data_collator_qwen.py, verbatim (INSTRUCTION's typos included: they are in the model's training text)
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: W291 - trailing spaces are part of the training text
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS) -> tuple[int, int]:
    """(h, w), multiples of `factor` near the aspect ratio, with h*w brought into [min_pixels, max_pixels]
    (hpsv3/dataset/utils.py `smart_resize`, from qwen-vl-utils). With min = max the ceil branch may overshoot."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise PrefpipeError(f"image of {width}x{height}: HPSv3 needs an aspect ratio under {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def hpsv3_image(image: Image.Image) -> Image.Image:
    """The package's `fetch_image` on a PIL image: RGB, then PIL bicubic resize to `smart_resize`'s size."""
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width)
    return image.resize((width, height), Image.BICUBIC)


def hpsv3_messages(prompt: str) -> list[dict]:
    """One conversation as the package builds it (the image itself is passed to the processor separately)."""
    return [{"role": "user", "content": [
        {"type": "image", "min_pixels": PIXELS, "max_pixels": PIXELS},
        {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN},
    ]}]


def resolve_checkpoint(weights: str | Path) -> Path:
    """HPSv3.safetensors from a local file, a local folder holding it, or a hub repo id."""
    if is_local(weights):
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / CHECKPOINT
            if not path.exists():
                raise PrefpipeError(f"{path.parent} holds no {CHECKPOINT} (the HPSv3 weights)")
        if path.suffix != ".safetensors":
            raise PrefpipeError(f"{path}: HPSv3 weights are read from safetensors only (the hub's {CHECKPOINT})")
        return path
    return hub_file(require_hub_id(str(weights), "HPSv3 weights"), CHECKPOINT)


def backbone_key(key: str) -> tuple[str, str] | None:
    """A checkpoint key -> ("backbone", Qwen2VLModel key) or ("head", rm_head key); None for keys not used
    (lm_head). Both transformers 4.45 names (`model.layers...`, `visual...`) and 5.x names
    (`model.language_model...`, `model.visual...`) are read."""
    if key.startswith("rm_head."):
        return "head", key.removeprefix("rm_head.")
    if key.startswith("lm_head."):
        return None
    for old, new in (("model.language_model.", "language_model."), ("model.visual.", "visual."),
                     ("visual.", "visual."), ("model.", "language_model.")):
        if key.startswith(old):
            return "backbone", new + key.removeprefix(old)
    return "unknown", key


def build_head(weights: dict):
    """The package's default ranknet head, sized from its weights: Linear-ReLU-Dropout-Linear-ReLU-Linear."""
    import torch

    try:
        d, hidden, small, out = weights["0.weight"].shape[1], weights["0.weight"].shape[0], weights["3.weight"].shape[0], weights["5.weight"].shape[0]
    except KeyError as err:
        raise PrefpipeError(f"HPSv3 rm_head weights lack {err}: expected rm_head.0, rm_head.3, rm_head.5") from err
    head = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(hidden, small), torch.nn.ReLU(), torch.nn.Linear(small, out))
    head.load_state_dict(weights, strict=True)
    return head.float().eval()


def build_empty(cls, config, dtype, device):
    """`cls(config)` made directly in `dtype` on `device`, its random initialisation skipped (every weight is
    loaded next): a 7B in bf16 never passes through fp32 or the host."""
    import torch
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            return cls(config)
    finally:
        torch.set_default_dtype(previous)


class HPSv3(TorchScorer):
    """HPSv3 score (mu of the RankNet head) of each (image, prompt) pair; about -5 to 15 on real images.

    weights: hub repo id (default `MizzenAI/HPSv3`), a local folder holding HPSv3.safetensors, or that file.
    base: the Qwen2-VL model whose config and processor HPSv3 was trained from (default
      `Qwen/Qwen2-VL-7B-Instruct`, or the weights folder's `base/`).
    dtype: default bf16 on a GPU, fp32 on the CPU. The head always runs in fp32, as in the package.
    """

    name = "hpsv3"
    default_weights = DEFAULT_WEIGHTS
    higher_is_better = True

    def __init__(self, weights: str | Path | None = None, base: str | Path | None = None, batch_size: int = 8,
                 device: str = "auto", dtype=None) -> None:
        import torch

        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if dtype in (None, "auto") and self.device.type == "cuda":
            self.dtype = torch.bfloat16  # HPSv3 was trained and is served in bf16; fp16 can overflow in Qwen2
        weights = weights or DEFAULT_WEIGHTS
        checkpoint = resolve_checkpoint(weights)
        self.version = f"{weights}:{checkpoint.name}"
        if base is None:
            beside = checkpoint.parent / BASE_SUBFOLDER
            base = beside if beside.is_dir() else DEFAULT_BASE
        self.processor = self._load_processor(str(base))
        self.reward_id = self.processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.model, self.head = self._load_model(str(base), checkpoint)

    @staticmethod
    def _load_processor(base: str):
        from transformers import AutoProcessor

        processor = from_pretrained(AutoProcessor, base, "Qwen2-VL processor", padding_side="right")
        processor.tokenizer.padding_side = "right"
        processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # as train.py does
        return processor

    def _load_model(self, base: str, checkpoint: Path):
        import torch
        from safetensors import safe_open
        from transformers import AutoConfig, Qwen2VLModel

        config = from_pretrained(AutoConfig, base, "Qwen2-VL config")
        with safe_open(str(checkpoint), framework="pt") as f:
            keys = list(f.keys())
            embed = next((k for k in keys if k.endswith("embed_tokens.weight")), None)
            if embed is None:
                raise PrefpipeError(f"{checkpoint}: no embed_tokens weight: not an HPSv3 checkpoint")
            config.text_config.vocab_size = f.get_slice(embed).get_shape()[0]  # resized for <|Reward|>
        if len(self.processor.tokenizer) > config.text_config.vocab_size:
            raise PrefpipeError(f"{checkpoint}: {config.text_config.vocab_size} token embeddings but the tokenizer of "
                                f"{base} has {len(self.processor.tokenizer)}: pass the base model HPSv3 was trained from")
        with torch.device("meta"):
            parameters = sum(p.numel() for p in Qwen2VLModel(config).parameters())
        if self.device.type == "cpu" and parameters > MAX_CPU_PARAMETERS:
            raise PrefpipeError(
                f"HPSv3 ({base}) has {parameters / 1e9:.1f} B parameters: it needs about "
                f"{parameters * 2 / 2**30:.0f} GiB of GPU memory in bf16 (plus activations), and on this CPU "
                f"{parameters * 4 / 2**30:.0f} GiB in fp32 and minutes per image; run it with --device cuda"
            )
        backbone, head, unknown = {}, {}, []
        with safe_open(str(checkpoint), framework="pt") as f:
            for key in keys:
                target = backbone_key(key)
                if target is None:
                    continue
                kind, name = target
                if kind == "unknown":
                    unknown.append(key)
                else:
                    tensor = f.get_tensor(key)
                    (head if kind == "head" else backbone)[name] = tensor if kind == "head" else tensor.to(self.dtype)
        if unknown:
            raise PrefpipeError(f"{checkpoint}: unexpected weights {unknown[:5]}: not an HPSv3 checkpoint")
        config.text_config.use_cache = False
        model = build_empty(Qwen2VLModel, config, self.dtype, self.device)
        result = model.load_state_dict(backbone, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise PrefpipeError(f"{checkpoint}: weights do not match {base}'s config (missing "
                                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
        return model.eval(), build_head(head).to(self.device)

    def prepare_batch(self, images: list[Image.Image], prompts: list[str]) -> dict:
        texts = [self.processor.apply_chat_template(hpsv3_messages(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        inputs = self.processor(text=texts, images=[hpsv3_image(im) for im in images], padding=True,
                                return_tensors="pt")
        return dict(inputs)

    def forward_batch(self, inputs: dict):
        ids = inputs["input_ids"].to(self.device)
        is_reward = ids == self.reward_id
        if not bool((is_reward.sum(dim=1) == 1).all()):
            raise PrefpipeError(f"each HPSv3 input must hold exactly one {REWARD_TOKEN} token (a prompt may not contain it)")
        language = self.model.language_model
        embeds = language.embed_tokens(ids)
        pixels = inputs["pixel_values"].to(self.device, self.model.visual.dtype)
        image_embeds = self.model.visual(pixels, grid_thw=inputs["image_grid_thw"].to(self.device)).pooler_output
        image_mask = (ids == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        hidden = language(inputs_embeds=embeds, attention_mask=inputs["attention_mask"].to(self.device),
                          use_cache=False).last_hidden_state  # position_ids None: 0..L-1, as the package
        mu_sigma = self.head(hidden[is_reward].float())
        return mu_sigma[:, 0]
