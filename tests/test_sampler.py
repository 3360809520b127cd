"""The batched sampler: per-row parameters, hashed randomness, filters and penalties."""

from __future__ import annotations

import pytest
import torch

from trickle.generation.sampler import (
    ARGMAX_CHUNK,
    FULL,
    PLAIN,
    TOP_K,
    TOP_K_CANDIDATES,
    SamplingTensors,
    apply_penalties,
    apply_repetition_penalty,
    argmax,
    ranking_keys,
    sample,
    sampling_mode,
    uniform_noise,
    unit_interval,
)
from trickle.generation.top_keys import largest


def rows(n: int, **values: float) -> dict[str, torch.Tensor]:
    params = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **values}
    return {
        "temperature": torch.full((n,), float(params["temperature"])),
        "top_k": torch.full((n,), int(params["top_k"]), dtype=torch.int64),
        "top_p": torch.full((n,), float(params["top_p"])),
    }


def test_noise_depends_only_on_seed_and_step() -> None:
    seeds = torch.tensor([5, 6, 5, 2**62 + 5])
    steps = torch.tensor([0, 0, 0, 0])
    vocab = torch.arange(100)
    noise = uniform_noise(seeds, steps, vocab)
    assert torch.equal(noise[0], noise[2])
    assert not torch.equal(noise[0], noise[1])
    assert not torch.equal(noise[0], noise[3]), "the high bits of the seed count"
    assert not torch.equal(noise[0], uniform_noise(seeds, steps + 1, vocab)[0])
    assert float(noise.min()) > 0.0 and float(noise.max()) < 1.0
    # A token's value is its own, in whatever order the tokens are asked for.
    shuffled = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform_noise(seeds, steps, shuffled[None].expand(4, -1)), noise[:, shuffled])


def test_noise_stays_strictly_inside_the_unit_interval_at_its_extremes() -> None:
    # At 1.0 a token's exponential would be 0 and it would win every race it is in.
    extremes = unit_interval(torch.tensor([0, (1 << 23) - 1]))
    assert float(extremes[0]) > 0.0 and float(extremes[1]) < 1.0
    assert float((-extremes.log()).min()) > 0.0


def test_noise_is_uniform() -> None:
    noise = uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), torch.arange(4096)).flatten()
    counts = torch.histc(noise, bins=10, min=0.0, max=1.0)
    assert float((counts / noise.numel() - 0.1).abs().max()) < 0.005


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4)
    tokens = sample(logits, **rows(n), seeds=torch.arange(n), steps=torch.zeros(n, dtype=torch.int64))
    freq = torch.bincount(tokens, minlength=4) / n
    assert torch.allclose(freq, probs, atol=0.015)


def test_a_row_samples_the_same_token_whatever_its_neighbours() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    seeds, steps = torch.arange(6) * 17, torch.arange(6)
    together = sample(logits, **rows(6, top_k=10, top_p=0.9), seeds=seeds, steps=steps)
    for i in range(6):
        for mode in (TOP_K, FULL):
            alone = sample(
                logits[i : i + 1],
                **rows(1, top_k=10, top_p=0.9),
                seeds=seeds[i : i + 1],
                steps=steps[i : i + 1],
                mode=mode,
            )
            assert alone.item() == together[i].item()


def test_zero_temperature_rows_are_greedy_beside_sampled_rows() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    params = rows(4)
    params["temperature"] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    tokens = sample(logits, **params, seeds=torch.arange(4), steps=torch.zeros(4, dtype=torch.int64))
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_the_chunked_argmax_picks_the_index_torch_does() -> None:
    # Widths under, at, just past and far from a multiple of the chunk; ties everywhere (few distinct
    # values), rows all -inf, NaNs, and bfloat16.
    torch.manual_seed(2)
    for width in (7, ARGMAX_CHUNK, ARGMAX_CHUNK + 1, 3 * ARGMAX_CHUNK - 5, 32000):
        values = torch.randint(0, 3, (4, width)).float()
        values[1] = float("-inf")
        values[2, [width // 2, width - 1]] = float("nan")
        values[3, -1] = 5.0  # the last token, in the padded chunk, alone at the top
        assert torch.equal(argmax(values), values.argmax(dim=-1))
        noisy = torch.randn(4, width).to(torch.bfloat16)
        assert torch.equal(argmax(noisy), noisy.argmax(dim=-1))


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    # probabilities 0.4, 0.3, 0.2, 0.1: which tokens can each row draw, over many draws?
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    n = 4000
    for mode in (TOP_K, FULL):
        for top_k, top_p, allowed in (
            (2, 1.0, {0, 1}),
            (0, 0.65, {0, 1}),
            (1, 0.5, {0}),
            (3, 0.8, {0, 1, 2}),
        ):
            params = rows(n, top_k=top_k, top_p=top_p)
            tokens = sample(
                logits.expand(n, 4),
                **params,
                seeds=torch.arange(n),
                steps=torch.zeros(n, dtype=torch.int64),
                mode=mode,
            )
            assert set(tokens.tolist()) == allowed, (mode, top_k, top_p)
    # Within the kept set, tokens keep their relative odds: 0.4 / 0.7 and 0.3 / 0.7.
    tokens = sample(
        logits.expand(n, 4),
        **rows(n, top_k=2),
        seeds=torch.arange(n),
        steps=torch.zeros(n, dtype=torch.int64),
    )
    assert abs(float((tokens == 0).float().mean()) - 4 / 7) < 0.03


def tied_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    # bf16-like coarse logits: many equal values, so ties sit on every top-k and top-p boundary
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=generator) * 8).round() / 4


@pytest.mark.parametrize("vocab", [500, 5000, 20000])
def test_every_mode_draws_the_same_token_for_a_row_it_serves(vocab: int) -> None:
    """A step picks its mode from all its rows, so a row's token must not depend on the mode."""
    n = 256
    logits = tied_logits(n, vocab, 0)
    seeds, steps = torch.arange(n) * 7919, torch.arange(n) % 5
    cases = {
        (PLAIN, FULL): [rows(n), rows(n, top_k=vocab + 3), rows(n, temperature=0.7, top_k=0, top_p=1.0)],
        (TOP_K, FULL): [
            rows(n, top_k=40),
            rows(n, top_k=TOP_K_CANDIDATES, top_p=0.9),
            rows(n, temperature=0.3, top_k=7, top_p=0.5),
            rows(n, top_k=1),
        ],
    }
    for modes, params_list in cases.items():
        for params in params_list:
            drawn = [sample(logits, **params, seeds=seeds, steps=steps, mode=mode) for mode in modes]
            assert torch.equal(drawn[0], drawn[1]), (modes, {k: v[0].item() for k, v in params.items()})
            assert len(set(drawn[0].tolist())) > 10  # real draws, not one token everywhere
    # Ties are broken by the lower token id, as a stable sort does: with top_k=1 the draw is the first
    # of the tied maxima, which is also what argmax picks.
    top1 = sample(logits, **rows(n, top_k=1), seeds=seeds, steps=steps, mode=TOP_K)
    assert torch.equal(top1, logits.argmax(dim=-1))


@pytest.mark.parametrize("vocab", [70, 65024])
def test_a_ranking_key_holds_its_token_id_for_the_candidates_kernel_to_read_back(vocab: int) -> None:
    """`top_keys.largest` sorts keys alone and reads each winner's token id from its low 32 bits (minus
    the id): for every value, -0.0, infinities and ties included."""
    logits = tied_logits(3, vocab, 3)
    logits[0, :5] = torch.tensor([float("-inf"), float("inf"), -0.0, 0.0, float("nan")])
    keys = ranking_keys(logits)
    ids = -keys.to(torch.int32).to(torch.int64)  # the kernel's reading: the low half, negated
    assert torch.equal(ids, torch.arange(vocab).expand(3, vocab))
    assert torch.equal(largest(keys, TOP_K_CANDIDATES), keys.topk(TOP_K_CANDIDATES, dim=-1).indices)


def test_the_cheapest_mode_that_serves_every_row_is_chosen() -> None:
    vocab = 1000
    assert sampling_mode([], vocab) == PLAIN
    assert sampling_mode([(0.0, 5, 0.5), (0.8, 0, 1.0), (1.0, vocab, 1.0)], vocab) == PLAIN
    assert sampling_mode([(0.8, 40, 0.95), (0.0, 0, 0.3), (1.0, TOP_K_CANDIDATES, 1.0)], vocab) == TOP_K
    assert sampling_mode([(0.8, 40, 0.95), (0.8, 0, 1.0)], vocab) == FULL, "a plain row needs every token"
    assert sampling_mode([(0.8, 0, 0.9)], vocab) == FULL, "top-p alone ranks the whole vocabulary"
    assert sampling_mode([(0.8, TOP_K_CANDIDATES + 1, 1.0)], vocab) == FULL


def test_repetition_penalty_acts_only_on_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_frequency_and_presence_penalties_follow_openais_formula_after_the_repetition_penalty() -> None:
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence, per row, with c the output's counts; the
    repetition penalty (over prompt and output) comes first."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=generator)
    seen = torch.rand(3, 50, generator=generator) < 0.3
    counts = torch.randint(0, 4, (3, 50), generator=generator, dtype=torch.int32) * seen
    params = SamplingTensors(
        temperature=torch.ones(3),
        top_p=torch.ones(3),
        top_k=torch.zeros(3, dtype=torch.int64),
        penalty=torch.tensor([1.0, 1.3, 1.0]),
        frequency=torch.tensor([0.5, 0.0, -1.25]),
        presence=torch.tensor([0.0, 1.5, 2.0]),
        seeds=torch.zeros(3, dtype=torch.int64),
        steps=torch.zeros(3, dtype=torch.int64),
        ban_eos=torch.zeros(3, dtype=torch.bool),
    )
    out = apply_penalties(logits, seen, counts, params)
    for b in range(3):
        for j in range(50):
            mu = logits[b, j].item()
            if seen[b, j]:
                r = params.penalty[b].item()
                mu = mu / r if mu > 0 else mu * r
            c = counts[b, j].item()
            mu -= c * params.frequency[b].item() + (c > 0) * params.presence[b].item()
            assert abs(out[b, j].item() - mu) < 1e-5, (b, j)
