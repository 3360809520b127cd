"""The batched sampler: per-row parameters, hashed randomness, filters and penalties."""

from __future__ import annotations

import torch

from generation.sampler import apply_repetition_penalty, filtered_probs, sample, uniform_noise


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
    noise = uniform_noise(seeds, steps, 100)
    assert torch.equal(noise[0], noise[2])
    assert not torch.equal(noise[0], noise[1])
    assert not torch.equal(noise[0], noise[3]), "the high bits of the seed count"
    assert not torch.equal(noise[0], uniform_noise(seeds, steps + 1, 100)[0])
    assert float(noise.min()) > 0.0 and float(noise.max()) < 1.0


def test_noise_is_uniform() -> None:
    noise = uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096).flatten()
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
        alone = sample(
            logits[i : i + 1], **rows(1, top_k=10, top_p=0.9), seeds=seeds[i : i + 1], steps=steps[i : i + 1]
        )
        assert alone.item() == together[i].item()


def test_zero_temperature_rows_are_greedy_beside_sampled_rows() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    params = rows(4)
    params["temperature"] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    tokens = sample(logits, **params, seeds=torch.arange(4), steps=torch.zeros(4, dtype=torch.int64))
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(3, 4)
    probs, order = filtered_probs(
        logits, torch.ones(3), torch.tensor([2, 0, 1]), torch.tensor([1.0, 0.65, 0.5])
    )
    kept = [(probs[i] > 0).sum().item() for i in range(3)]
    assert kept == [2, 2, 1]
    assert order[0, 0] == 0
    assert torch.allclose(probs[0, :2], torch.tensor([0.4 / 0.7, 0.3 / 0.7]))


def test_repetition_penalty_acts_only_on_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]
