"""Hostile clients, over real sockets where the fault was in the socket path: one client's stream never
reaches another, no secret or prompt reaches the log, a long prompt never blocks the event loop, bodies
the parser cannot take are 400, and a client that stalls mid-body gets 408 without holding anyone up."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import fail_step, make_engine
from tests.sse import parse_events, text_of
from tests.test_http import ClientFactory
from trickle.api import native
from trickle.api.logs import AccessLogger, ClientFaults, configure_logging
from trickle.config import Settings
from trickle.generation import AsyncEngine, LoadedModel
from trickle.server import ENGINE_KEY, KEEPALIVE_TIMEOUT_S, create_app

KEY, OTHER_KEY, WRONG_KEY = "sk-live-Zq81kXw7Lm", "sk-team-Pb44Ty0Rs", "sk-guess-Hh52Vn3Ua"
PROMPT = "the secret recipe is saffron and cardamom"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """`app` on a real loopback socket, run as production runs it."""
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log_class=AccessLogger, keepalive_timeout=KEEPALIVE_TIMEOUT_S
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def captured_logs(fmt: str, secrets: list[str]) -> Iterator[io.StringIO]:
    """Every log line of the process, rendered as production renders it, into a string."""
    root, server_log = logging.getLogger(), logging.getLogger("aiohttp.server")
    saved = (root.handlers[:], root.level, server_log.filters[:], structlog.get_config())
    out = io.StringIO()
    configure_logging("debug", fmt, out, secrets=secrets)
    try:
        yield out
    finally:
        root.handlers[:], server_log.filters[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        structlog.configure(**saved[3])


async def raw_exchange(address: str, data: bytes) -> bytes:
    """Send `data` on a new connection; the first bytes that come back (a status line, or b"")."""
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(10):
            return await reader.read(64)
    finally:
        writer.close()


# ---------------------------------------------------------------- request ids


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tiny: LoadedModel, settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(settings, make_engine(tiny)))


def seeded(seed: int, tokens: int) -> dict[str, Any]:
    # Hot enough that two seeds write two texts (the demo model knows its own text by heart).
    return {
        "prompt": "The baker",
        "temperature": 4.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": seed,
        "max_new_tokens": tokens,
        "min_new_tokens": tokens,
    }


async def test_two_streams_with_one_request_id_each_get_exactly_their_own_text(client: TestClient) -> None:
    bodies = [seeded(1, 150), seeded(2, 150)]
    alone = [text_of(parse_events(await (await client.post("/stream", json=b)).text())) for b in bodies]
    assert alone[0] != alone[1]
    engine: AsyncEngine = client.server.app[ENGINE_KEY].engine
    async with asyncio.timeout(60):
        first = await client.post("/stream", json=bodies[0], headers={"X-Request-Id": "retry-7"})
        await first.content.readline()
        second = await client.post("/stream", json=bodies[1], headers={"X-Request-Id": "retry-7"})
        await engine.wait_until(lambda e: e.num_running == 2)
        raws = [await first.text(), await second.text()]
    for response, raw, text in zip([first, second], raws, alone, strict=True):
        events = parse_events(raw)
        assert response.headers["X-Request-Id"] == "retry-7"
        assert events[-1].event == "end" and events[-1].json()["finish_reason"] == "length"
        assert text_of(events) == text


async def test_openai_replies_to_one_request_id_have_distinct_ids(client: TestClient) -> None:
    body = {"model": "test", "prompt": "The baker", "max_tokens": 3}
    replies = [
        await client.post("/v1/completions", json=body, headers={"X-Request-Id": "same"}) for _ in "ab"
    ]
    assert [r.headers["X-Request-Id"] for r in replies] == ["same", "same"]
    ids = {(await r.json())["id"] for r in replies}
    assert len(ids) == 2


# ---------------------------------------------------------------- secrets and prompts stay out of logs


MALFORMED = [
    b"GARBAGE /stream HTTP/1.1\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n",
    b"POST /stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + KEY.encode()
    + b"\r\nContent-Length: abc\r\n\r\n",
    b"POST /stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + WRONG_KEY.encode()
    + b"\r\nBad Header\r\n\r\n",
    b"POST /stream?key=" + KEY.encode() + b" HTTP/9.9\r\n\r\n",
    b"POST /stream HTTP/1.1\r\nAuthorization: Bearer " + OTHER_KEY.encode() + b"\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
]


@pytest.mark.parametrize("fmt", ["json", "console"])
async def test_hostile_requests_and_failures_leave_no_key_authorization_or_prompt_in_the_log(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    settings = Settings(model="test", api_keys=[KEY, OTHER_KEY], max_body_bytes=1 << 21, read_timeout=0.5)
    engine = make_engine(tiny)
    with captured_logs(fmt, [KEY, OTHER_KEY]) as log:
        async with serving(create_app(settings, engine)) as address, aiohttp.ClientSession() as session:
            for data in MALFORMED:
                assert (await raw_exchange(address, data)).startswith(b"HTTP/1.")
            url = f"http://{address}"
            prompt_body = {"prompt": PROMPT, "max_new_tokens": 4}
            raw_bodies = [
                b"{oops " + PROMPT.encode(),
                b"[" * 50_000 + b"]" * 50_000,
                b'{"seed": ' + b"9" * 5000 + b"}",
            ]
            for path in ["/stream", "/v1/chat/completions"]:
                for data in raw_bodies:
                    async with session.post(
                        url + path, data=data, headers={**AUTH, "Content-Type": "application/json"}
                    ):
                        pass
            for headers in [{"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": WRONG_KEY}, {}]:
                async with session.post(f"{url}/predict", json=prompt_body, headers=headers) as refused:
                    assert refused.status == 401
            # A half-sent body, then a client that hangs up mid-body.
            half = b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            half += (
                b'\r\nContent-Type: application/json\r\nContent-Length: 900\r\n\r\n{"prompt": "'
                + PROMPT.encode()
            )
            assert (await raw_exchange(address, half)).startswith(b"HTTP/1.1 408 ")
            _, writer = await asyncio.open_connection(*address.split(":"))
            writer.write(half)
            writer.close()
            # An engine step that fails, and a handler that fails (a 500: the frames that held the keys).
            fail_step(monkeypatch, engine, at_call=1, message="injected")
            async with session.post(f"{url}/predict", json=prompt_body, headers=AUTH) as failed:
                assert failed.status == 500
            monkeypatch.setattr(native, "sampling_params", lambda body: 1 / 0)
            async with session.post(f"{url}/stream", json=prompt_body, headers=AUTH) as broken:
                assert broken.status == 500
    text = log.getvalue()
    # The battery did reach the log: the 500's traceback, the failed step, the protocol errors.
    assert "ZeroDivisionError" in text and "engine step failed" in text and "client protocol error" in text
    for secret in [KEY, OTHER_KEY, WRONG_KEY, "Bearer", PROMPT, PROMPT[:12], "saffron"]:
        assert secret not in text


def test_client_protocol_errors_are_one_short_line_a_second_counting_those_left_out() -> None:
    now = [0.0]
    faults = ClientFaults(interval=1.0, clock=lambda: now[0])

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "aiohttp.server", logging.ERROR, "", 0, "Error handling %s", ("x",), (type(exc), exc, None)
        )

    first = record(ConnectionResetError("raw bytes here"))
    assert faults.filter(first) and first.exc_info is None and first.getMessage() == "client protocol error"
    assert [faults.filter(record(ConnectionResetError())) for _ in range(5)] == [False] * 5
    now[0] = 1.5
    later = record(ConnectionResetError())
    assert faults.filter(later) and later.__dict__["left_out"] == 5
    bug = record(ZeroDivisionError())
    assert faults.filter(bug) and bug.exc_info is not None  # not a client's fault: left as it is


# ---------------------------------------------------------------- the event loop never blocks


async def test_health_and_a_running_stream_keep_pace_while_a_1mb_prompt_is_admitted(
    tiny: LoadedModel,
) -> None:
    settings = Settings(model="test", max_body_bytes=1 << 21, ping_interval=30.0)
    text = ("The oven warms and the dough rests; " * 30_000)[: 1 << 20]
    big = json.dumps({"prompt": text, "max_new_tokens": 4}).encode()
    async with (
        serving(create_app(settings, make_engine(tiny))) as address,
        aiohttp.ClientSession() as session,
    ):
        # What the server loaded is out of the cyclic collector's reach: a full pass over it took 200 ms.
        assert gc.get_freeze_count() > 100_000
        url = f"http://{address}"
        body = {"prompt": "The baker", "max_new_tokens": 450, "min_new_tokens": 450}
        async with session.post(f"{url}/stream", json=body) as running:
            await running.content.readline()
            arrivals: list[float] = []

            async def follow() -> None:
                async for _ in running.content:
                    arrivals.append(time.monotonic())

            follower = asyncio.create_task(follow())
            admitted = asyncio.create_task(
                session.post(
                    f"{url}/predict", data=io.BytesIO(big), headers={"Content-Type": "application/json"}
                )
            )
            started, waits = time.monotonic(), []
            while not admitted.done():
                asked = time.monotonic()
                async with session.get(f"{url}/health") as health:
                    assert health.status == 200
                waits.append(time.monotonic() - asked)
                await asyncio.sleep(0.02)  # a probe every 20 ms: sampling, not waiting for an event
            window = (started, time.monotonic())
            assert (await admitted).status == 200
            await follower
    assert len(waits) >= 3, "the big prompt was admitted before it could be measured"
    assert max(waits) < 0.1, waits
    during = [t for t in arrivals if window[0] <= t <= window[1]]
    gaps = [b - a for a, b in zip([window[0], *during], [*during, window[1]], strict=True)]
    assert max(gaps) < 0.1, gaps


def refuse_tokenizing(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized a prompt that its length alone rules out")

    monkeypatch.setattr(engine.prompts, "encode", refuse)
    monkeypatch.setattr(engine.prompts.tokenizer, "apply_chat_template", refuse)


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        (
            "/v1/chat/completions",
            {"model": "test", "messages": [{"role": "user", "content": "ab " * 100_000}]},
            400,
            "messages",
        ),
        ("/v1/completions", {"model": "test", "prompt": "ab " * 100_000}, 400, "prompt"),
        ("/stream", {"prompt": "ab " * 100_000, "max_new_tokens": 500}, 422, "max_new_tokens"),
    ],
)
async def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(
    aiohttp_client: ClientFactory,
    tiny: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, Any],
    status: int,
    field: str,
) -> None:
    engine = make_engine(tiny)
    client = await aiohttp_client(create_app(Settings(model="test", max_body_bytes=1 << 21), engine))
    refuse_tokenizing(engine, monkeypatch)
    response = await client.post(path, json=body)
    assert response.status == status
    error = (await response.json())["error"]
    assert error.get("field", error.get("param")) == field and "at least" in error["message"]


# ---------------------------------------------------------------- bodies the parser cannot take


@pytest.mark.parametrize("path", ["/stream", "/predict", "/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": ' * 50_000,
        b'{"prompt": "a", "seed": ' + b"9" * 4301 + b"}",
    ],
    ids=["deep array", "deep objects", "4301 digits"],
)
async def test_deep_json_and_huge_integers_are_400_and_the_next_request_succeeds(
    aiohttp_client: ClientFactory, tiny: LoadedModel, path: str, data: bytes
) -> None:
    client = await aiohttp_client(
        create_app(Settings(model="test", max_body_bytes=1 << 21), make_engine(tiny))
    )
    response = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["message"].startswith("the body is not valid JSON")
    ok = await client.post("/predict", json={"prompt": "hi", "max_new_tokens": 2})
    assert ok.status == 200


# ---------------------------------------------------------------- clients that stall mid-body


async def test_half_sent_bodies_get_408_within_the_read_timeout_and_others_are_served(
    tiny: LoadedModel,
) -> None:
    settings = Settings(model="test", read_timeout=1.0, ping_interval=30.0)
    head = b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    stalls = [head + b"Content-Length: 1000\r\n\r\n" + b'{"prompt":'] * 199
    stalls.append(head + b"Transfer-Encoding: chunked\r\n\r\n40\r\n" + b'{"prompt":')
    with captured_logs("json", []) as log:
        async with (
            serving(create_app(settings, make_engine(tiny))) as address,
            aiohttp.ClientSession() as session,
        ):
            host, port = address.split(":")
            connections = [await asyncio.open_connection(host, int(port)) for _ in stalls]
            for (_, writer), data in zip(connections, stalls, strict=True):
                writer.write(data)
            sent = time.monotonic()
            body = {"prompt": "The baker", "max_new_tokens": 3}
            async with session.post(f"http://{address}/predict", json=body) as normal:
                assert normal.status == 200
            assert time.monotonic() - sent < 1.0, "the normal request waited for the stalled ones"
            answers = await asyncio.gather(*(reader.read(64) for reader, _ in connections))
            answered = time.monotonic() - sent
            for _, writer in connections:
                writer.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") or a == b"" for a in answers)
    assert sum(a.startswith(b"HTTP/1.1 408 ") for a in answers) >= 190
    assert answered < 1.0 + 1.5
    assert '"level": "error"' not in log.getvalue()
