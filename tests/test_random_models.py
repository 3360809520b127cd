"""Random-weight models of named shapes, for benchmarks and smoke tests where nothing can be downloaded."""

from __future__ import annotations

import pytest
import torch

from trickle.generation import AsyncEngine, EngineConfig, ModelLoadError, SamplingParams, load_model
from trickle.generation.random_models import synthetic_tokenizer


def test_synthetic_tokenizer_has_exactly_the_vocabulary_and_round_trips() -> None:
    tokenizer = synthetic_tokenizer(5000)
    assert len(tokenizer) == 5000
    assert tokenizer.eos_token_id == 0
    text = "hello World, 42 bakers"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_ids_to_tokens(4999) != tokenizer.unk_token


def test_the_falcon_7b_shape_is_falcon_7b() -> None:
    from trickle.generation.random_models import SHAPES

    config = SHAPES["falcon-7b"]()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4544, 32, 71)
    assert config.multi_query and config.vocab_size == 65024


async def test_a_random_model_serves_through_the_engine() -> None:
    loaded = load_model("random:tiny-falcon", dtype="float32", device="cpu")
    assert loaded.model.config.vocab_size == len(loaded.tokenizer)
    engine = AsyncEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=2, max_seq_len=128))
    await engine.start()
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, seed=1)
    ids = engine.prompts.truncated("some words", 64, params.max_new_tokens)
    outputs = [o async for o in engine.generate(ids, params)]
    await engine.stop()
    assert outputs[-1].usage["completion_tokens"] == 12
    assert "".join(o.text for o in outputs)


def test_two_builds_of_a_shape_have_the_same_weights() -> None:
    first = load_model("random:tiny-falcon", dtype="float32", device="cpu").model
    second = load_model("random:tiny-falcon", dtype="float32", device="cpu").model
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_unknown_shape_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_model("random:gpt-9", device="cpu")
    assert "falcon-7b" in str(caught.value) and "\n" not in str(caught.value)
