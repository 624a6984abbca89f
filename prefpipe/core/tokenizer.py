"""A real CLIP BPE tokenizer, built offline from the vocabulary that ships in open_clip's wheel.

The hub checkpoints (SD 1.5, SDXL, PickScore, CLIP) store their tokenizer as `vocab.json` +
`merges.txt` + `tokenizer_config.json`. We write exactly those files, so the tiny models load through
the same `from_pretrained` code path as the real ones.

Pitfall (transformers 5): `CLIPTokenizer(vocab_file=..., merges_file=...)` silently builds a 3-token
vocabulary, and a folder without `tokenizer_config.json` gets a huge `model_max_length`. Loading the
folder written here gives the real 49,408-token vocabulary with `model_max_length` 77; tests pin its ids
against open_clip's own tokenizer.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTEXT_LENGTH = 77
# open_clip reads this many merges from its BPE file: 49152 - 256 byte tokens - 2 specials.
_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (same order as open_clip's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def open_clip_bpe_path() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id, 49,408 entries) and merges, in the hub's order."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str = EOS) -> Path:
    """Write a hub-format CLIP tokenizer folder.

    `pad_token` is `<|endoftext|>` for OpenAI CLIP / SD 1.5 / SDXL's first tokenizer and `!` for
    SDXL's second (OpenCLIP bigG pads with id 0, which is `!`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# --- T5 (SD3's third text encoder, FLUX.1's second) -------------------------------------------------------------
#
# No hub here, and no T5 vocabulary ships in a wheel: we train a small SentencePiece unigram model on the
# PartiPrompts text and save it in T5's format: `spiece.model` with pad=0, eos=1, unk=2 and no bos (T5's
# special ids), plus the 100 `<extra_id_N>` sentinels the transformers T5 tokenizer appends after the pieces,
# `model_max_length` 512. The real `T5TokenizerFast` loads the folder (the hub's `tokenizer_3/` of SD3 and
# `tokenizer_2/` of FLUX.1 hold the same files). Training takes about 0.2 s and is deterministic (one thread,
# sentences in file order, no sampling), so the folder is written anew each time, like the CLIP one above.

T5_PIECES = 2000  # SentencePiece vocabulary (the real T5's is 32,000; PartiPrompts supports at most ~2,300)
T5_EXTRA_IDS = 100
T5_MAX_LENGTH = 512
T5_SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def parti_prompts_path() -> Path:
    """The PartiPrompts TSV the T5 tokenizer is trained on: `$PREFPIPE_PARTIPROMPTS`, else the workspace's
    `shared/data/PartiPrompts.tsv` beside this repository."""
    import os

    env = os.environ.get("PREFPIPE_PARTIPROMPTS")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data" / "PartiPrompts.tsv"


def parti_prompt_texts(path: str | Path | None = None) -> list[str]:
    """The `Prompt` column of PartiPrompts, in file order."""
    import csv

    from prefpipe.core.errors import PrefpipeError

    path = Path(path) if path is not None else parti_prompts_path()
    if not path.is_file():
        raise PrefpipeError(
            f"{path}: PartiPrompts TSV not found; the tiny T5 tokenizer is trained on it "
            "(set PREFPIPE_PARTIPROMPTS to the file)"
        )
    with open(path, newline="", encoding="utf-8") as f:
        texts = [row.get("Prompt") or "" for row in csv.DictReader(f, delimiter="\t")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise PrefpipeError(f"{path}: no `Prompt` column or no prompts in it")
    return texts


def train_t5_spiece(texts: list[str], pieces: int = T5_PIECES) -> bytes:
    """A SentencePiece unigram model (serialized `ModelProto`) with T5's special ids: pad 0, eos 1, unk 2, no bos.

    Deterministic: one thread, the sentences in the given order, none sampled or shuffled; trained from an
    iterator, so no file path is recorded in the model.
    """
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=pieces,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


def write_t5_tokenizer(folder: str | Path, texts: list[str] | None = None, pieces: int = T5_PIECES) -> Path:
    """Write a hub-format T5 tokenizer folder: `spiece.model`, `tokenizer_config.json`, `special_tokens_map.json`
    and `tokenizer.json` (the fast tokenizer, so loading needs neither sentencepiece nor protobuf)."""
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = train_t5_spiece(parti_prompt_texts() if texts is None else texts, pieces)
    (folder / "spiece.model").write_bytes(model)
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": T5_MAX_LENGTH,
        "extra_ids": T5_EXTRA_IDS,
        "additional_special_tokens": extra,
        **T5_SPECIAL,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({**T5_SPECIAL, "additional_special_tokens": extra}, indent=2))
    # transformers converts spiece.model into the fast tokenizer; keep its tokenizer.json beside it
    tok = T5TokenizerFast.from_pretrained(folder)
    tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder
