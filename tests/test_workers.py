"""HTTP worker processes: the server as it runs by default, the engine in one process and the HTTP side in
others, sharing the port. Which worker holds a connection is read from /proc (Linux)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_hostile import AUTH, KEY, MALFORMED, OTHER_KEY, PROMPT, WRONG_KEY
from tests.test_process import json_lines, serving
from trickle.generation import EngineConfig, LoadedModel, SamplingParams
from trickle.generation.host import EngineHost
from trickle.generation.remote import Link, Step, WorkerLink, socket_pair
from trickle.generation.streams import new_request

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")


def worker_pids(process: subprocess.Popen[str]) -> list[int]:
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def holder(connection: http.client.HTTPConnection, pids: list[int]) -> int:
    """The worker process whose socket is the server's end of `connection`."""
    assert connection.sock is not None
    client_port = connection.sock.getsockname()[1]
    server_port = connection.sock.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if local == server_port and remote == client_port:
            inode = fields[9]
    assert inode is not None
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(FileNotFoundError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    raise AssertionError("no worker holds the connection")


def connect(url: str) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    connection.connect()
    OPENED.append(connection)
    return connection


def connections_on_each(url: str, pids: list[int], tries: int = 40) -> dict[int, http.client.HTTPConnection]:
    """One open connection held by each worker (new connections go to whichever worker accepts first)."""
    held: dict[int, http.client.HTTPConnection] = {}
    for _ in range(tries):
        connection = connect(url)
        connection.request("GET", "/health")  # accepted once a request has been answered on it
        connection.getresponse().read()
        pid = holder(connection, pids)
        if pid in held:
            connection.close()
        else:
            held[pid] = connection
        if len(held) == len(pids):
            return held
    raise AssertionError(f"after {tries} connections, workers {set(pids) - set(held)} held none")


def start_stream(connection: http.client.HTTPConnection, tokens: int) -> http.client.HTTPResponse:
    body = {"prompt": "The baker", "max_new_tokens": tokens, "min_new_tokens": tokens, "seed": 1}
    connection.request("POST", "/stream", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    return response


def read_events(response: http.client.HTTPResponse) -> tuple[list[str], dict[str, Any] | None]:
    """The text events and the end event's data of an SSE response, read to its end."""
    texts, end, event = [], None, "message"
    for raw in response:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if event == "end":
                end = data
            elif event == "message":
                texts.append(data["text"])
            event = "message"
    return texts, end


OPENED: list[http.client.HTTPConnection] = []


@pytest.fixture
def two_workers(model_dir: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with serving(model_dir, env={"TRICKLE_WORKERS": "2"}) as served:
        yield served
    for connection in OPENED:
        connection.close()
    OPENED.clear()


def test_a_killed_worker_cuts_only_its_streams_and_the_server_keeps_serving(
    two_workers: tuple[str, subprocess.Popen[str]],
) -> None:
    url, process = two_workers
    pids = worker_pids(process)
    assert len(pids) == 2
    held = connections_on_each(url, pids)
    doomed, survivor = pids
    streams = {pid: start_stream(connection, 200) for pid, connection in held.items()}
    for response in streams.values():  # both are generating
        assert response.readline().startswith(b"id: ")
    os.kill(doomed, signal.SIGKILL)

    texts, end = read_events(streams[survivor])
    assert end is not None and end["finish_reason"] == "length" and end["usage"]["completion_tokens"] == 200
    _, cut = read_events(streams[doomed])  # cut: the connection closes with no end event
    assert cut is None

    # New requests are served (by the survivor, then by the replacement too).
    for _ in range(3):
        connection = connect(url)
        texts, end = read_events(start_stream(connection, 4))
        assert end is not None and end["finish_reason"] == "length" and len("".join(texts)) > 0
        connection.close()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0
    records = json_lines(err)
    lost = [rec for rec in records if rec["event"] == "worker lost with requests in progress"]
    assert [rec["aborted"] for rec in lost] == [1]
    assert any(rec["event"] == "worker exited; starting another" and rec["pid"] == doomed for rec in records)
    cancelled = [rec for rec in records if rec.get("finish_reason") == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["completion_tokens"] < 200


def test_metrics_count_every_workers_responses_and_workers_never_load_torch(
    two_workers: tuple[str, subprocess.Popen[str]],
) -> None:
    url, process = two_workers
    pids = worker_pids(process)
    assert "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()
    for pid in pids:  # a worker serves HTTP; its memory holds no torch (some hundreds of MB each)
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
    held = connections_on_each(url, pids)  # a /health on each worker's connection, plus the extras
    for connection in held.values():
        for _ in range(3):
            connection.request("GET", "/ready")
            assert connection.getresponse().read()
    first = next(iter(held.values()))
    first.request("GET", "/metrics")
    text = first.getresponse().read().decode()
    ready = [
        line for line in text.splitlines() if line.startswith('trickle:http_responses_total{route="/ready"')
    ]
    assert ready == ['trickle:http_responses_total{route="/ready",status="200"} 6.0']
    assert "trickle:num_requests_running" in text  # and the engine's, from its process


def test_sigterm_drains_streams_on_every_worker_then_all_processes_exit(
    two_workers: tuple[str, subprocess.Popen[str]],
) -> None:
    url, process = two_workers
    pids = worker_pids(process)
    held = connections_on_each(url, pids)
    streams = [start_stream(connection, 60) for connection in held.values()]
    for response in streams:
        assert response.readline().startswith(b"id: ")
    process.send_signal(signal.SIGTERM)
    for response in streams:
        _, end = read_events(response)
        assert (
            end is not None and end["finish_reason"] == "length" and end["usage"]["completion_tokens"] == 60
        )
    process.wait(timeout=60)
    assert process.returncode == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


async def test_the_engine_frees_a_lost_workers_rows_at_its_next_step(tiny: LoadedModel) -> None:
    config = EngineConfig(max_batch_size=4, max_seq_len=512, prefill_token_budget=512)
    host = EngineHost(tiny.model, tiny.tokenizer, config)
    await host.start()
    mine, theirs = socket_pair()
    link = WorkerLink(await Link.open(mine), "w")
    other_end = await Link.open(theirs)
    host.workers.append(link)
    try:
        params = SamplingParams(max_new_tokens=300, min_new_tokens=300, temperature=0.0)
        for _ in range(3):
            host.take(link, new_request(tiny.tokenizer.encode("The baker"), params, 60.0, ""))
        await host.wait_until(lambda h: h.num_running == 3 and h.steps > 2)
        step = await other_end.receive()
        assert isinstance(step, Step)
        host.workers.remove(link)
        host.lost(link)
        lost_at = host.steps
        await host.wait_until(lambda h: h.num_running == 0)
        assert host.steps <= lost_at + 2  # the abort is read at the next turn; the step in flight ends
        assert host.live == 0 and host.engine.scheduler.num_running == 0
    finally:
        await host.stop()
        other_end.close()
        link.link.close()


def test_hostile_requests_to_the_workers_leave_no_key_or_prompt_in_any_process_log(model_dir: Path) -> None:
    env = {
        "TRICKLE_WORKERS": "2", "TRICKLE_API_KEYS": f"{KEY},{OTHER_KEY}", "TRICKLE_READ_TIMEOUT": "0.5",
        "TRICKLE_LOG_FORMAT": "json", "TRICKLE_LOG_LEVEL": "debug",
    }  # fmt: skip
    with serving(model_dir, env=env) as (url, process):
        address = url.removeprefix("http://")
        host, port = address.split(":")
        for data in MALFORMED:  # over fresh connections, so both workers get some
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(data)
                assert sock.recv(64).startswith(b"HTTP/1.")
        half = b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
        half += (
            b'\r\nContent-Type: application/json\r\nContent-Length: 900\r\n\r\n{"prompt": "' + PROMPT.encode()
        )
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(half)
            assert sock.recv(64).startswith(b"HTTP/1.1 408 ")
        body = json.dumps({"prompt": PROMPT, "max_new_tokens": 4})
        for headers in [{"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": WRONG_KEY}, {}, AUTH]:
            connection = connect(url)
            connection.request("POST", "/predict", body, {"Content-Type": "application/json", **headers})
            assert connection.getresponse().status == (200 if headers == AUTH else 401)
        for raw in [b"{oops " + PROMPT.encode(), b'{"seed": ' + b"9" * 5000 + b"}"]:
            connection = connect(url)
            connection.request("POST", "/stream", raw, {"Content-Type": "application/json", **AUTH})
            assert connection.getresponse().status == 400
        for opened in OPENED:
            opened.close()
        OPENED.clear()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "client protocol error" in err and '"status": 408' in err  # the battery reached the logs
    access = [rec for rec in json_lines(err) if rec["logger"] == "aiohttp.access"]
    assert access and all(isinstance(rec["worker"], int) for rec in access)  # each names its worker
    for secret in [KEY, OTHER_KEY, WRONG_KEY, "Bearer", PROMPT, PROMPT[:12], "saffron"]:
        assert secret not in err
