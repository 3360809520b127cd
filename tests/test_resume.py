"""Resumable streams: a /stream cut at any event and resumed with Last-Event-ID gives, put together, the
uninterrupted stream (the same ids and text, no duplicate, no gap), from whichever HTTP worker the
reconnect lands on; only the API key that opened it may resume it; a stream left past the grace period
is cancelled and a late reconnect is a 404."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import app_url, make_engine
from tests.sse import Event, parse_events
from tests.test_process import drained
from trickle.config import Settings
from trickle.generation import LoadedModel, SamplingParams
from trickle.generation.messages import AddRequest, TokenOutput
from trickle.generation.resume import Keeper, credential_of
from trickle.server import create_app

GRACE_S = 1.5
KEYS = ("oven-key", "flour-key")
BODY = {"prompt": "The baker", "max_new_tokens": 24, "min_new_tokens": 24, "temperature": 0.9, "seed": 7}


@pytest.fixture(scope="module")
def worker_server(model_dir: Path) -> Iterator[str]:
    env = {
        "TRICKLE_WORKERS": "2", "TRICKLE_RESUME_GRACE": str(GRACE_S), "TRICKLE_API_KEYS": ",".join(KEYS),
        "TRICKLE_DTYPE": "float32", "TRICKLE_PING_INTERVAL": "30", "TRICKLE_MAX_SEQ_LEN": "4096",
    }  # fmt: skip
    with drained(model_dir, env) as url:
        yield url


@pytest.fixture(params=["in_process", "workers"])
async def base_url(
    request: pytest.FixtureRequest, tiny: LoadedModel, settings: Settings
) -> AsyncIterator[str]:
    """The app in this process, or the real program with two HTTP workers (a reconnect lands on either)."""
    if request.param == "workers":
        yield request.getfixturevalue("worker_server")
        return
    served = settings.model_copy(update={"resume_grace": GRACE_S, "api_keys": list(KEYS)})
    engine = make_engine(tiny, resume_grace=GRACE_S, max_seq_len=4096)  # type: ignore[arg-type]
    async with app_url(create_app(served, engine)) as url:
        yield url


def auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def read_events(response: aiohttp.ClientResponse, count: int | None = None) -> list[Event]:
    """The response's events: all of them, or the first `count` (then the connection is dropped)."""
    raw, events = b"", []
    async for line in response.content:
        raw += line
        if line == b"\n":
            events = parse_events(raw.decode())
            if count is not None and len(events) >= count:
                response.close()
                return events[:count]
    return parse_events(raw.decode())


def same_stream(got: list[Event], want: list[Event]) -> bool:
    """The same ids, events and data, the end's timings aside (two requests take their own time)."""

    def comparable(event: Event) -> tuple[Any, ...]:
        data = event.json()
        if event.event == "end":
            data.pop("timings")
        return event.id, event.event, data

    return [comparable(e) for e in got] == [comparable(e) for e in want]


async def reconnect(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> aiohttp.ClientResponse:
    """GET the stream again, as EventSource does (whether or not the server has seen the old connection
    go: the new one takes the stream over)."""
    return await session.get(url, headers=headers)


async def test_a_stream_cut_at_any_event_and_resumed_is_the_uninterrupted_stream(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        whole_response = await session.post(f"{base_url}/stream", json=BODY, headers=auth())
        whole = await read_events(whole_response)
        assert whole[-1].event == "end" and [e.id for e in whole] == [str(i) for i in range(len(whole))]
        for cut in [*sorted(random.Random(5).sample(range(1, len(whole) - 1), 3)), len(whole) - 1]:
            response = await session.post(f"{base_url}/stream", json=BODY, headers=auth())
            stream_id = response.headers["X-Stream-Id"]
            assert len(stream_id) == 32
            first = await read_events(response, cut)
            headers = {**auth(), "Last-Event-ID": first[-1].id or ""}
            resumed_response = await reconnect(session, f"{base_url}/stream/{stream_id}", headers)
            assert resumed_response.status == 200
            assert resumed_response.headers["X-Stream-Id"] == stream_id
            resumed = await read_events(resumed_response)
            assert same_stream(first + resumed, whole), f"cut after {cut} events"


async def test_a_resume_while_the_old_connection_still_reads_takes_the_stream_over(base_url: str) -> None:
    """The client comes back before the server has seen its old connection go (or reads the stream
    twice): the new reading gets the rest, the old one ends with an error and no end."""
    async with aiohttp.ClientSession() as session:
        whole = await read_events(await session.post(f"{base_url}/stream", json=BODY, headers=auth()))
        old = await session.post(f"{base_url}/stream", json=BODY, headers=auth())
        raw = b""
        while len(parse_events(raw.decode())) < 4 or not raw.endswith(b"\n\n"):
            raw += await old.content.readline()  # four events read; the connection stays open
        first = parse_events(raw.decode())[:4]
        headers = {**auth(), "Last-Event-ID": first[-1].id or ""}
        new = await reconnect(session, f"{base_url}/stream/{old.headers['X-Stream-Id']}", headers)
        assert new.status == 200
        resumed = await read_events(new)
        assert same_stream(first + resumed, whole)
        rest = parse_events((raw + await old.content.read()).decode())[4:]  # to the old one's close
        assert rest and rest[-1].event == "error" and "another connection" in rest[-1].json()["message"]
        assert all(event.event != "end" for event in rest)


async def test_only_the_key_that_opened_a_stream_may_resume_it(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{base_url}/stream", json=BODY, headers=auth())
        stream_id = response.headers["X-Stream-Id"]
        await read_events(response, 2)
        other = await reconnect(session, f"{base_url}/stream/{stream_id}", auth(KEYS[1]))
        assert other.status == 404
        nobody = await session.get(f"{base_url}/stream/{stream_id}")
        assert nobody.status == 401
        mine = await reconnect(session, f"{base_url}/stream/{stream_id}", auth())
        assert mine.status == 200
        assert (await read_events(mine))[-1].event == "end"
        bad = await session.get(f"{base_url}/stream/{stream_id}", headers={**auth(), "Last-Event-ID": "x"})
        assert bad.status == 400


async def metric(session: aiohttp.ClientSession, base_url: str, name: str) -> float:
    async with session.get(f"{base_url}/metrics") as response:
        text = await response.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_a_left_stream_runs_for_the_grace_period_then_is_cancelled_and_a_late_resume_is_404(
    base_url: str,
) -> None:
    long = {**BODY, "max_new_tokens": 4000, "min_new_tokens": 4000}  # seconds of generation
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{base_url}/stream", json=long, headers=auth())
        stream_id = response.headers["X-Stream-Id"]
        await read_events(response, 2)
        left = time.monotonic()
        # Until the grace period ends the request runs on (no recompute if its client comes back); then
        # it is cancelled.
        running = [await metric(session, base_url, "trickle:num_requests_running")]
        while running[-1] > 0 and time.monotonic() - left < 20:
            await asyncio.sleep(0.1)
            running.append(await metric(session, base_url, "trickle:num_requests_running"))
        assert running[0] == 1 and running[-1] == 0
        assert time.monotonic() - left >= GRACE_S * 0.9
        late = await session.get(f"{base_url}/stream/{stream_id}", headers=auth())
        assert late.status == 404
        assert "to resume" in (await late.json())["error"]["message"]


async def test_without_a_grace_period_streams_have_no_id_and_nothing_resumes(
    tiny: LoadedModel, settings: Settings
) -> None:
    served = settings.model_copy(update={"resume_grace": 0.0})
    async with (
        app_url(create_app(served, make_engine(tiny, resume_grace=0))) as url,
        aiohttp.ClientSession() as session,
    ):
        response = await session.post(f"{url}/stream", json=BODY)
        assert "X-Stream-Id" not in response.headers
        await read_events(response)
        assert (await session.get(f"{url}/stream/{'0' * 32}")).status == 404


async def test_delete_cancels_a_stream_at_once_for_its_reader_and_only_for_its_key(base_url: str) -> None:
    long = {**BODY, "max_new_tokens": 4000, "min_new_tokens": 4000}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{base_url}/stream", json=long, headers=auth())
        stream_id = response.headers["X-Stream-Id"]
        raw = b""
        while raw.count(b"\n\n") < 2:
            raw += await response.content.readline()
        other = await session.delete(f"{base_url}/stream/{stream_id}", headers=auth(KEYS[1]))
        assert other.status == 404
        cancelled = await session.delete(f"{base_url}/stream/{stream_id}", headers=auth())
        assert cancelled.status == 204
        rest = await read_events(response)  # the reader sees its end come, not the 4,000 tokens
        assert rest[-1].event == "end" and rest[-1].json()["finish_reason"] == "cancelled"
        assert rest[-1].json()["usage"]["completion_tokens"] < 4000
        assert await metric(session, base_url, "trickle:num_requests_running") == 0
        # Kept, ended: a reconnect replays it to its end.
        replay = await reconnect(session, f"{base_url}/stream/{stream_id}", auth())
        assert (await read_events(replay))[-1].json()["finish_reason"] == "cancelled"


async def test_the_keeper_counts_orphans_and_cancels_only_those_nobody_came_back_for() -> None:
    """Orphans hold rows (the server's capacity counts them) until they end, are read again, or are
    cancelled when their grace period ends; a finished request is only ever replayed."""
    aborted: list[str] = []
    keeper = Keeper(0.05, aborted.append)
    params = SamplingParams(max_new_tokens=4)
    for name in ("a", "b", "c"):
        keeper.add(AddRequest(name, [1, 2], params, 0, 0.0), credential_of("key"))
    keeper.detach("a")
    keeper.detach("b")
    assert keeper.orphans == 2
    assert keeper.reattach("b", credential_of("other")) == (None, "missing")
    kept, _ = keeper.reattach("b", credential_of("key"))
    assert kept is not None and keeper.orphans == 1
    again, taken = keeper.reattach("b", credential_of("key"))  # a second reading takes it over
    assert again is kept and taken == "taken" and kept.reader == 2
    assert not keeper.detach("b", 1) and keeper.orphans == 1  # the first reading's leaving: too late
    keeper.record(["a", "b"], [7, 8], {})
    keeper.ended([TokenOutput("c", 9, finish_reason="length")])
    assert keeper.reattach("c", credential_of("key"))[0] is not None  # ended: replayed, never busy
    await asyncio.sleep(0.2)  # past the grace period (a timer, as the server's)
    assert aborted == ["a"] and keeper.orphans == 0
    assert "a" not in keeper and "c" not in keeper and "b" in keeper  # b has its reader again


async def test_the_keeper_holds_at_most_its_token_budget_the_oldest_going_first() -> None:
    """Kept tokens (prompts and outputs) of finished or left requests are bounded, not only their
    count: past the budget the oldest go, and an orphan among them is cancelled."""
    aborted: list[str] = []
    keeper = Keeper(60.0, aborted.append, token_limit=12)
    params = SamplingParams(max_new_tokens=4)
    for name in ("orphan", "b", "c"):
        keeper.add(AddRequest(name, [1, 2], params, 0, 0.0), credential_of("key"))
    keeper.record(["orphan", "b", "c"], [5, 6, 7], {})
    keeper.detach("orphan")  # 2 + 1 tokens, still running
    keeper.ended([TokenOutput("b", 8, finish_reason="length")])  # 2 + 2
    assert keeper.idle_tokens == 7 and aborted == []
    keeper.ended([TokenOutput("c", 9, finish_reason="length")])  # 2 + 2: 11, within 12
    assert "orphan" in keeper and keeper.idle_tokens == 11
    keeper.add(AddRequest("d", [1, 2, 3], params, 0, 0.0), credential_of("key"))
    keeper.ended([TokenOutput("d", 4, finish_reason="length")])  # 3 + 1: 15, past 12
    assert "orphan" not in keeper and aborted == ["orphan"]  # the oldest, cancelled
    assert all(name in keeper for name in ("b", "c", "d")) and keeper.idle_tokens == 12
    kept, _ = keeper.reattach("b", credential_of("key"))  # a finished one is replayed, stays idle
    assert kept is not None and keeper.idle_tokens == 12
