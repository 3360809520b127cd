"""The production path over a real TCP socket: streaming is incremental, and a client that hangs up frees
its row (aiohttp's TestServer always cancels handlers, so these tests run a real AppRunner)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import make_engine
from tests.sse import parse_events
from trickle.config import Settings
from trickle.generation import AsyncEngine, LoadedModel
from trickle.server import AccessLogger, create_app


@pytest.fixture(params=[True, False], ids=["handler_cancellation", "no_handler_cancellation"])
async def live(
    request: pytest.FixtureRequest, tiny: LoadedModel, settings: Settings
) -> AsyncIterator[tuple[str, AsyncEngine]]:
    engine = make_engine(tiny)
    # Without resuming: a client that hangs up cancels its request at once (tests/test_resume.py has the
    # grace period).
    unresumable = settings.model_copy(update={"resume_grace": 0.0})
    runner = web.AppRunner(
        create_app(unresumable, engine), handler_cancellation=request.param, access_log_class=AccessLogger
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"127.0.0.1:{port}", engine
    await runner.cleanup()


async def open_stream(
    address: str, body: dict[str, object]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /stream HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await reader.read(4096)
        assert chunk, "connection closed early"
        data += chunk
    return data


async def test_first_event_arrives_long_before_the_end(live: tuple[str, AsyncEngine]) -> None:
    address, engine = live
    body = {"prompt": "The baker", "max_new_tokens": 300, "min_new_tokens": 300}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{address}/stream", json=body) as response,
    ):
        start = time.monotonic()
        first_line = await response.content.readline()
        first_at = time.monotonic() - start
        # The request is still generating when its first event is in the client's hands.
        assert engine.num_running == 1
        rest = await response.content.read()
        end_at = time.monotonic() - start
    events = parse_events((first_line + rest).decode())
    assert events[-1].event == "end" and events[-1].json()["usage"]["completion_tokens"] == 300
    assert len(events) > 100
    assert first_at < end_at / 5


async def test_client_that_hangs_up_frees_its_row_and_others_finish(live: tuple[str, AsyncEngine]) -> None:
    address, engine = live
    long = {"prompt": "The baker", "max_new_tokens": 200, "min_new_tokens": 200}
    streams = [await open_stream(address, long) for _ in range(3)]
    for reader, _ in streams:
        await read_until(reader, b"data: ")
    await engine.wait_until(lambda e: e.num_running == 3)
    _, leaver = streams.pop(0)
    leaver.close()
    await leaver.wait_closed()
    await engine.wait_until(lambda e: e.num_running == 2)
    for reader, writer in streams:
        tail = await read_until(reader, b"event: end")
        end = tail[tail.index(b"event: end") :].split(b"\n")[1].removeprefix(b"data: ")
        assert json.loads(end)["finish_reason"] == "length"
        assert json.loads(end)["usage"]["completion_tokens"] == 200
        writer.close()
    await engine.wait_until(lambda e: e.num_running == 0)
