"""Running as a service: backpressure, deadlines, metrics, sd_notify, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ROOT, make_engine
from tests.sse import parse_events
from tests.test_process import free_port
from trickle import server
from trickle.config import Settings
from trickle.generation import AsyncEngine, LoadedModel, SamplingParams
from trickle.generation.async_engine import FinishRate
from trickle.notify import Notifier
from trickle.server import (
    ENGINE_KEY,
    build_engine,
    create_app,
    open_files_needed,
    raise_open_files_limit,
    serve,
)

ClientFactory = Callable[..., Awaitable[TestClient]]
LONG = {"prompt": "The baker", "max_new_tokens": 300, "min_new_tokens": 300}


async def test_a_full_queue_answers_503_with_retry_after_and_drops_nothing(
    aiohttp_client: ClientFactory, tiny: LoadedModel, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(settings, make_engine(tiny, max_batch_size=1, max_queue=1)))
    engine: AsyncEngine = client.server.app[ENGINE_KEY].engine
    accepted = [asyncio.create_task(client.post("/predict", json=LONG)) for _ in range(2)]
    await engine.wait_until(lambda e: e.num_running == 1 and e.num_waiting == 1)
    refused = await client.post("/stream", json=LONG)
    assert refused.status == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "capacity" in (await refused.json())["error"]["message"]
    for task in accepted:
        response = await task
        assert response.status == 200
        assert (await response.json())["usage"]["completion_tokens"] == 300
    assert (await client.post("/predict", json={"prompt": "a", "max_new_tokens": 2})).status == 200


async def collect(engine: AsyncEngine, name: str, params: SamplingParams, timeout: float) -> list[Any]:
    ids = engine.prompts.truncated("The baker", 64, params.max_new_tokens)
    return [out async for out in engine.generate(ids, params, timeout, label=name)]


async def test_a_deadline_ends_a_generating_request_with_timeout_and_frees_its_row(
    engine: AsyncEngine,
) -> None:
    params = SamplingParams(max_new_tokens=5000 // 10, min_new_tokens=5000 // 10)
    outputs = await collect(engine, "slow", params, timeout=0.2)
    assert outputs[-1].finish_reason == "timeout"
    assert 0 < outputs[-1].usage["completion_tokens"] < 500
    await engine.wait_until(lambda e: e.num_running == 0)


async def test_a_deadline_also_ends_a_request_still_in_the_queue(tiny: LoadedModel) -> None:
    engine = make_engine(tiny, max_batch_size=1)
    await engine.start()
    blocker = asyncio.create_task(
        collect(engine, "blocker", SamplingParams(max_new_tokens=400, min_new_tokens=400), 60)
    )
    await engine.wait_until(lambda e: e.num_running == 1)
    queued = await collect(engine, "queued", SamplingParams(max_new_tokens=5), timeout=0.05)
    assert queued[-1].finish_reason == "timeout"
    assert queued[-1].usage["completion_tokens"] == 0 and queued[-1].timings["queue_ms"] is None
    assert (await blocker)[-1].finish_reason == "length"
    await engine.stop()


def metric(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def test_metrics_move_with_the_requests_sent(
    aiohttp_client: ClientFactory, tiny: LoadedModel, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(settings, make_engine(tiny)))
    before = await (await client.get("/metrics")).text()
    assert metric(before, "trickle:time_to_first_token_seconds_count") == 0
    for n in (3, 5, 7):
        response = await client.post(
            "/stream", json={"prompt": "The baker", "max_new_tokens": n, "min_new_tokens": n}
        )
        await response.read()
    await client.post("/predict", json={"prompt": "The baker", "temperature": 11})
    text = await (await client.get("/metrics")).text()
    assert metric(text, "trickle:time_to_first_token_seconds_count") == 3
    assert metric(text, "trickle:e2e_request_latency_seconds_count") == 3
    assert metric(text, "trickle:generation_tokens_total") == 15
    assert metric(text, 'trickle:request_success_total{finished_reason="length"}') == 3
    # Each request's tokens after its first are inter-token intervals: (3-1) + (5-1) + (7-1).
    assert metric(text, "trickle:inter_token_latency_seconds_count") == 12
    assert metric(text, 'trickle:http_responses_total{route="/stream",status="200"}') == 3
    assert metric(text, 'trickle:http_responses_total{route="/predict",status="422"}') == 1
    assert metric(text, "trickle:num_requests_running") == 0
    # Each decoding step's interval, and the engine thread's own share of it (on the CPU the step runs
    # inline: the thread never waits for a device, and no GPU time is recorded).
    steps = metric(text, "trickle:engine_step_seconds_count")
    assert steps >= 12 and metric(text, "trickle:engine_step_host_seconds_count") == steps
    assert (
        0
        < metric(text, "trickle:engine_step_host_seconds_sum")
        <= metric(text, "trickle:engine_step_seconds_sum")
    )
    assert metric(text, "trickle:engine_decode_device_seconds_count") == 0
    # Of the host's work, the hand-over of each step's outputs to the event loop.
    assert metric(text, "trickle:engine_handoff_seconds_count") == steps
    assert (
        0
        < metric(text, "trickle:engine_handoff_seconds_sum")
        <= metric(text, "trickle:engine_step_host_seconds_sum")
    )
    assert "request_id" not in text


async def test_the_gateway_protocols_metric_names_move_with_the_load(
    aiohttp_client: ClientFactory, tiny: LoadedModel, settings: Settings
) -> None:
    """Load-aware gateways (the Inference Extension's endpoint picker) read queued requests and KV-cache
    use under vLLM's names: the same values as ours, scraped while two streams run and a third waits
    (two rows), then after all three have ended."""
    engine = make_engine(tiny, max_batch_size=2)
    client = await aiohttp_client(create_app(settings, engine))
    body = {"prompt": "The baker", "max_new_tokens": 200, "min_new_tokens": 200}
    streams = [await client.post("/stream", json=body) for _ in range(3)]

    async def scrape() -> dict[str, float]:
        text = await (await client.get("/metrics")).text()
        names = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"]
        values = {name: metric(text, f"trickle:{name}") for name in names}
        assert metric(text, "vllm:num_requests_running") == values["num_requests_running"]
        assert metric(text, "vllm:num_requests_waiting") == values["num_requests_waiting"]
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            assert metric(text, name) == values["kv_cache_usage_perc"]
        return values

    for stream in streams[:2]:
        await stream.content.readuntil(b"\n\n")  # its first event: it runs
    # The third reaches the engine's queue on its own time (its prompt is tokenized off the event loop);
    # the gauges move with the engine's report that counts it.
    await engine.wait_until(lambda e: e.num_waiting > 0)
    loaded = await scrape()
    assert loaded["num_requests_running"] == 2 and loaded["num_requests_waiting"] == 1
    assert loaded["kv_cache_usage_perc"] > 0
    for stream in streams:
        await stream.read()
    idle = await scrape()
    assert idle["num_requests_running"] == 0 and idle["num_requests_waiting"] == 0
    assert idle["kv_cache_usage_perc"] < loaded["kv_cache_usage_perc"]


# ---------------------------------------------------------------- sd_notify


class FakeSystemd:
    """A NOTIFY_SOCKET listener collecting what the server says."""

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(dir="/tmp"), "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    async def next(self) -> str:
        loop = asyncio.get_running_loop()
        return (await loop.sock_recv(self.sock, 4096)).decode()

    async def until(self, wanted: str) -> list[str]:
        seen = []
        while wanted not in seen:
            seen.append(await self.next())
        return seen


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    yield fake
    fake.sock.close()


async def test_sd_notify_ready_watchdog_stuck_engine_and_stopping(
    tiny: LoadedModel, settings: Settings, systemd: FakeSystemd
) -> None:
    notifier = Notifier(systemd.path, watchdog_usec=200_000)
    engine = make_engine(tiny)
    port = free_port()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings.model_copy(update={"port": port}), engine, notifier, stop))
    await systemd.until("READY=1")
    # READY means the socket is bound: a request right now is served.
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/ready") as response:
        assert response.status == 200
    assert await systemd.until("WATCHDOG=1")
    release = threading.Event()
    runner = engine.engine.runner
    real_step = runner.launch
    runner.launch = lambda batch, meanwhile=None: (release.wait(), real_step(batch, meanwhile))[1]  # type: ignore[method-assign]
    request = engine.generate(engine.prompts.truncated("a", 8, 2), SamplingParams(max_new_tokens=2))
    loop = asyncio.get_running_loop()
    stuck_at, pings = loop.time(), []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.5):
            while True:
                pings.append((loop.time() - stuck_at, await systemd.next()))
    # The engine thread is stuck in a step: pings stop once its heartbeat is older than the
    # threshold (1 s here), and none come in the second after.
    assert [t for t, message in pings if message == "WATCHDOG=1" and t > 1.4] == []
    release.set()
    async with contextlib.aclosing(request):
        assert [out async for out in request][-1].finish_reason == "length"
    await systemd.until("WATCHDOG=1")
    stop.set()
    await systemd.until("STOPPING=1")
    await server


# ---------------------------------------------------------------- SIGTERM


@pytest.fixture
async def process(model_dir: Path) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "server.py"), "--model", str(model_dir), "--port", str(port),
        "--drain-timeout", "3.0", "--max-seq-len", "4096",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TRICKLE_LOG_FORMAT": "json"},
    )  # fmt: skip
    assert proc.stderr is not None
    await wait_for_log(proc, "ready")
    yield f"http://127.0.0.1:{port}", proc
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def wait_for_log(proc: asyncio.subprocess.Process, event: str) -> None:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        if json.loads(line).get("event") == event:
            return
    raise AssertionError(f"the server exited before logging {event!r}")


async def read_stream(response: aiohttp.ClientResponse) -> list[Any]:
    return parse_events((await response.read()).decode())


async def test_sigterm_drains_running_streams_refuses_new_ones_and_exits_0(
    process: tuple[str, asyncio.subprocess.Process],
) -> None:
    url, proc = process
    async with aiohttp.ClientSession() as session:
        short = await session.post(
            f"{url}/stream", json={"prompt": "a", "max_new_tokens": 12, "min_new_tokens": 12}
        )
        long = await session.post(
            f"{url}/stream", json={"prompt": "a", "max_new_tokens": 3000, "min_new_tokens": 3000}
        )
        await short.content.readline()
        await long.content.readline()
        proc.send_signal(signal.SIGTERM)
        await wait_for_log(proc, "draining")
        refused = await session.post(f"{url}/stream", json={"prompt": "a"})
        assert refused.status == 503 and refused.headers["Retry-After"]
        assert (await session.get(f"{url}/ready")).status == 503
        short_events, long_events = await read_stream(short), await read_stream(long)
    assert short_events[-1].json()["finish_reason"] == "length"
    assert short_events[-1].json()["usage"]["completion_tokens"] == 12
    assert long_events[-1].event == "end" and long_events[-1].json()["finish_reason"] == "shutdown"
    assert await proc.wait() == 0


def test_service_settings_reach_the_engine(model_dir: Path) -> None:
    settings = Settings(
        model=str(model_dir),
        device="cpu",
        max_queue=3,
        request_timeout=7.5,
        max_batch_size=5,
        max_seq_len=1024,
        kv_cache_tokens=3000,
        prefix_cache=False,
    )
    engine = build_engine(settings)
    assert (engine.config.max_queue, engine.config.request_timeout) == (3, 7.5)
    assert engine.engine.runner.max_rows == 5
    scheduler = engine.engine.scheduler
    assert scheduler.kv_capacity == 2992 and not scheduler.pool.prefix_caching


async def test_sigterm_ends_the_drain_as_soon_as_the_last_stream_has_ended_ten_times_out_of_ten(
    tiny: LoadedModel, settings: Settings, systemd: FakeSystemd
) -> None:
    # An idle engine sends no step reports: drain once waited its whole timeout when the last stream's
    # release came after the last report (2 runs in 6). serve() here is the program's own, with its
    # SIGTERM handler on this loop, and the signal is real (a process per run would cost seconds each).
    loop = asyncio.get_running_loop()
    for _ in range(10):
        port = free_port()
        served = settings.model_copy(update={"port": port, "drain_timeout": 30.0})
        server = asyncio.create_task(serve(served, make_engine(tiny), Notifier(systemd.path)))
        await systemd.until("READY=1")
        body = {"prompt": "a", "max_new_tokens": 6, "min_new_tokens": 6}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/stream", json=body) as response:
                await response.content.readline()
                os.kill(os.getpid(), signal.SIGTERM)
                events = await read_stream(response)
            ended = loop.time()
        assert events[-1].json()["finish_reason"] == "length"
        await asyncio.wait_for(server, timeout=2.0)
        assert loop.time() - ended < 2.0


async def test_sigterm_with_one_short_stream_exits_within_2s_of_its_end(model_dir: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "server.py"), "--model", str(model_dir), "--port", str(port),
        "--drain-timeout", "30",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TRICKLE_LOG_FORMAT": "json"},
    )  # fmt: skip
    try:
        await wait_for_log(proc, "ready")
        body = {"prompt": "a", "max_new_tokens": 20, "min_new_tokens": 20}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/stream", json=body) as response:
                await response.content.readline()
                proc.send_signal(signal.SIGTERM)
                events = await read_stream(response)
            ended = asyncio.get_running_loop().time()
        assert events[-1].json()["finish_reason"] == "length"
        assert await asyncio.wait_for(proc.wait(), timeout=2.0) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert asyncio.get_running_loop().time() - ended < 2.0


def test_the_finish_rate_window_holds_only_its_last_window() -> None:
    now = [0.0]
    rate = FinishRate(window_s=30.0, clock=lambda: now[0])
    for i in range(2000):
        now[0] = i * 0.1  # one finish every 100 ms, for 200 s
        rate.record()
    assert len(rate) == 301  # 169.9 .. 199.9 s
    assert rate.per_second() == pytest.approx(301 / 30.0)
    now[0] += 31.0
    assert rate.per_second() == 0 and len(rate) == 0


async def test_after_2000_requests_the_engine_keeps_only_the_last_window_of_finishes(
    tiny: LoadedModel,
) -> None:
    engine = make_engine(tiny, max_queue=2000)
    ticks = itertools.count()
    engine.finish_rate = FinishRate(window_s=100.0, clock=lambda: float(next(ticks)))
    await engine.start()
    params = SamplingParams(max_new_tokens=1)
    ids = engine.prompts.truncated("a", 8, 1)

    async def one() -> None:
        async for _ in engine.generate(ids, params):
            pass

    await asyncio.gather(*(one() for _ in range(2000)))
    await engine.stop()
    assert len(engine.finish_rate) == 101  # one clock tick a finish: the last 100 ticks and the newest


def test_the_unit_allows_the_open_files_the_default_settings_need() -> None:
    unit = (ROOT / "deploy" / "trickle.service").read_text()
    limit = int(next(line for line in unit.splitlines() if line.startswith("LimitNOFILE=")).split("=")[1])
    assert limit >= open_files_needed(Settings())


def test_the_server_lifts_its_soft_open_files_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1024), hard))
    raise_open_files_limit(open_files_needed(Settings()))
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


@pytest.mark.parametrize(("asked", "served"), [(None, 8192), (300, 300), (100_000, 8192)])
def test_max_seq_len_defaults_to_the_models_context_and_is_cut_to_it(
    model_dir: Path, asked: int | None, served: int
) -> None:
    settings = Settings(model=str(model_dir), device="cpu", max_batch_size=2, max_seq_len=asked)
    assert build_engine(settings).config.max_seq_len == served


@pytest.fixture
def loaded(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The server's model load, held until the test sets the event (released at the end either way)."""
    event = threading.Event()

    def slow_load(*args: object, **kwargs: object) -> LoadedModel:
        event.wait(30)
        return tiny

    monkeypatch.setattr(server, "load_model", slow_load)
    yield event
    event.set()


# The engine's own process serving HTTP, and one HTTP worker process.
LAYOUTS = pytest.mark.parametrize("workers", [0, 1], ids=["in_process", "worker"])


@LAYOUTS
async def test_ready_says_what_it_is_doing_while_the_model_loads_behind_a_bound_port(
    loaded: threading.Event, settings: Settings, systemd: FakeSystemd, workers: int
) -> None:
    port, stop = free_port(), asyncio.Event()
    settings = settings.model_copy(update={"port": port, "workers": workers, "max_batch_size": 4})
    served = asyncio.create_task(serve(settings, None, Notifier(systemd.path), stop))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        assert await systemd.until("STATUS=loading test")
        async with session.get(f"{url}/health") as health:
            assert health.status == 200
        async with session.get(f"{url}/ready") as loading:
            assert loading.status == 503 and loading.headers["Retry-After"]
            assert (await loading.json())["error"]["message"] == "loading the model test"
        loaded.set()
        await systemd.until("READY=1")
        async with session.get(f"{url}/ready") as ready:
            assert ready.status == 200
    stop.set()
    await served


@LAYOUTS
async def test_a_stop_while_the_model_loads_ends_the_server_without_waiting_for_the_load(
    loaded: threading.Event, settings: Settings, systemd: FakeSystemd, workers: int
) -> None:
    stop = asyncio.Event()
    settings = settings.model_copy(update={"port": free_port(), "workers": workers})
    served = asyncio.create_task(serve(settings, None, Notifier(systemd.path), stop))
    seen = await systemd.until(f"STATUS=loading {settings.model}")
    stop.set()
    await asyncio.wait_for(served, timeout=2.0)
    seen += await systemd.until("STOPPING=1")
    assert "READY=1" not in seen
