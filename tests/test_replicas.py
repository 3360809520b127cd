"""scripts/serve-replicas: three demo replicas behind Debian's nginx (deploy/nginx/trickle.conf), on
loopback. Streams pass through token by token; a rolling restart under a locust load loses no request and
cuts no stream; a replica killed outright fails only the streams it held, and the rest go on."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT
from tests.test_locust import free_port, run_locust, stats_entry

SCRIPT = ROOT / "scripts" / "serve-replicas"


def nginx_or_skip() -> None:
    found = subprocess.run(["bash", str(ROOT / "scripts" / "install-nginx")], capture_output=True, text=True)
    if found.returncode != 0:
        if os.environ.get("TRICKLE_REQUIRE_NGINX"):
            pytest.fail(f"nginx is required here: {found.stderr}")
        pytest.skip(f"no nginx: {found.stderr.strip()}")


@dataclass
class Served:
    url: str
    process: subprocess.Popen[str]
    replicas: list[int]
    pids: list[int]
    """Each replica's process now (the script starts one again when it exits)."""
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)

    def wait_for(self, event: str, timeout: float = 120) -> dict[str, Any]:
        """The script's next log line naming `event` (earlier lines are passed over)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if line.get("event") == event:
                return line


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    nginx_or_skip()
    port = free_port()
    command = [sys.executable, str(SCRIPT), "--replicas", "3", "--port", str(port), "--drain-timeout", "30"]
    command += ["--", "--model", "demo", "--workers", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as process:
        assert process.stdout is not None
        events: queue.Queue[dict[str, Any]] = queue.Queue()

        pids: list[int] = []

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                event = json.loads(line)
                if event["event"] == "replica started" and event["start"] > 1:
                    pids[event["replica"]] = event["pid"]  # started again: the replica's pid now
                elif event["event"] == "serving":
                    pids.extend(event["pids"])
                events.put(event)

        threading.Thread(target=read, daemon=True).start()
        try:
            while (line := events.get(timeout=180)).get("event") != "serving":
                pass
            yield Served(f"http://127.0.0.1:{port}", process, line["replicas"], pids, events)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=90) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def running(port: int) -> int:
    """Requests a replica runs now, as its /ready says (0 while it cannot answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
            return int(json.load(response).get("running", 0))
    except (OSError, ValueError):
        return 0


async def read_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One /stream: when each event came, and whether it ended with `end` or was cut."""
    started, times, ended = time.perf_counter(), [], False
    try:
        async with session.post(f"{url}/stream", json=body) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.startswith(b"data:"):
                    times.append(time.perf_counter() - started)
                ended = ended or line.strip() == b"event: end"
    except aiohttp.ClientPayloadError:
        pass  # the connection was cut mid-stream
    return {"times": times, "ended": ended}


async def test_streams_through_nginx_arrive_token_by_token(served: Served) -> None:
    body = {"prompt": "Once upon a time", "max_new_tokens": 300, "min_new_tokens": 300}
    async with aiohttp.ClientSession() as session:
        stream = await read_stream(session, served.url, body)
    times = stream["times"]
    assert stream["ended"] and len(times) > 200  # an event a token that completes text, and the end
    # Buffered, every event would come at once at the end; streamed, the first comes long before.
    assert times[0] < 0.25 * times[-1], (times[0], times[-1])


def test_a_rolling_restart_under_load_fails_no_request_and_cuts_no_stream(
    served: Served, tmp_path: Path
) -> None:
    """SIGHUP: each replica in turn drains (503 to new requests, which nginx sends to another) and is
    started again once it has exited. A bounded locust load runs throughout; every stream must end
    with `end`."""
    done = threading.Event()

    def restart() -> None:
        while not sum(running(port) for port in served.replicas):  # under load first
            time.sleep(0.05)
        served.process.send_signal(signal.SIGHUP)
        served.wait_for("rolling restart done", timeout=150)
        done.set()

    restarter = threading.Thread(target=restart)
    restarter.start()
    result = run_locust(served.url, tmp_path, "40s", "--stop-timeout", "10")
    restarter.join()
    output = result.stdout + result.stderr
    assert done.is_set(), "the rolling restart did not finish within the load"
    assert result.returncode == 0, output
    stream = stats_entry(tmp_path, "POST", "/stream")
    assert stream["num_requests"] > 20 and stream["num_failures"] == 0, output


async def test_a_killed_replica_fails_only_its_streams_and_new_requests_succeed(served: Served) -> None:
    body = {"prompt": "Once upon a time", "max_new_tokens": 1500, "min_new_tokens": 1500}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        streams = [asyncio.create_task(read_stream(session, served.url, body)) for _ in range(6)]
        # Once the replicas run all six (least connections spreads them), one is killed.
        while sum(await asyncio.gather(*(asyncio.to_thread(running, p) for p in served.replicas))) < 6:
            assert not any(task.done() for task in streams)
            await asyncio.sleep(0.02)
        victim_pid = served.pids[0]
        held = await asyncio.to_thread(running, served.replicas[0])
        assert held > 0
        os.kill(victim_pid, signal.SIGKILL)
        results = await asyncio.gather(*streams)  # none hangs: each ends or is cut
        cut = [result for result in results if not result["ended"]]
        assert len(cut) == held, results
        for _ in range(5):
            async with session.post(f"{served.url}/predict", json={"prompt": "Hi", "max_new_tokens": 4}) as r:
                assert r.status == 200, await r.text()
    exited = served.wait_for("replica exited")
    assert exited["pid"] == victim_pid and exited["code"] == -signal.SIGKILL
    served.wait_for("replica started")  # and the script starts it again


def test_data_parallel_starts_one_replica_per_visible_gpu_each_seeing_only_its_own() -> None:
    """CUDA_VISIBLE_DEVICES=3,5: two replicas, with 3 and 5 (the demo model runs on the CPU either way);
    no visible GPU, or a replica count that is not one a GPU, is refused before anything starts."""
    nginx_or_skip()
    command = [sys.executable, str(SCRIPT), "--data-parallel", "--port", str(free_port())]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}
    server_flags = ["--", "--model", "demo", "--workers", "0"]
    with subprocess.Popen(
        command + server_flags, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as process:
        assert process.stdout is not None
        try:
            started = []
            for line in process.stdout:
                event = json.loads(line)
                started += [event] if event["event"] == "replica started" else []
                if event["event"] == "serving":
                    break
            assert [event["gpu"] for event in started] == ["3", "5"]
            for event in started:
                environ = Path(f"/proc/{event['pid']}/environ").read_bytes().split(b"\0")
                assert f"CUDA_VISIBLE_DEVICES={event['gpu']}".encode() in environ
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
    for variables, extra in (({"CUDA_VISIBLE_DEVICES": ""}, []), ({}, ["--replicas", "3"])):
        refused = subprocess.run(
            command + extra + server_flags,
            env={**env, **variables},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 2 and "--data-parallel" in refused.stderr, refused.stderr
