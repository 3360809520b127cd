"""Random-weight models of named shapes, built directly on the device, with a tokenizer of the right size.

For benchmarks and smoke tests where no weights can be downloaded: the throughput of a model does not
depend on the values of its weights. `--model random:falcon-7b` serves one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
SEED = 1234

_LLAMA_7B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
}

SHAPES: dict[str, Callable[[], PretrainedConfig]] = {
    # transformers' FalconConfig defaults are the Falcon-7B shape: 32 layers, 4544 wide, multi-query.
    "falcon-7b": FalconConfig,
    "llama-7b": lambda: LlamaConfig(**_LLAMA_7B),
    # Grouped-query attention (8 key/value heads), a wider MLP, a 128k vocabulary and 8k positions.
    "llama-3-8b": lambda: LlamaConfig(
        **{
            **_LLAMA_7B,
            "vocab_size": 128256,
            "intermediate_size": 14336,
            "num_key_value_heads": 8,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        }
    ),
    "tiny-falcon": lambda: FalconConfig(
        vocab_size=2048,
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=2048,
    ),
}

# Byte-level characters that synthetic tokens are spelled with: a space marker, letters, digits.
_LETTERS = "Ġ" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789.,"


def _synthetic_merges() -> Iterator[tuple[str, str]]:
    """Merges spelling every pair, then every triple, of the letters: an endless supply of tokens."""
    for a, b in itertools.product(_LETTERS, repeat=2):
        yield a, b
    for a, b, c in itertools.product(_LETTERS, repeat=3):
        yield a + b, c


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with exactly `vocab_size` tokens, id 0 being the EOS token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {EOS: 0, **{char: i + 1 for i, char in enumerate(alphabet)}}
    merges = []
    for a, b in _synthetic_merges():
        if len(vocab) >= vocab_size:
            break
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def random_model(
    shape: str, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build the named shape with random weights, in place on `device` (no CPU copy of 7B weights)."""
    config = SHAPES[shape]()
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    return model.eval(), synthetic_tokenizer(config.vocab_size)
