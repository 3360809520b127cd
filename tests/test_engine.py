"""The engine through its asyncio bridge: continuous batching is exact, seeds are batch-independent,
cancellation frees rows, and a failing step fails only its own requests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import FalconForCausalLM, PreTrainedModel

from tests.conftest import bias_head, fail_step, make_engine
from tests.families import build, penalised_greedy, reference
from trickle.generation import AsyncEngine, LoadedModel, RequestOutput, SamplingParams
from trickle.generation.messages import AbortRequest, AddRequest, StepReport
from trickle.generation.runner import Launched

PROMPTS = [
    "The baker",
    "Every morning the little bakery at the corner",
    "café",
    "On the square, the old men sit and talk about the weather and",
    "a",
    "Bread and water",
    "The radio plays while the dough rests and the oven warms up slowly",
    "日本語",
]


async def collect(
    engine: AsyncEngine, request_id: str, prompt: str, params: SamplingParams
) -> list[RequestOutput]:
    ids = engine.prompts.truncated(prompt, 256, params.max_new_tokens)
    return [out async for out in engine.generate(ids, params, label=request_id)]


def reference_tokens(
    loaded: LoadedModel, model: PreTrainedModel, prompt: str, max_new_tokens: int
) -> list[int]:
    return reference(model, loaded.tokenizer.encode(prompt), max_new_tokens, loaded.tokenizer.pad_token_id)


async def test_continuous_batching_matches_generate_token_for_token(
    tiny: LoadedModel, model_dir: Path
) -> None:
    """Rows join running ones, and each gets what stock transformers generates alone."""
    # The reference is a fresh, unadapted copy: stock transformers code end to end.
    stock = FalconForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    await generate_all(make_engine(tiny, max_batch_size=4), stock, tiny)


async def generate_all(engine: AsyncEngine, stock: PreTrainedModel, tiny: LoadedModel) -> None:
    await engine.start()
    lengths = [5 + 7 * i for i in range(len(PROMPTS))]
    outputs: dict[int, list[RequestOutput]] = {}
    tasks = []
    for i, (prompt, length) in enumerate(zip(PROMPTS, lengths, strict=True)):
        params = SamplingParams(temperature=0.0, max_new_tokens=length)

        async def run(i: int = i, prompt: str = prompt, params: SamplingParams = params) -> None:
            outputs[i] = await collect(engine, f"r{i}", prompt, params)

        tasks.append(asyncio.create_task(run()))
        # Submit the next request only once this one is generating, so rows join a running batch.
        await engine.wait_until(lambda e, i=i: e.steps > i)
    await asyncio.gather(*tasks)
    await engine.stop()
    for i, (prompt, length) in enumerate(zip(PROMPTS, lengths, strict=True)):
        expected = reference_tokens(tiny, stock, prompt, length)
        text = "".join(out.text for out in outputs[i])
        assert text == tiny.tokenizer.decode(expected, skip_special_tokens=True), f"request {i}"
        assert outputs[i][-1].usage["completion_tokens"] == len(expected)


async def test_a_long_prompt_prefilled_in_chunks_beside_a_decoding_row_is_exact(
    tiny: LoadedModel, model_dir: Path
) -> None:
    """A prompt over the prefill budget that comes while a row decodes goes in a chunk a step; both
    requests still get what stock transformers generates alone."""
    stock = FalconForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = make_engine(tiny, max_batch_size=4, prefill_token_budget=16, kv_block_size=4)
    chunks: list[int] = []
    launch = engine.engine.runner.launch

    def recording(batch: Any, meanwhile: Any = None) -> Any:
        chunks.extend(seq.prefill_to - seq.num_cached for seq in batch.prefill if seq.is_partial)
        return launch(batch, meanwhile)

    engine.engine.runner.launch = recording  # type: ignore[method-assign]
    await engine.start()
    short = SamplingParams(temperature=0.0, max_new_tokens=40, min_new_tokens=40)
    running = asyncio.create_task(collect(engine, "short", PROMPTS[0], short))
    await engine.wait_until(lambda e: e.steps > 1)
    long_prompt = " ".join(PROMPTS) * 2  # 194 tokens (collect keeps at most 256)
    long = await collect(engine, "long", long_prompt, SamplingParams(temperature=0.0, max_new_tokens=12))
    first = await running
    await engine.stop()
    for outputs, prompt, count in ((first, PROMPTS[0], 40), (long, long_prompt, 12)):
        expected = reference_tokens(tiny, stock, prompt, count)
        text = "".join(out.text for out in outputs)
        assert text == tiny.tokenizer.decode(expected, skip_special_tokens=True), prompt[:20]
    assert len(tiny.tokenizer.encode(long_prompt)) > 3 * 16 and len(chunks) >= 3
    assert all(width == 16 for width in chunks)


async def test_rows_join_while_others_run(tiny: LoadedModel) -> None:
    engine = make_engine(tiny, max_batch_size=8)
    await engine.start()
    long = asyncio.create_task(
        collect(engine, "long", "The baker", SamplingParams(max_new_tokens=60, min_new_tokens=60))
    )
    await engine.wait_until(lambda e: e.num_running == 1 and e.steps >= 3)
    short = await collect(engine, "short", "café", SamplingParams(max_new_tokens=5, min_new_tokens=5))
    assert not long.done(), "the short request waited for the long one to finish"
    assert short[-1].finish_reason == "length"
    assert (await long)[-1].usage["completion_tokens"] == 60
    await engine.stop()


@pytest.mark.parametrize(
    ("filters", "neighbours"),
    [
        # alone: the whole vocabulary sorted; beside rows that also need it
        ({"top_p": 0.95, "top_k": 0}, {}),
        # alone: only the top 20 ranked; beside unfiltered rows the step sorts the whole vocabulary
        ({"top_p": 0.9, "top_k": 20}, {"top_p": 1.0, "top_k": 0}),
        # alone: nothing ranked; beside filtered rows the step sorts
        ({"top_p": 1.0, "top_k": 0}, {"top_p": 0.5, "top_k": 0}),
    ],
)
async def test_seeded_request_gives_the_same_text_alone_and_in_a_batch(
    engine: AsyncEngine, filters: dict[str, float], neighbours: dict[str, float]
) -> None:
    # Hot: the demo model knows its text by heart, and at temperature 1 nearly every seed writes it.
    params = SamplingParams(temperature=4.0, seed=1234, max_new_tokens=40, min_new_tokens=40, **filters)
    alone = "".join(out.text for out in await collect(engine, "alone", "The baker", params))
    others = [
        collect(
            engine,
            f"o{i}",
            PROMPTS[i],
            SamplingParams(temperature=4.0, seed=i, max_new_tokens=30 + i, **neighbours),
        )
        for i in range(7)
    ]
    results = await asyncio.gather(collect(engine, "together", "The baker", params), *others)
    together = "".join(out.text for out in results[0])
    assert together == alone
    different = "".join(
        out.text
        for out in await collect(engine, "other-seed", "The baker", params.model_copy(update={"seed": 99}))
    )
    assert different != alone


def test_an_abort_frees_the_row_at_the_next_step(tiny: LoadedModel) -> None:
    engine = make_engine(tiny).engine  # driven by hand, without its thread
    reports: list[StepReport] = []
    engine.report = reports.append
    params = SamplingParams(max_new_tokens=100, min_new_tokens=100)
    for name in ("doomed", "survivor"):
        engine.submit(AddRequest(name, tiny.tokenizer.encode("The baker"), params, 1, 0.0))
    engine.run_once()
    engine.run_once()
    assert [seq.slot for seq in engine.scheduler.running] == [0, 1]
    engine.submit(AbortRequest("doomed"))
    engine.run_once()
    assert [seq.request_id for seq in engine.scheduler.running] == ["survivor"]
    assert engine.scheduler.running[0].slot == 0
    last = reports[-1]
    assert last.num_running == 1
    assert [(out.request_id, out.finish_reason) for out in last.outputs if out.finished] == [
        ("doomed", "cancelled")
    ]
    # Each turn launches a step and collects the one before: three launched, two collected.
    survivor = engine.scheduler.running[0]
    assert (survivor.launched, survivor.num_completion_tokens) == (3, 2)
    engine.flush()
    assert survivor.num_completion_tokens == 3


def test_each_step_times_its_decode_and_prefill_parts_for_the_pacing(tiny: LoadedModel) -> None:
    """The scheduler's prefill pacing learns from the steps: the decode part's time, and the prefill
    part's time over the tokens it ran as (the runner's padded size of the newcomers), for newcomers
    prefilled apart from the decoding rows."""
    engine = make_engine(tiny, prefill_pacing=2.5, mixed_prefill_tokens=0).engine  # driven by hand
    engine.report = lambda report: None
    collected: list[Launched] = []
    collect = engine.runner.collect

    def recording(launched: Launched) -> list[int]:
        collected.append(launched)
        return collect(launched)

    engine.runner.collect = recording  # type: ignore[method-assign]
    params = SamplingParams(max_new_tokens=8, min_new_tokens=8)
    prompts = ["Every morning the little bakery", "The baker"]
    engine.submit(AddRequest("first", tiny.tokenizer.encode(prompts[0]), params, 1, 0.0))
    engine.run_once()
    engine.run_once()
    engine.submit(AddRequest("second", tiny.tokenizer.encode(prompts[1]), params, 1, 0.0))
    engine.run_once()
    engine.flush()
    prefill_only, decode_only, both = collected
    width = len(tiny.tokenizer.encode(prompts[1]))
    assert (both.num_decode, both.prefill_tokens) == (1, engine.runner.prefill_size(1, width))
    assert decode_only.prefill_tokens == 0 and prefill_only.num_decode == 0
    assert both.decode_seconds > 0 and both.prefill_seconds > 0 and decode_only.decode_seconds > 0
    assert prefill_only.decode_device_seconds == 0  # on the CPU the step ran inline: no device time
    pacing = engine.scheduler.pacing
    assert pacing.decode_seconds > 0 and pacing.token_seconds > 0
    assert pacing.budget() is not None


async def test_closing_the_stream_cancels_the_request(engine: AsyncEngine) -> None:
    params = SamplingParams(max_new_tokens=400, min_new_tokens=400)
    survivor = asyncio.create_task(
        collect(engine, "survivor", "The baker", SamplingParams(max_new_tokens=50, min_new_tokens=50))
    )
    stream = engine.generate(engine.prompts.truncated("café", 256, params.max_new_tokens), params)
    await anext(stream)
    await engine.wait_until(lambda e: e.num_running == 2)
    await stream.aclose()
    await engine.wait_until(lambda e: e.num_running == 1)
    assert (await survivor)[-1].usage["completion_tokens"] == 50


async def test_failed_step_ends_its_requests_with_error_and_the_engine_goes_on(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_step(monkeypatch, engine, at_call=3, message="injected fault")
    failed = await collect(
        engine, "victim", "The baker", SamplingParams(max_new_tokens=20, min_new_tokens=20)
    )
    assert failed[-1].finish_reason == "error"
    assert failed[-1].error is not None and "RuntimeError" in failed[-1].error
    after = await collect(engine, "next", "The baker", SamplingParams(max_new_tokens=5, min_new_tokens=5))
    assert after[-1].finish_reason == "length"
    assert after[-1].usage["completion_tokens"] == 5
    assert engine.num_running == 0


async def test_min_new_tokens_holds_off_end_of_sequence(tiny: LoadedModel) -> None:
    engine = make_engine(tiny)
    bias_head(engine, [tiny.tokenizer.eos_token_id], 1e4)  # end-of-sequence everywhere
    await engine.start()
    held = await collect(
        engine, "held", "The baker", SamplingParams(temperature=0.0, max_new_tokens=20, min_new_tokens=7)
    )
    free = await collect(engine, "free", "The baker", SamplingParams(temperature=0.0, max_new_tokens=20))
    await engine.stop()
    assert held[-1].finish_reason == "eos" and held[-1].usage["completion_tokens"] == 8
    assert free[-1].finish_reason == "eos" and free[-1].usage["completion_tokens"] == 1


async def test_stopping_the_engine_ends_live_requests_with_shutdown(tiny: LoadedModel) -> None:
    engine = make_engine(tiny)
    await engine.start()
    params = SamplingParams(max_new_tokens=400, min_new_tokens=400)
    stream = engine.generate(engine.prompts.truncated("The baker", 256, params.max_new_tokens), params)
    async with contextlib.aclosing(stream):
        await anext(stream)
        await engine.stop()
        rest = [out async for out in stream]
    assert rest[-1].finish_reason == "shutdown"
    assert not engine.ready


async def test_frequency_and_presence_penalties_decode_as_a_hand_computation_on_the_logits(
    tiny: LoadedModel,
) -> None:
    """On a random Llama (its greedy output repeats itself, so the penalties change it)."""
    model = build("llama", len(tiny.tokenizer), tiny.tokenizer.eos_token_id)
    random_llama = LoadedModel(model, tiny.tokenizer, "random-llama", torch.device("cpu"), torch.float32)
    engine = make_engine(random_llama)
    await engine.start()
    prompts = ["The baker", "Every morning the little bakery at the corner"]
    cases = [(1.5, 0.0, 1.0), (0.0, 2.0, 1.0), (0.7, -0.4, 1.3)]
    try:
        plain = SamplingParams(temperature=0.0, max_new_tokens=24, min_new_tokens=24)
        unpenalised = [await collect(engine, f"plain{i}", p, plain) for i, p in enumerate(prompts)]
        runs = []
        for frequency, presence, repetition in cases:
            params = plain.model_copy(
                update={
                    "frequency_penalty": frequency,
                    "presence_penalty": presence,
                    "repetition_penalty": repetition,
                }
            )
            # All prompts of a case at once: the penalties are per row, in one batch.
            runs.append(
                await asyncio.gather(*(collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts)))
            )
    finally:
        await engine.stop()
    for (frequency, presence, repetition), outputs in zip(cases, runs, strict=True):
        texts = ["".join(out.text for out in output) for output in outputs]
        for prompt, text in zip(prompts, texts, strict=True):
            ids = tiny.tokenizer.encode(prompt)
            want = penalised_greedy(model, ids, 24, frequency, presence, repetition)
            assert text == tiny.tokenizer.decode(want)
        # The penalties changed what greedy decoding gives (a server ignoring them would fail above).
        assert texts != ["".join(out.text for out in before) for before in unpenalised]


async def test_stop_token_ids_end_generation_once_min_new_tokens_are_made(tiny: LoadedModel) -> None:
    engine = make_engine(tiny)
    await engine.start()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    try:
        free = await collect(engine, "free", "The baker", greedy)
        ids = reference(tiny.model, tiny.tokenizer.encode("The baker"), 12, tiny.tokenizer.pad_token_id)
        stop_id = ids[4]
        first = ids.index(stop_id)  # the stop token's first place in the free output
        stopped = await collect(
            engine, "stopped", "The baker", greedy.model_copy(update={"stop_token_ids": [stop_id, 10**6]})
        )
        late = await collect(
            engine,
            "late",
            "The baker",
            greedy.model_copy(update={"stop_token_ids": [stop_id], "min_new_tokens": first + 1}),
        )
    finally:
        await engine.stop()
    assert len(ids) == 12 and "".join(out.text for out in free) == tiny.tokenizer.decode(ids)
    assert stopped[-1].finish_reason == "stop"
    assert stopped[-1].usage["completion_tokens"] == first + 1
    assert "".join(out.text for out in stopped) == tiny.tokenizer.decode(ids[: first + 1])
    # Once min_new_tokens are made it ends at the next stop token, if any, or at max_new_tokens.
    later = [i for i in range(first + 1, 12) if ids[i] == stop_id]
    assert late[-1].usage["completion_tokens"] == (later[0] + 1 if later else 12)


async def test_ignore_eos_generates_past_end_of_sequence(tiny: LoadedModel) -> None:
    engine = make_engine(tiny)
    bias_head(engine, [tiny.tokenizer.eos_token_id], 1e4)  # end-of-sequence everywhere
    await engine.start()
    params = SamplingParams(temperature=0.0, max_new_tokens=9)
    try:
        ignoring = await collect(
            engine, "ignoring", "The baker", params.model_copy(update={"ignore_eos": True})
        )
        ending = await collect(engine, "ending", "The baker", params)
    finally:
        await engine.stop()
    assert ignoring[-1].finish_reason == "length" and ignoring[-1].usage["completion_tokens"] == 9
    assert ending[-1].finish_reason == "eos" and ending[-1].usage["completion_tokens"] == 1


def test_no_more_tokens_mix_than_the_prefill_budget_and_zero_turns_mixing_off(tiny: LoadedModel) -> None:
    """While rows decode a step's prefill budget is the smaller of the two settings: the decode
    forward's room for mixed tokens (and its captured sizes) is no larger."""
    assert (
        make_engine(tiny, prefill_token_budget=64, mixed_prefill_tokens=512).engine.runner.mixed_tokens == 64
    )
    assert make_engine(tiny, prefill_token_budget=4096).engine.runner.mixed_tokens == 512
    off = make_engine(tiny, mixed_prefill_tokens=0).engine
    assert off.runner.mixed_tokens == 0 and off.scheduler.config.mixed_prefill_tokens == 0


def test_a_newcomer_mixed_in_and_one_prefilled_apart_in_the_same_step_are_both_exact(
    tiny: LoadedModel,
) -> None:
    """While a row decodes, two newcomers come in one step: the first's tokens run in the decoding
    row's forward (placed after every row of the step), the second, past the mixed read limit, in a
    forward of its own. All three give generate()'s tokens: the mixed one's every token ran."""
    engine = make_engine(tiny, max_batch_size=4, mixed_prefill_tokens=64).engine  # driven by hand
    engine.report = lambda report: None
    seqs: dict[str, Any] = {}
    steps: list[tuple[set[str], set[str]]] = []
    launch = engine.runner.launch

    def recording(batch: Any, meanwhile: Any = None) -> Launched:
        seqs.update((seq.label, seq) for seq in batch.rows)
        mixed, apart = batch.prefill[: batch.mixed], batch.prefill[batch.mixed :]
        steps.append(({seq.label for seq in mixed}, {seq.label for seq in apart}))
        return launch(batch, meanwhile)

    engine.runner.launch = recording  # type: ignore[method-assign]
    prompts = {"first": PROMPTS[5], "mixed": PROMPTS[1], "apart": PROMPTS[6]}
    ids = {label: tiny.tokenizer.encode(prompt) for label, prompt in prompts.items()}
    # A newcomer's n tokens read n(n+1)/2 positions: the limit takes the first, not the second.
    reads = {label: len(tokens) * (len(tokens) + 1) // 2 for label, tokens in ids.items()}
    assert len(ids["mixed"]) > 1 and reads["mixed"] < reads["apart"]
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, mixed_read_limit=reads["mixed"])
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12)
    engine.submit(AddRequest("first", ids["first"], params, 1, 0.0, label="first"))
    engine.run_once()
    engine.run_once()
    for label in ("mixed", "apart"):
        engine.submit(AddRequest(label, ids[label], params, 1, 0.0, label=label))
    while engine.scheduler.has_work:
        engine.run_once()
    engine.flush()
    assert ({"mixed"}, {"apart"}) in steps
    for label, seq in seqs.items():
        want = reference(tiny.model, ids[label], 12, tiny.tokenizer.pad_token_id, min_new_tokens=12)
        assert seq.tokens[len(ids[label]) :] == want, label
