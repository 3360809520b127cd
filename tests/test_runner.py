"""The runner's GPU-shaped paths, run on the CPU.

Padded prefill: CUDA graphs are captured for a few [rows, width] shapes, so on a GPU the newcomers'
prompts are padded up to the next width and the newcomers up to the next row count (padding writes the
null block). This runs the same padded step eagerly on the CPU and checks it against the unpadded one.

--compile: each compiled part falls back on its own (torch.compile faked, as it runs on GPUs only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import structlog
import torch

from tests.conftest import make_engine
from trickle.generation import LoadedModel, SamplingParams
from trickle.generation.detokenizer import IncrementalDetokenizer
from trickle.generation.models import compile_regions, regional_layers, restore_layers
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
        seq = Sequence(f"r{slot}", ids, params, slot, IncrementalDetokenizer(loaded.tokenizer, ids, []))
        seq.slot, seq.status = slot, Status.RUNNING
        count = -(-len(ids) // runner.block_size)
        seq.blocks = list(range(next_block, next_block + count))
        next_block += count
        rows.append(seq)
    return rows


def prefill(runner: ModelRunner, rows: list[Sequence], n: int, width: int) -> torch.Tensor:
    runner._tables.update(ScheduledBatch(prefill=rows))
    runner._static.load(rows)
    runner._mark_seen(rows)
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


@torch.inference_mode()
def test_falcon_layers_as_compiled_regions_compute_what_transformers_computes(tiny: LoadedModel) -> None:
    """--compile on a multi-query Falcon runs each layer as two tensor-only functions around the
    attention (compiled once for all layers); here they run uncompiled against the stock layer."""
    model = tiny.model
    ids = torch.tensor([tiny.tokenizer.encode("Every morning the little bakery at the corner")])
    layers = regional_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    # Each layer norm its own weights (a fresh model's are all ones and zeros), so a layer normed with
    # another layer's norm shows.
    norms = [layer.input_layernorm for layer in layers]
    saved = [(norm.weight.clone(), norm.bias.clone()) for norm in norms]
    for i, norm in enumerate(norms):
        norm.weight.fill_(1.0 + 0.25 * i)
        norm.bias.fill_(0.1 * i)
    try:
        compare_regions_with_stock(model, ids, layers)
    finally:
        for norm, (weight, bias) in zip(norms, saved, strict=True):
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)


def compare_regions_with_stock(model: Any, ids: torch.Tensor, layers: list[Any]) -> None:
    stock = model.base_model(input_ids=ids).last_hidden_state
    calls: list[tuple[str, bool]] = []

    def counting(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        # records each call and whether it was given a layer norm (inputs: its own; output: the next's)
        norm_arg = 1 if fn.__name__ == "_layer_inputs" else -1
        return lambda *args: calls.append((fn.__name__, args[norm_arg] is not None)) or fn(*args)

    compile_regions(layers, counting)
    try:
        regional = model.base_model(input_ids=ids).last_hidden_state
    finally:
        restore_layers(layers)
    # Only the first layer norms its own input; each layer norms the next one's with its residual add.
    n = len(layers)
    assert [name for name, _ in calls] == ["_layer_inputs", "_layer_output"] * n
    assert [given for name, given in calls if name == "_layer_inputs"] == [True] + [False] * (n - 1)
    assert [given for name, given in calls if name == "_layer_output"] == [True] * (n - 1) + [False]
    assert torch.allclose(regional, stock, atol=1e-5)
    assert torch.equal(model.base_model(input_ids=ids).last_hidden_state, stock), "restored"


def test_with_compile_a_part_that_fails_to_compile_runs_uncompiled(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--compile compiles the model's layers and the sampler apart: one failing leaves the other
    compiled, and the failure is logged. (torch.compile itself runs on GPUs only; here it is faked.)"""
    runner = make_engine(tiny, max_batch_size=4).engine.runner
    compiled: list[str] = []

    def fake_compile(fn: Callable[..., torch.Tensor], **options: Any) -> Callable[..., torch.Tensor]:
        compiled.append(fn.__name__)
        if fn.__name__ == "_layer_output":

            def broken(*args: Any) -> torch.Tensor:
                raise RuntimeError("inductor could not generate a kernel")

            return broken
        return lambda *args: fn(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    # A fresh logger: the module's may be bound already, to whatever an earlier test configured.
    monkeypatch.setattr(compiled_module, "log", structlog.get_logger("generation.runner"))
    with structlog.testing.capture_logs() as logs, torch.inference_mode():
        runner._compile()
    assert compiled == ["_layer_inputs", "_layer_output", "sample_rows"]
    assert runner.compiled.regional == [], "the layers run uncompiled"
    assert not any("forward" in vars(layer) for layer in regional_layers(tiny.model)), "transformers' forward"
    samplers = runner.compiled.samplers
    assert samplers[PLAIN] is samplers[TOP_K] is not sample_rows, "the samplers stay compiled"
    assert samplers[FULL] is sample_rows
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
        "torch.compile failed on the model's layers; they run uncompiled"
    ]
    assert "inductor could not generate a kernel" in next(e["error"] for e in logs if "error" in e)
