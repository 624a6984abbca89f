import open_clip
import pytest
from transformers import CLIPTokenizer

from prefpipe.core.tokenizer import write_clip_tokenizer

TEXTS = [
    "a photo of a RED cat, sitting on a mat!",
    "Thé naïve café  déjà-vu 123 ok",
    "an astronaut riding a horse on the moon, 4k, trending on artstation",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def test_tokenizer_has_the_real_vocabulary_and_77_token_context(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)


def test_tokenizer_ids_match_open_clip_tokenizer(tokenizer):
    reference = open_clip.get_tokenizer("ViT-H-14")(TEXTS)  # pads with 0 after <|endoftext|>
    ours = tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True).input_ids
    for text, ref_row, our_row in zip(TEXTS, reference.tolist(), ours):
        n = ref_row.index(49407) + 1  # up to and including end-of-text
        assert our_row[:n] == ref_row[:n], text
        assert len(our_row) == 77


def test_second_sdxl_tokenizer_pads_with_exclamation_mark_id_0(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, pad_token="!"))
    ids = tok(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert tok.pad_token_id == 0
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {0}


def test_long_prompts_are_truncated_to_77_tokens_ending_with_eos(tokenizer):
    ids = tokenizer(["word " * 200], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[-1] == 49407
