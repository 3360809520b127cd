"""Prompts: the ids the engine is given are the tokenizer's own, and the length bound that refuses a text
before tokenizing it never refuses one that fits."""

from __future__ import annotations

import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trickle.generation import LoadedModel, Prompts, RequestError
from trickle.generation.prompts import NORMALIZER_FOLD, chars_per_token

TEXTS = ["The baker lights the oven", "café ☕ 日本語 🍞🍞", "a", "  spaces\tand\nlines  ", "x" * 300]


def random_text(rng: random.Random, length: int) -> str:
    alphabet = "abcdefghij klmnop.,;é日本🍞\n\t" + "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(20))
    return "".join(rng.choice(alphabet) for _ in range(length))


@pytest.mark.parametrize("special_tokens", [True, False])
def test_prompt_ids_are_the_tokenizers_own(tiny: LoadedModel, special_tokens: bool) -> None:
    prompts = Prompts(tiny.tokenizer, 512)
    rng = random.Random(3)
    for text in [*TEXTS, *(random_text(rng, 200) for _ in range(20))]:
        expected = tiny.tokenizer.encode(text, add_special_tokens=special_tokens)
        assert prompts.encode(text, special_tokens) == expected
    prompts.close()


def test_truncation_keeps_the_most_recent_tokens(tiny: LoadedModel) -> None:
    prompts = Prompts(tiny.tokenizer, 512)
    text = "The oven warms and the dough rests. " * 40
    assert prompts.truncated(text, 16, 8) == tiny.tokenizer.encode(text)[-16:]
    with pytest.raises(RequestError) as refused:
        prompts.truncated(text, 500, 100)
    assert refused.value.field == "max_new_tokens"
    prompts.close()


def test_the_length_bound_never_exceeds_the_real_token_count(tiny: LoadedModel) -> None:
    prompts = Prompts(tiny.tokenizer, 512)
    assert prompts.chars_per_token == max(map(len, tiny.tokenizer.get_vocab()))
    rng = random.Random(5)
    words = sorted(tiny.tokenizer.get_vocab(), key=len)[-50:]  # the longest tokens, spelt out
    texts = [*TEXTS, *(random_text(rng, 400) for _ in range(20))]
    texts += ["".join(tiny.tokenizer.convert_tokens_to_string([w]) for w in rng.choices(words, k=60))]
    for text in texts:
        assert prompts.fewest_tokens(len(text)) <= len(prompts.encode(text))
    prompts.close()


def wrapped(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def bpe(vocab: dict[str, int]) -> Tokenizer:
    return Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))


VOCAB = {"<unk>": 0, "a": 1, "b": 2, "▁": 3}


def test_no_bound_where_the_tokenizer_may_drop_characters() -> None:
    whitespace = bpe(VOCAB)
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()  # drops the spaces between words
    regex = bpe(VOCAB)
    regex.normalizer = normalizers.Replace(Regex(r"\s+"), "")
    stripped = bpe(VOCAB)
    stripped.normalizer = normalizers.Strip()
    for tokenizer in [whitespace, regex, stripped]:
        assert chars_per_token(wrapped(tokenizer)) is None


def test_a_unicode_normalizer_widens_the_bound() -> None:
    plain = bpe(VOCAB)
    metaspace = bpe(VOCAB)
    metaspace.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    assert chars_per_token(wrapped(plain)) == len("<unk>")
    assert chars_per_token(wrapped(metaspace)) == len("<unk>") * NORMALIZER_FOLD


def test_a_tokens_bytes_are_what_it_stands_for_parts_of_characters_included(tiny: LoadedModel) -> None:
    """OpenAI's `bytes`: a token holding part of a character decodes alone to U+FFFD but has its bytes;
    put together, a text's tokens' bytes are the text's UTF-8. Byte-level BPE (the tiny model's) and a
    sentencepiece vocabulary with byte fallback."""
    prompts = Prompts(tiny.tokenizer, 100)
    text = " héllo 🎉 naïve"
    ids = tiny.tokenizer.encode(text, add_special_tokens=False)
    assert "\ufffd" in "".join(prompts.token_text(token) for token in ids)  # parts of characters
    assert b"".join(prompts.token_bytes(token) for token in ids) == text.encode()
    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "\u2581h": 3}
    pieces = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    pieces.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    fallback = Prompts(PreTrainedTokenizerFast(tokenizer_object=pieces, unk_token="<unk>"), 10)
    assert [fallback.token_bytes(token) for token in (3, 1, 2)] == [b" h", b"\xc3", b"\xa9"]
