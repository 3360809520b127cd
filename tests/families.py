"""Tiny random models of many families, for the model matrix: each is built in memory from its stock
transformers config (float32, a few layers), with the demo tokenizer's vocabulary.

The sizes keep every family quick on two CPU cores; what they keep of the real ones is what the engine
must get right: the attention layout (multi-head, grouped, multi-query), positions (rotary, learned,
alibi), sliding windows (16 tokens here, so prompts a few windows long cross them), and the model's own
processing of its logits (a scale, a softcap).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

WINDOW = 16
SEED = 1234

# Shared by every family: what a decoder of each naming convention calls its sizes.
LLAMA_LIKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def _llama_like(name: str, **extra: Any) -> Callable[[int], PretrainedConfig]:
    def build(vocab: int) -> PretrainedConfig:
        config_class = getattr(transformers, name)
        return config_class(vocab_size=vocab, **{**LLAMA_LIKE, **extra})

    return build


def _config(name: str, **fields: Any) -> Callable[[int], PretrainedConfig]:
    def build(vocab: int) -> PretrainedConfig:
        return getattr(transformers, name)(vocab_size=vocab, **fields)

    return build


GPT_SIZES = {"n_embd": 64, "n_layer": 2, "n_head": 4}
FALCON = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "bias": False}

FAMILIES: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": _llama_like("LlamaConfig"),
    "mistral-sliding": _llama_like("MistralConfig", sliding_window=WINDOW),
    "mixtral-sliding": _llama_like("MixtralConfig", sliding_window=WINDOW, num_local_experts=4),
    "qwen2": _llama_like("Qwen2Config"),
    "qwen2-sliding": _llama_like(
        "Qwen2Config",
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        num_hidden_layers=3,
    ),
    "qwen3": _llama_like("Qwen3Config", head_dim=16),
    "qwen2-moe": _llama_like(
        "Qwen2MoeConfig",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
    "qwen3-moe": _llama_like(
        "Qwen3MoeConfig", head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    ),
    "smollm3": _llama_like("SmolLM3Config", no_rope_layer_interval=2),
    "gemma": _llama_like("GemmaConfig", head_dim=16),
    "gemma2": _llama_like(
        "Gemma2Config", head_dim=16, sliding_window=WINDOW, final_logit_softcapping=2.0, num_hidden_layers=3
    ),
    "gemma3": _llama_like(
        "Gemma3TextConfig",
        head_dim=16,
        sliding_window=WINDOW,
        final_logit_softcapping=2.0,
        num_hidden_layers=3,
        sliding_window_pattern=2,
    ),
    "phi3-sliding": _llama_like("Phi3Config", sliding_window=WINDOW),
    "starcoder2": _llama_like("Starcoder2Config", sliding_window=WINDOW),
    "cohere": _llama_like("CohereConfig", logit_scale=16.0),
    "granite": _llama_like("GraniteConfig", logits_scaling=8.0),
    "olmo2": _llama_like("Olmo2Config"),
    "stablelm": _llama_like("StableLmConfig"),
    "phi": _config(
        "PhiConfig",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    ),
    "gpt2": _config("GPT2Config", n_positions=128, **GPT_SIZES),
    "gptj": _config("GPTJConfig", n_positions=512, rotary_dim=8, **GPT_SIZES),
    "gpt-neox": _config(
        "GPTNeoXConfig",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    ),
    "opt": _config(
        "OPTConfig",
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
    ),
    "bloom-alibi": _config("BloomConfig", hidden_size=64, n_layer=2, n_head=4),
    "mpt-alibi": _config("MptConfig", d_model=64, n_layers=2, n_heads=4, max_seq_len=512),
    "falcon-mqa": _config("FalconConfig", multi_query=True, **FALCON),
    "falcon-alibi": _config("FalconConfig", alibi=True, multi_query=False, parallel_attn=False, **FALCON),
    "falcon-40b-layout": _config(
        "FalconConfig",
        new_decoder_architecture=True,
        num_kv_heads=2,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        bias=False,
    ),
}


def build(family: str, vocab: int, eos_id: int) -> PreTrainedModel:
    """The family's tiny model with fixed random weights, in float32 and eval mode, its end-of-text
    token the tokenizer's."""
    return build_from(FAMILIES[family](vocab), eos_id)


def build_from(config: PretrainedConfig, eos_id: int) -> PreTrainedModel:
    """`build`, from a config of one's own."""
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    return model.eval()


def reference(
    model: PreTrainedModel, ids: list[int], new_tokens: int, eos: int, min_new_tokens: int = 0
) -> list[int]:
    """What `model.generate()` decodes greedily after `ids`: the ids the engine must give."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids], device=model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            max_new_tokens=new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            pad_token_id=eos,
        )
    generated = out[0, len(ids) :].tolist()
    return generated[: generated.index(eos) + 1] if eos in generated else generated


def penalised_greedy(
    model: PreTrainedModel,
    ids: list[int],
    new_tokens: int,
    frequency: float,
    presence: float,
    repetition: float,
) -> list[int]:
    """Greedy decoding by hand on the model's logits with the penalties as their definitions say."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            for token in set(ids + out):  # transformers' repetition penalty: prompt and output
                value = logits[token]
                logits[token] = value / repetition if value > 0 else value * repetition
            for token in set(out):  # OpenAI's: the output only
                logits[token] -= out.count(token) * frequency + presence
            out.append(int(logits.argmax()))
    return out


def model_logprobs(model: PreTrainedModel, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of the model's own logits at each generated token's place: [len(generated), V]."""
    ids = torch.tensor([prompt + generated], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(generated)]
    return logits.float().log_softmax(-1).cpu()


def assert_scores(
    want: torch.Tensor, chosen: list[tuple[int, float]], top: list[list[tuple[int, float]]]
) -> None:
    """Each place's (token, logprob) and its alternatives' equal `want`'s within 1e-4; the alternatives
    are the most likely tokens, most likely first (ties in either order)."""
    assert len(chosen) == len(top) == want.shape[0]
    for place, ((token, logprob), alternatives) in enumerate(zip(chosen, top, strict=True)):
        row = want[place]
        assert abs(logprob - row[token].item()) < 1e-4, place
        best = row.topk(len(alternatives)).values
        ids, values = [t for t, _ in alternatives], [v for _, v in alternatives]
        torch.testing.assert_close(torch.tensor(values), best, atol=1e-4, rtol=0)
        torch.testing.assert_close(row[ids], best, atol=1e-4, rtol=0)
