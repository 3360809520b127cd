"""The runner's prefill, padded the way a captured graph pads it: the padding changes nothing.

CUDA graphs are captured for a few [rows, width] shapes, so on a GPU the newcomers' prompts are padded
up to the next width and the newcomers up to the next row count. This runs the same padded step
eagerly on the CPU and checks it against the unpadded one."""

from __future__ import annotations

import torch

from generation import LoadedModel, SamplingParams
from generation.detokenizer import IncrementalDetokenizer
from generation.runner import ModelRunner
from generation.sequence import Sequence, Status
from tests.conftest import make_engine


def newcomers(loaded: LoadedModel, prompts: list[str]) -> list[Sequence]:
    rows = []
    for slot, prompt in enumerate(prompts):
        ids = loaded.tokenizer.encode(prompt)
        params = SamplingParams(temperature=0.0, repetition_penalty=1.3)
        seq = Sequence(f"r{slot}", ids, params, slot, IncrementalDetokenizer(loaded.tokenizer, ids, []))
        seq.slot, seq.status = slot, Status.RUNNING
        rows.append(seq)
    return rows


def prefill(runner: ModelRunner, rows: list[Sequence], n: int, width: int) -> torch.Tensor:
    runner._static.load(rows)
    runner._prefill_in.load(rows, n, width)
    return runner._prefill_static(n, width)[: len(rows)]


@torch.inference_mode()
def test_padded_prefill_matches_and_leaves_other_slots_alone(tiny: LoadedModel) -> None:
    runner = make_engine(tiny, max_batch_size=4).engine.runner
    rows = newcomers(tiny, ["The baker", "Every morning the little bakery"])
    lengths = [seq.num_prompt_tokens for seq in rows]

    plain = prefill(runner, rows, len(rows), max(lengths))
    keys = [layer[:2].clone() for layer in runner.cache._keys]
    seen = runner.seen[:2].clone()

    # A bystander in slot 2 holds keys and a seen-set the padded step must not touch.
    for layer in (*runner.cache._keys, *runner.cache._values):
        layer[2] = 7.0
    runner.seen[2] = True
    bystander_keys = [layer[2].clone() for layer in runner.cache._keys]
    padded = prefill(runner, rows, len(rows) + 2, max(lengths) + 9)

    assert torch.equal(padded, plain)
    assert torch.equal(runner.seen[:2], seen)
    assert bool(runner.seen[2].all())
    for layer, before, untouched in zip(runner.cache._keys, keys, bystander_keys, strict=True):
        for slot, length in enumerate(lengths):
            assert torch.allclose(layer[slot, :, :length], before[slot, :, :length], atol=1e-5)
        assert torch.equal(layer[2], untouched)
