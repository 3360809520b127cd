"""Batched per-row sampling as pure torch functions: every row its own parameters, no host sync per row.

Randomness is not drawn from a generator but hashed from (seed, step, token id), so a seeded row
samples the same tokens whatever else shares its batch, on any device, and a CUDA graph could
replay it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer hash (two multiply-xorshift rounds); values stay below 2**59 in int64, so no overflow.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) values, a pure function of (seed, step, token id).

    seeds, steps: [B] int64 -> [B, V] float32
    """
    row = _mix32(_mix32(seeds & _MASK32) ^ (seeds >> 32))
    row = _mix32(row ^ _mix32(steps + 0x68E31DA4))
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) * 0x27D4EB2D & _MASK32
    bits = _mix32(row[:, None] ^ token[None, :]) >> 8  # 24 random bits
    return (bits.to(torch.float32) + 0.5) / float(1 << 24)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Divide positive and multiply negative logits of tokens already seen, as HF does.

    logits: [B, V] float, seen: [B, V] bool, penalty: [B]
    """
    penalty = penalty[:, None]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k then top-p, in descending order, with their token ids.

    logits: [B, V]; temperature, top_p: [B] float; top_k: [B] int (0 = off) -> ([B, V], [B, V])
    """
    vocab = logits.shape[-1]
    scaled = logits.float() / temperature.clamp_min(1e-5)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp_max(vocab), vocab)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is under top_p: the most likely token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return probs, order


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    """One token per row; rows with temperature 0 take the argmax.

    logits: [B, V] -> [B] int64
    """
    probs, order = filtered_probs(logits, temperature, top_k, top_p)
    noise = uniform_noise(seeds, steps, logits.shape[-1]).gather(1, order)
    # Exponential race: argmax(p / E), E ~ Exp(1) i.i.d., picks token i with probability p_i.
    choice = (probs / -noise.log()).argmax(dim=-1, keepdim=True)
    sampled = order.gather(1, choice).squeeze(1)
    return torch.where(temperature == 0, logits.argmax(dim=-1), sampled)


@dataclass(frozen=True)
class SamplingTensors:
    """One step's per-row parameters, in the order of the step's logits."""

    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    penalty: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64
    ban_eos: torch.Tensor  # [B] bool: min_new_tokens not reached yet


def sample_rows(
    logits: torch.Tensor, params: SamplingTensors, seen: torch.Tensor, eos_mask: torch.Tensor
) -> torch.Tensor:
    """Penalties, then end-of-sequence suppression, then sampling.

    logits: [B, V]; seen: [B, V] bool; eos_mask: [V] bool -> [B] int64
    """
    # Applied to every row (a penalty of 1 changes nothing), so the step has one shape to capture.
    logits = apply_repetition_penalty(logits.float(), seen, params.penalty)
    logits = logits.masked_fill(params.ban_eos[:, None] & eos_mask[None, :], float("-inf"))
    return sample(logits, params.temperature, params.top_k, params.top_p, params.seeds, params.steps)
