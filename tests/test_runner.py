"""The runner's GPU-shaped paths, run on the CPU.

Padded prefill: CUDA graphs are captured for a few [rows, width] shapes, so on a GPU the newcomers'
prompts are padded up to the next width and the newcomers up to the next row count (padding writes the
null block). This runs the same padded step eagerly on the CPU and checks it against the unpadded one.

Compiling the step: each compiled part falls back on its own (torch.compile faked)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import structlog
import torch

from tests.conftest import make_engine
from trickle.generation import LoadedModel, SamplingParams
from trickle.generation.kv import attention as paged_attention
from trickle.generation.models import decoder_layers
from trickle.generation.runner import ModelRunner
from trickle.generation.runner import compiled as compiled_module
from trickle.generation.sampler import FULL, PLAIN, TOP_K, sample_rows
from trickle.generation.scheduler import ScheduledBatch
from trickle.generation.sequence import Sequence, Status


def newcomers(runner: ModelRunner, loaded: LoadedModel, prompts: list[str]) -> list[Sequence]:
    """Sequences admitted to rows 0, 1, ... with their blocks taken from the runner's pool by hand."""
    rows, next_block = [], 1
    for slot, prompt in enumerate(prompts):
        ids = loaded.tokenizer.encode(prompt)
        params = SamplingParams(temperature=0.0, repetition_penalty=1.3)
        seq = Sequence(f"r{slot}", ids, params, slot)
        seq.slot, seq.status = slot, Status.RUNNING
        count = -(-len(ids) // runner.block_size)
        seq.blocks = list(range(next_block, next_block + count))
        next_block += count
        rows.append(seq)
    return rows


def prefill(runner: ModelRunner, rows: list[Sequence], n: int, width: int) -> torch.Tensor:
    runner._tables.update(ScheduledBatch(prefill=rows))
    runner._static.load(rows)
    runner._history.mark(rows)
    runner._prefill_in.load(rows, n, width)
    return runner._prefill_static(n, width)[: len(rows)]


def written(runner: ModelRunner, seq: Sequence, layer: int) -> torch.Tensor:
    """The keys of `seq`'s prompt positions, read from its blocks in order."""
    keys = runner.cache.pools(layer)[0].unflatten(0, (runner.num_blocks, runner.block_size))
    return keys[seq.blocks].flatten(0, 1)[: seq.num_prompt_tokens]


@torch.inference_mode()
def test_padded_prefill_matches_and_leaves_other_blocks_alone(tiny: LoadedModel) -> None:
    runner = make_engine(tiny, max_batch_size=4).engine.runner
    rows = newcomers(runner, tiny, ["The baker", "Every morning the little bakery"])
    layers = range(tiny.model.config.num_hidden_layers)

    plain = prefill(runner, rows, len(rows), max(seq.num_prompt_tokens for seq in rows))
    keys = [[written(runner, seq, layer).clone() for seq in rows] for layer in layers]
    seen = runner.seen[:2].clone()

    # A bystander's blocks and seen-set, which the padded step must not touch.
    bystander = list(range(runner.num_blocks - 2, runner.num_blocks))
    block_rows = torch.tensor(bystander)[:, None] * runner.block_size + torch.arange(runner.block_size)
    for layer in layers:
        for pool in runner.cache.pools(layer):
            pool[block_rows.flatten()] = 7.0
    runner.seen[2] = True
    padded = prefill(runner, rows, len(rows) + 2, max(seq.num_prompt_tokens for seq in rows) + 9)

    assert torch.equal(padded, plain)
    assert torch.equal(runner.seen[:2], seen)
    assert bool(runner.seen[2].all())
    for layer in layers:
        for seq, before in zip(rows, keys[layer], strict=True):
            assert torch.allclose(written(runner, seq, layer), before, atol=1e-5)
        for pool in runner.cache.pools(layer):
            assert bool((pool[block_rows.flatten()] == 7.0).all())


def test_with_compile_a_part_that_fails_to_compile_runs_uncompiled(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder layers and the sampler compile apart: one failing leaves the other compiled, and the
    failure is logged. (The step compiles on GPUs only; here the paged operator runs its reference and
    torch.compile is faked.)"""
    monkeypatch.setattr(paged_attention, "available", lambda device: True)
    runner = make_engine(tiny, max_batch_size=4).engine.runner
    runner.check_forward()
    assert runner.kernel_reads
    compiled: list[str] = []

    def fake_compile(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        compiled.append(fn.__name__)
        if fn.__name__ == "sample_rows":
            return lambda *args, **kwargs: fn(*args, **kwargs)

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("inductor could not generate a kernel")

        return broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    # A fresh logger: the module's may be bound already, to whatever an earlier test configured.
    monkeypatch.setattr(compiled_module, "log", structlog.get_logger("generation.runner"))
    with structlog.testing.capture_logs() as logs, torch.inference_mode():
        runner._compile()
    layers = decoder_layers(tiny.model)
    assert compiled == [type(layers[0]).forward.__name__, "sample_rows"], "one layer compiles for all"
    assert runner.compiled.layers == [], "the layers run uncompiled"
    assert not any("forward" in vars(layer) for layer in layers), "their own forward again"
    samplers = runner.compiled.samplers
    assert samplers[PLAIN] is samplers[TOP_K] is not sample_rows, "the samplers stay compiled"
    assert samplers[FULL] is sample_rows
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
        "torch.compile failed on the model's layers; they run uncompiled"
    ]
    assert "inductor could not generate a kernel" in next(e["error"] for e in logs if "error" in e)
