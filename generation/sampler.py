"""Batched per-row sampling as pure torch functions: every row its own parameters, no host sync per row.

Randomness is not drawn from a generator but hashed from (seed, step, token id), so a seeded row
samples the same tokens whatever else shares its batch, on any device, and a CUDA graph could
replay it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from trickle.generation.top_keys import largest

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer hash (two multiply-xorshift rounds); values stay below 2**59 in int64, so no overflow.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) values, a pure function of (seed, step, token id).

    seeds, steps: [B] int64; tokens: token ids, [B, N] or [N] -> [B, N] float32
    """
    row = _mix32(_mix32(seeds & _MASK32) ^ (seeds >> 32))
    row = _mix32(row ^ _mix32(steps + 0x68E31DA4))
    token = tokens * 0x27D4EB2D & _MASK32
    return unit_interval(_mix32(row[:, None] ^ token) >> 9)


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """23 random bits -> float32 strictly inside (0, 1). With 24 bits the largest value would round to
    1.0 in float32, its -log to 0, and that token would win the race whatever its probability."""
    return (bits.to(torch.float32) + 0.5) / float(1 << 23)


# An argmax over the vocabulary is a reduction that one GPU program runs per row: at one row, one
# program walks all of it. `argmax` splits each row into chunks of this many tokens, reduced apart.
ARGMAX_CHUNK = 1024


def argmax(values: torch.Tensor) -> torch.Tensor:
    """`values.argmax(dim=-1)` for [B, V] -> [B], the same index (the first of equal maxima; the first
    NaN where there is one), reduced in chunks of ARGMAX_CHUNK: each chunk's maximum and its first
    position, then the first chunk holding the largest. Compiled, that is many programs a row and a
    small second reduction rather than one program walking the row."""
    if values.shape[-1] <= ARGMAX_CHUNK:
        return values.argmax(dim=-1)
    # Padding goes past the last real token: a tie with it is won by the real token, the lower index.
    length = values.shape[-1]
    chunks = -(-length // ARGMAX_CHUNK)
    padded = torch.nn.functional.pad(values, (0, chunks * ARGMAX_CHUNK - length), value=float("-inf"))
    best, within = padded.view(*values.shape[:-1], chunks, ARGMAX_CHUNK).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return chunk.squeeze(-1) * ARGMAX_CHUNK + within.gather(-1, chunk).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Divide positive and multiply negative logits of tokens already seen, as HF does.

    logits: [B, V] float, seen: [B, V] bool, penalty: [B]
    """
    penalty = penalty[:, None]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


# How a step ranks the vocabulary. Every mode gives a row the same token; the cheapest that serves all
# of a step's rows is used (`sampling_mode`).
PLAIN = "plain"  # no row filters: nothing is ranked
TOP_K = "top_k"  # every sampled row keeps at most TOP_K_CANDIDATES tokens: only those are ranked
FULL = "full"  # the whole vocabulary is sorted
MODES = (PLAIN, TOP_K, FULL)
TOP_K_CANDIDATES = 64


def sampling_mode(rows: Iterable[tuple[float, int, float]], vocab_size: int) -> str:
    """The cheapest mode that serves every row, given each row's (temperature, top_k, top_p)."""
    plain = ranked = large = False
    for temperature, top_k, top_p in rows:
        if temperature == 0:
            continue  # greedy: the argmax, in every mode
        k = top_k if 0 < top_k < vocab_size else 0
        if k == 0 and top_p >= 1.0:
            plain = True
        else:
            ranked = True
            large = large or k == 0 or k > TOP_K_CANDIDATES
    if not ranked:
        return PLAIN
    return FULL if plain or large else TOP_K


def ranking_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys, one per value, in the order of a stable descending sort of `values` along the last
    dimension: larger values first, equal values by lower token id first. Unlike the values, no two keys
    are equal, so `topk` of the keys and a full sort agree on which tokens come first. A key's low 32
    bits are minus its token id (`top_keys.largest` reads the ids back from them).

    values: [B, V] float32 -> [B, V] int64
    """
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 folds -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # ordered as the floats are, in 32 bits
    ids = torch.arange(values.shape[-1], device=values.device)
    return ordered * (1 << 32) - ids


def _kept(ranked: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which of each row's ranked tokens survive top-k then top-p.

    ranked: [B, N] scaled logits in descending order -> [B, N] bool
    """
    rank = torch.arange(ranked.shape[-1], device=ranked.device)[None, :]
    in_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = ranked.masked_fill(~in_k, float("-inf")).softmax(dim=-1)
    # Keep a token while the mass before it is under top_p: the most likely token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    return in_k & ((top_p[:, None] >= 1.0) | (mass_before < top_p[:, None]))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    mode: str = FULL,
    token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row: temperature, top-k, then top-p; rows with temperature 0 take the argmax.

    A row draws the kept token with the largest `logit / temperature - log(E)`, E ~ Exp(1) hashed per
    token: that picks each token with its softmax probability (the exponential race), and needs no
    normalised probabilities, so the draw is the same whether the vocabulary was ranked or not.

    logits: [B, V]; temperature, top_p: [B] float; top_k: [B] int (0 = off); token_ids: [V], 0..V-1
    (a tensor the caller keeps, or made here) -> [B] int64
    """
    scaled = logits.float() / temperature.clamp_min(1e-5)[:, None]
    if mode == PLAIN:
        # Compiled, token ids read from a tensor: inductor turns an arange's ids, hashed in `argmax`'s
        # chunks, into index arithmetic whose constants overflow 32 bits, and fails (torch 2.11).
        ids = token_ids if token_ids is not None else torch.arange(logits.shape[-1], device=logits.device)
        sampled = argmax(_race(scaled, seeds, steps, ids))
    else:
        ranked, order = _ranked(scaled, mode)
        race = _race(ranked, seeds, steps, order).masked_fill(~_kept(ranked, top_k, top_p), float("-inf"))
        sampled = order.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1)
    return torch.where(temperature == 0, argmax(logits), sampled)


def _ranked(scaled: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The values a ranked mode looks at, in descending order, and their token ids: the top
    TOP_K_CANDIDATES (`TOP_K`) or the whole vocabulary (`FULL`). [B, V] -> ([B, N], [B, N])"""
    if mode == TOP_K:
        order = largest(ranking_keys(scaled), min(TOP_K_CANDIDATES, scaled.shape[-1]))
        return scaled.gather(1, order), order
    ranked, order = scaled.sort(dim=-1, descending=True, stable=True)
    return ranked, order


def _race(
    values: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    # Each token's entry in the race: logit / temperature - log(E), E = -log(U) hashed per token.
    return values - (-uniform_noise(seeds, steps, tokens).log()).log()


@dataclass(frozen=True)
class SamplingTensors:
    """One step's per-row parameters, in the order of the step's logits."""

    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    penalty: torch.Tensor  # [B] float32: the repetition penalty
    frequency: torch.Tensor  # [B] float32: the frequency penalty
    presence: torch.Tensor  # [B] float32: the presence penalty
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64
    ban_eos: torch.Tensor  # [B] bool: min_new_tokens not reached yet


def apply_penalties(
    logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, params: SamplingTensors
) -> torch.Tensor:
    """The repetition penalty (over `seen`: the prompt and the output), then OpenAI's frequency and
    presence penalties (over `counts`: the output only): a token's logit loses frequency x its count,
    and presence if it occurred at all.

    logits: [B, V] float; seen: [B, V] bool; counts: [B, V] int32
    """
    logits = apply_repetition_penalty(logits, seen, params.penalty)
    return logits - params.frequency[:, None] * counts - params.presence[:, None] * (counts > 0)


def sample_rows(
    logits: torch.Tensor,
    params: SamplingTensors,
    seen: torch.Tensor,
    counts: torch.Tensor,
    eos_mask: torch.Tensor,
    mode: str = FULL,
    allowed: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Penalties, then end-of-sequence suppression, then what each row's grammar allows (`allowed`,
    where rows follow grammars), then sampling (`mode` from `sampling_mode`).

    logits: [B, V]; seen: [B, V] bool; counts: [B, V] int32; eos_mask: [V] bool; allowed: [B, V] bool;
    token_ids: [V] (see `sample`) -> [B] int64
    """
    # Applied to every row (penalties of 1 and 0 change nothing), so the step has one shape to capture.
    logits = apply_penalties(logits.float(), seen, counts, params)
    banned = params.ban_eos[:, None] & eos_mask[None, :]
    if allowed is not None:  # a grammar that allows only the end wins over min_new_tokens
        banned = (banned & (allowed & ~eos_mask[None, :]).any(dim=-1, keepdim=True)) | ~allowed
    logits = logits.masked_fill(banned, float("-inf"))
    return sample(
        logits, params.temperature, params.top_k, params.top_p, params.seeds, params.steps, mode, token_ids
    )
