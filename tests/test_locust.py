"""bench/locustfile.py against a real `python server.py --model demo`, both as subprocesses: locust's gevent
monkey-patching must never reach the pytest process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_listening(line: str) -> bool:
    # Only the server's own log lines are JSON; a library may print plain text before them.
    return line.startswith("{") and json.loads(line).get("event") == "ready"


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    port = free_port()
    command = [sys.executable, str(ROOT / "server.py"), "--model", "demo", "--port", str(port)]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        # Keeps reading its logs once it listens: a full pipe would block the server mid-request.
        drain = threading.Thread(target=process.stderr.read, daemon=True)
        try:
            if not any(is_listening(line) for line in process.stderr):  # the server says when; no polling
                pytest.fail(f"server exited with {process.wait()} before listening")
            drain.start()
            yield f"http://127.0.0.1:{port}"
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:  # it failed to start or to stop: never leave it behind
                process.kill()
            if drain.is_alive():  # the pipe must not close under the thread still reading it
                drain.join()


def run_locust(host: str, tmp_path: Path, run_time: str, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        *(sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless"),
        *("-u", "4", "-r", "4", "-t", run_time, "--host", host, "--only-summary"),
        *("--max-new-tokens", "8,16", "--min-new-tokens", "8", "--prompt-words", "4,32"),
        # Unlike --csv, which is rewritten every few seconds, the JSON file is written once at the end.
        *("--json-file", str(tmp_path / "stats")),
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def stats_entry(tmp_path: Path, method: str, name: str) -> dict[str, Any]:
    entries = json.loads((tmp_path / "stats.json").read_text())
    return next(entry for entry in entries if (entry["method"], entry["name"]) == (method, name))


def test_a_healthy_run_records_stream_stats_and_passes_the_slo(host: str, tmp_path: Path) -> None:
    result = run_locust(host, tmp_path, "8s")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    stream = stats_entry(tmp_path, "POST", "/stream")
    assert stream["num_requests"] > 0 and stream["num_failures"] == 0, output
    for name in ("ttft", "inter_token", "ms_per_token"):
        assert stats_entry(tmp_path, "SSE", name)["num_requests"] > 0, name
    for percentile in ("p50", "p95", "p99"):
        assert f"TTFT {percentile}: " in result.stdout
    assert "SLO verdict: PASS" in result.stdout


def test_a_ttft_slo_no_run_can_meet_fails_the_exit_code(host: str, tmp_path: Path) -> None:
    result = run_locust(host, tmp_path, "4s", "--slo-ttft-p95-ms", "0.001")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "SLO verdict: FAIL: TTFT p95" in result.stdout, output
