"""The T5 tokenizer of the tiny SD3 / FLUX.1 pipelines: a SentencePiece unigram model trained offline on PartiPrompts,
in T5's format, loaded by the real transformers `T5TokenizerFast`; its ids pinned against an independent
`sentencepiece.SentencePieceProcessor` encoding, as the CLIP tokenizer's are against open_clip's (test_tokenizer.py).
About 5 s."""

import pytest
import sentencepiece as spm
from transformers import T5TokenizerFast

from prefpipe.core.errors import PrefpipeError
from prefpipe.core.tokenizer import (
    T5_EXTRA_IDS,
    T5_MAX_LENGTH,
    T5_PIECES,
    parti_prompt_texts,
    write_t5_tokenizer,
)

TEXTS = [
    "a photo of a RED cat, sitting on a mat!",
    "Thé naïve café  déjà-vu 123 ok",
    "an astronaut riding a horse on the moon, 4k, trending on artstation",
    "",
    "zebra 😀 <extra_id_0> ～ｆｕｌｌｗｉｄｔｈ",
]




@pytest.fixture(scope="module")
def folder(tmp_path_factory, parti_prompts):
    return write_t5_tokenizer(tmp_path_factory.mktemp("t5") / "tokenizer_3")


@pytest.fixture(scope="module")
def tokenizer(folder):
    return T5TokenizerFast.from_pretrained(folder)


def test_the_folder_holds_t5s_files_and_special_ids(folder, tokenizer):
    assert {p.name for p in folder.iterdir()} == {
        "spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert len(tokenizer) == T5_PIECES + T5_EXTRA_IDS
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None
    assert tokenizer.model_max_length == T5_MAX_LENGTH
    # T5's sentinels follow the pieces, numbered down from the last id
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == T5_PIECES + T5_EXTRA_IDS - 1
    assert tokenizer.convert_tokens_to_ids(f"<extra_id_{T5_EXTRA_IDS - 1}>") == T5_PIECES
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert sp.get_piece_size() == T5_PIECES
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)


def test_ids_match_an_independent_sentencepiece_encoding_on_real_prompts(folder, tokenizer, parti_prompts):
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    texts = parti_prompt_texts(parti_prompts)[::7] + TEXTS[:4]
    ours = tokenizer(texts).input_ids
    for text, row in zip(texts, ours):
        assert row == sp.encode(text) + [sp.eos_id()], text  # T5 appends </s>, no <s>
    # a sentinel in the text is one special token, as in the real T5
    ids = tokenizer(TEXTS[4]).input_ids
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") in ids
    assert ids[-1] == 1


def test_every_loading_path_gives_the_same_ids(folder, tokenizer, tmp_path):
    """The fast tokenizer's own tokenizer.json, and the conversion from spiece.model alone (as from a hub folder
    that ships only the SentencePiece model), agree."""
    import shutil

    only_spiece = tmp_path / "only-spiece"
    shutil.copytree(folder, only_spiece)
    (only_spiece / "tokenizer.json").unlink()
    converted = T5TokenizerFast.from_pretrained(only_spiece)
    texts = TEXTS[:4]
    assert converted(texts).input_ids == tokenizer(texts).input_ids


def test_padding_and_truncation_as_the_pipelines_call_it(tokenizer):
    """SD3 and FLUX call it with padding="max_length", truncation, max_length=max_sequence_length."""
    batch = tokenizer(["a cat", "word " * 300], padding="max_length", max_length=16, truncation=True)
    short, long = batch.input_ids
    assert len(short) == len(long) == 16
    assert short[short.index(1) + 1:] == [0] * (16 - short.index(1) - 1)
    assert long[-1] == 1 and 0 not in long
    assert batch.attention_mask[0] == [1] * (short.index(1) + 1) + [0] * (16 - short.index(1) - 1)


def test_the_build_is_deterministic(folder, tmp_path):
    again = write_t5_tokenizer(tmp_path / "again")
    for f in folder.iterdir():
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_missing_prompts_file_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFPIPE_PARTIPROMPTS", str(tmp_path / "nope.tsv"))
    with pytest.raises(PrefpipeError, match="PREFPIPE_PARTIPROMPTS"):
        write_t5_tokenizer(tmp_path / "t")
