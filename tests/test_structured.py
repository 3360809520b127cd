"""Structured output: JSON Schema, JSON objects, regular expressions and grammars followed token by token
(llguidance's masks on the rows that ask, nothing on the others), and bad formats refused naming the
field (tests/test_http.py and tests/test_openai.py, in both process layouts)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import jsonschema
import pytest
import torch

from tests.conftest import bias_head, make_engine, record_prefills
from tests.families import build
from trickle.generation import AsyncEngine, LoadedModel, SamplingParams, structured
from trickle.generation.messages import AddRequest
from trickle.generation.params import ResponseFormat
from trickle.generation.runner.inputs import GrammarMasks
from trickle.generation.sequence import Sequence
from trickle.generation.structured import Grammars

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"enum": ["small", "large"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "dims": {
            "type": "object",
            "properties": {"w": {"type": "integer"}, "h": {"type": "number"}},
            "required": ["w"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "size", "dims"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def random_llama(tiny: LoadedModel) -> LoadedModel:
    """A random model: what it writes unconstrained is never JSON."""
    model = build("llama", len(tiny.tokenizer), tiny.tokenizer.eos_token_id)
    return LoadedModel(model, tiny.tokenizer, "random-llama", torch.device("cpu"), torch.float32)


async def texts(
    engine: AsyncEngine, prompt: str, params: list[SamplingParams]
) -> list[tuple[str, str | None]]:
    """Every request's text and finish reason, all running at once."""
    ids = engine.prompts.encode(prompt)

    async def one(p: SamplingParams) -> tuple[str, str | None]:
        outputs = [out async for out in engine.generate(ids, p)]
        return "".join(out.text for out in outputs), outputs[-1].finish_reason

    return await asyncio.gather(*(one(p) for p in params))


async def test_fifty_seeded_json_schema_requests_all_validate_where_unconstrained_text_is_not_json(
    random_llama: LoadedModel,
) -> None:
    engine = make_engine(random_llama)
    await engine.start()
    shaped = {"type": "json_schema", "schema": SCHEMA}
    try:
        constrained = await texts(
            engine,
            "The baker",
            [
                SamplingParams(temperature=1.0, seed=seed, max_new_tokens=200, response_format=shaped)
                for seed in range(50)
            ],
        )
        free = await texts(
            engine,
            "The baker",
            [SamplingParams(temperature=1.0, seed=s, max_new_tokens=60) for s in range(5)],
        )
    finally:
        await engine.stop()
    for text, finish in constrained:
        assert finish == "eos", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in constrained}) > 40, "seeds give different objects"
    for text, _ in free:
        with pytest.raises(ValueError):
            json.loads(text)


def closing(engine: AsyncEngine, tokenizer: Any) -> None:
    """Bias the model towards tokens that close a JSON string, object or array: a random model picks a
    quote once in hundreds of tokens, so its strings would run past any budget. (The grammar is what
    keeps the output valid; the bias only lets a random model finish. Unconstrained, it still writes
    no JSON.)"""
    ids = [i for i in range(len(tokenizer)) if any(c in tokenizer.decode([i]) for c in '"}]')]
    bias_head(engine, ids, 4.0)


async def test_json_objects_regular_expressions_and_grammars_and_a_free_row_beside_them(
    random_llama: LoadedModel,
) -> None:
    """Rows with each kind of format and one without, in one batch: each constrained row's text is in
    its language; the free row writes what it writes alone (the masks are per row)."""
    engine = make_engine(random_llama)
    closing(engine, random_llama.tokenizer)
    await engine.start()
    base = SamplingParams(temperature=1.0, max_new_tokens=300)
    lark = 'start: answer " because " reason\nanswer: "yes" | "no"\nreason: /[a-z]{2,10}/'
    formats: list[dict[str, Any]] = [
        {"type": "json_object"},
        {"type": "regex", "pattern": "[a-z]{3}-[0-9]{2,4}"},
        {"type": "grammar", "grammar": lark},
    ]
    try:
        alone = await texts(engine, "The baker", [base.model_copy(update={"seed": 99})])
        mixed = await texts(
            engine,
            "The baker",
            [
                SamplingParams(temperature=1.0, max_new_tokens=300, seed=seed, response_format=fmt)
                for seed in range(4)
                for fmt in formats
            ]
            + [base.model_copy(update={"seed": 99})],
        )
    finally:
        await engine.stop()
    *shaped, free = mixed
    assert free == alone[0]
    with pytest.raises(ValueError):
        json.loads(free[0])
    for index, (text, finish) in enumerate(shaped):
        kind = formats[index % 3]["type"]
        assert finish == "eos", (kind, text)
        if kind == "json_object":
            assert isinstance(json.loads(text), dict)
        elif kind == "regex":
            assert re.fullmatch("[a-z]{3}-[0-9]{2,4}", text), text
        else:
            assert re.fullmatch("(yes|no) because [a-z]{2,10}", text), text


async def test_a_request_after_a_constrained_one_in_its_row_is_free_from_its_first_token(
    random_llama: LoadedModel,
) -> None:
    """Prefills always apply the rows' masks (their graphs sample inside): a step without grammars
    must find every row allowing everything, not the mask a constrained row left there (digits only)."""
    engine = make_engine(random_llama)
    await engine.start()
    free = SamplingParams(temperature=0.0, max_new_tokens=8)
    digits = SamplingParams(max_new_tokens=3, response_format={"type": "regex", "pattern": "[0-9]+"})
    try:
        (before,) = await texts(engine, "The baker", [free])
        (shaped,) = await texts(engine, "The baker", [digits])
        (after,) = await texts(engine, "The baker", [free])
    finally:
        await engine.stop()
    assert re.fullmatch("[0-9]+", shaped[0]) and not before[0][:1].isdigit()
    assert after == before


async def test_constrained_newcomers_mixed_into_a_decoding_rows_forward_follow_their_format(
    random_llama: LoadedModel,
) -> None:
    """Requests with a format that join a free row while it decodes run in its forward (mixed): their
    first token, sampled there, is masked as every later one is; the free row is not."""
    engine = make_engine(random_llama)
    prefills = record_prefills(engine)
    ids = engine.prompts.encode("The baker")
    free = SamplingParams(temperature=0.0, max_new_tokens=60, min_new_tokens=60)
    digits = SamplingParams(max_new_tokens=6, seed=3, response_format={"type": "regex", "pattern": "[0-9]+"})
    await engine.start()
    try:
        (alone,) = await texts(engine, "The baker", [free])
        stream = engine.generate(ids, free, label="free")
        first = await anext(stream)
        shaped = await asyncio.gather(
            *(collect_text(engine.generate(ids, digits, label=f"digits{i}")) for i in range(3))
        )
        rest = [out async for out in stream]
    finally:
        await engine.stop()
    assert prefills.mixed >= {"digits0", "digits1", "digits2"}
    for text in shaped:
        assert re.fullmatch("[0-9]+", text), text
    assert first.text + "".join(out.text for out in rest) == alone[0]


async def collect_text(stream: Any) -> str:
    return "".join([out.text async for out in stream])


def test_a_constrained_step_collects_the_step_before_once_its_own_forward_is_queued(
    random_llama: LoadedModel,
) -> None:
    """The masks need the step in flight's tokens: that step is collected after the next step's forward
    is queued (the device runs it meanwhile) and before the next step samples. So the order of a
    constrained row's turns is forward, collect, sample, forward, collect, sample..."""
    engine = make_engine(random_llama).engine  # driven by hand, without its thread
    engine.report = lambda report: None
    runner, seen = engine.runner, []
    forward, sample, collect = runner._decode_forward, runner._decode_sample, runner.collect

    def recording(name: str, call: Any) -> Any:
        def recorded(*args: Any) -> Any:
            seen.append(name)
            return call(*args)

        return recorded

    runner._decode_forward = recording("forward", forward)  # type: ignore[method-assign]
    runner._decode_sample = recording("sample", sample)  # type: ignore[method-assign]
    runner.collect = recording("collect", collect)  # type: ignore[method-assign]
    params = SamplingParams(
        temperature=1.0, seed=1, max_new_tokens=6, response_format={"type": "json_object"}
    )
    engine.submit(AddRequest("shaped", random_llama.tokenizer.encode("The baker"), params, 1, 0.0))
    for _ in range(4):
        engine.run_once()
    # Turn 1 prefills (no decode); then each turn: the forward, the previous step's collect, the sampling.
    assert seen == ["forward", "collect", "sample"] * 3
    engine.flush()
    assert engine.scheduler.running[0].matcher.is_error() is False


def test_a_formats_matcher_is_compiled_once_and_each_request_gets_its_own_copy(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    grammars = Grammars(tiny.tokenizer)
    compiled: list[ResponseFormat] = []
    real = structured.grammar_of

    def counting(spec: ResponseFormat) -> str:  # what each compile starts with
        compiled.append(spec)
        return real(spec)

    monkeypatch.setattr(structured, "grammar_of", counting)
    digits = ResponseFormat(type="regex", pattern="[0-9]+")
    first, second = grammars.matcher(digits), grammars.matcher(digits)
    grammars.matcher(ResponseFormat(type="regex", pattern="[a-z]+"))
    assert len(compiled) == 2  # one compile a format, not one a request
    one = tiny.tokenizer.convert_tokens_to_ids("1")
    assert first.consume_token(one) and first.is_accepting()
    assert not second.is_accepting()  # the copies do not share their state


def test_llguidances_view_of_the_tokenizer_is_made_in_the_background_once_prepared(tiny: LoadedModel) -> None:
    """Engines and HTTP workers prepare it when they start: the first constrained request must not wait
    a second for it (on the engine thread, every stream would)."""
    grammars = Grammars(tiny.tokenizer)
    grammars.prepare_in_background().join(timeout=60)
    assert grammars._tokenizer is not None


def test_a_steps_masks_are_the_same_on_the_engine_thread_and_on_llguidances_pool(tiny: LoadedModel) -> None:
    """Cheap masks are computed on the engine thread (waking the pool cost more on a busy host:
    bench/results/grammar-masks.md); costly ones on the pool, with a step in `PROBE_EVERY` timed on
    the engine thread again. Either way each row gets its own grammar's mask, and a free row all ones."""
    grammars = Grammars(tiny.tokenizer)
    vocab = len(tiny.tokenizer)
    formats = [ResponseFormat(type="json_object"), None, ResponseFormat(type="regex", pattern="[0-9]+")]
    rows = [
        Sequence(f"r{i}", [1], SamplingParams(), 0, matcher=None if spec is None else grammars.matcher(spec))
        for i, spec in enumerate(formats)
    ]
    masks = GrammarMasks(len(rows) + 1, vocab, torch.device("cpu"))
    pooled: list[int] = []
    pool = masks._executor

    class Spy:
        def unsafe_compute_mask_ptr(self, rows: Any, *args: Any) -> None:
            pooled.append(len(rows))
            pool.unsafe_compute_mask_ptr(rows, *args)

    masks._executor = Spy()  # type: ignore[assignment]
    assert masks.load(rows)
    on_thread = masks.bits.clone()
    assert not pooled and 0 < masks.row_seconds < 0.01  # JSON and a regular expression: microseconds

    digit = tiny.tokenizer.convert_tokens_to_ids("1")
    brace = tiny.tokenizer.convert_tokens_to_ids("{")
    allowed = masks.allowed(torch.arange(len(rows)))
    assert allowed[1].all()  # the free row
    assert allowed[0, brace] and not allowed[0, digit]  # an object starts with "{"
    assert allowed[2, digit] and not allowed[2, brace]

    masks.row_seconds = 1.0  # as if each row took a second: the pool takes the next steps
    for _ in range(masks.PROBE_EVERY):
        masks.load(rows)
        assert torch.equal(masks.bits, on_thread)
    assert pooled == [2] * masks.PROBE_EVERY
    masks.load(rows)  # the probe: timed on the engine thread, and the estimate falls back
    assert len(pooled) == masks.PROBE_EVERY and masks.row_seconds < 0.3
    assert torch.equal(masks.bits, on_thread)

    # Every row constrained: the host table is not reset first, each row's mask is written whole.
    masks._host.fill_(0x5A5A5A5A)
    masks.load(rows[:1] + rows[2:])
    assert torch.equal(masks.bits[:2], on_thread[[0, 2]])
