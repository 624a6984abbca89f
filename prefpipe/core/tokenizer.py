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
