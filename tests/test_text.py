"""Text: incremental detokenizing never emits a split character, and stop strings end the stream unseen."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import make_engine, scripted_model
from tests.sse import parse_events, text_of
from trickle.config import Settings
from trickle.generation import LoadedModel
from trickle.generation.detokenizer import IncrementalDetokenizer
from trickle.server import create_app

ClientFactory = Callable[..., Awaitable[TestClient]]
PROMPT = "The baker"
MULTIBYTE = "café 日本語 🙂 naïve"
PLAIN = "Hello world, the baker"


def deltas(tiny: LoadedModel, text: str, stop: list[str]) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tiny.tokenizer.backend_tokenizer, tiny.tokenizer.encode(PROMPT), stop)
    out = []
    for token in tiny.tokenizer.encode(text):
        out.append(detok.step(token))
        if detok.stopped:
            break
    return out, detok


def test_split_characters_are_held_until_whole(tiny: LoadedModel) -> None:
    ids = tiny.tokenizer.encode(MULTIBYTE)
    pieces, detok = deltas(tiny, MULTIBYTE, [])
    assert len(ids) > len(MULTIBYTE.encode()) / 2, "the test needs characters split across tokens"
    assert "".join(pieces) + detok.flush() == MULTIBYTE
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces, "a token that ends inside a character emits nothing yet"


def test_an_output_ending_inside_a_character_flushes_its_tail_as_the_tokenizer_decodes_it(
    tiny: LoadedModel,
) -> None:
    ids = tiny.tokenizer.encode("café 日本")
    cut = next(n for n in range(len(ids), 0, -1) if "\ufffd" in tiny.tokenizer.decode(ids[:n]))
    detok = IncrementalDetokenizer(tiny.tokenizer.backend_tokenizer, tiny.tokenizer.encode(PROMPT), ["zz"])
    pieces = [detok.step(token) for token in ids[:cut]]
    assert pieces[-1] == "", "the last token ends inside a character"
    assert "".join(pieces) + detok.flush() == tiny.tokenizer.decode(ids[:cut])


def test_text_without_stop_strings_is_emitted_at_once(tiny: LoadedModel) -> None:
    pieces, _ = deltas(tiny, PLAIN, [])
    assert pieces == [tiny.tokenizer.decode([t]) for t in tiny.tokenizer.encode(PLAIN)]


def test_only_a_possible_stop_prefix_is_held_back(tiny: LoadedModel) -> None:
    # PLAIN tokenizes as H|e|ll|o| wor|ld|,| the| baker; "l" and "ld" could start "ld!", nothing else can.
    pieces, detok = deltas(tiny, PLAIN, ["ld!"])
    assert pieces == ["H", "e", "l", "lo", " wor", "", "ld,", " the", " baker"]
    assert not detok.stopped


def test_stop_string_spanning_tokens_cuts_the_text(tiny: LoadedModel) -> None:
    pieces, detok = deltas(tiny, PLAIN, ["lo wo", "zzz"])
    assert detok.stopped
    assert "".join(pieces) == "Hel"
    assert detok.flush() == ""


@pytest.fixture
async def scripted_client(
    aiohttp_client: ClientFactory, tiny: LoadedModel, model_dir: Path, settings: Settings
) -> Callable[[str], Awaitable[TestClient]]:
    async def start(script_text: str) -> TestClient:
        script = [*tiny.tokenizer.encode(script_text), tiny.tokenizer.eos_token_id]
        model = scripted_model(model_dir, script, len(tiny.tokenizer.encode(PROMPT)))
        engine = make_engine(dataclasses.replace(tiny, model=model))
        return await aiohttp_client(create_app(settings, engine))

    return start


async def test_multibyte_text_streams_as_valid_text_equal_to_predict(
    scripted_client: Callable[[str], Awaitable[TestClient]],
) -> None:
    client = await scripted_client(MULTIBYTE)
    body = {"prompt": PROMPT, "temperature": 0.7, "seed": 3, "max_new_tokens": 100}
    response = await client.post("/stream", json=body)
    events = parse_events(await response.text())
    texts = [e.json()["text"] for e in events if e.event == "message"]
    assert all(text and "\ufffd" not in text for text in texts)
    assert text_of(events) == MULTIBYTE
    assert events[-1].json()["finish_reason"] == "eos"
    predicted = await (await client.post("/predict", json=body)).json()
    assert predicted["text"] == text_of(events)


async def test_stop_string_spanning_two_tokens_ends_the_stream(
    scripted_client: Callable[[str], Awaitable[TestClient]],
) -> None:
    client = await scripted_client(PLAIN)
    response = await client.post("/stream", json={"prompt": PROMPT, "stop": ["o wo"], "max_new_tokens": 50})
    events = parse_events(await response.text())
    assert text_of(events) == "Hell"
    assert events[-1].json()["finish_reason"] == "stop"
    assert "o wo" not in text_of(events)
    assert events[-1].json()["usage"]["completion_tokens"] == 5
