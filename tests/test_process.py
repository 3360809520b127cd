"""The real program: `python server.py` and the `trickle` console script, as a user starts them."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.conftest import ROOT
from trickle.api.logs import configure_logging


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_model_that_cannot_load_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = run_cli("--model", str(tmp_path / "missing"), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trickle: ") and "missing" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_bad_setting_is_one_line_naming_it_and_exit_2() -> None:
    result = run_cli("--model", "demo", env={"TRICKLE_MAX_BATCH_SIZE": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trickle: invalid setting 'max_batch_size': Input should be greater than or equal to 1 (got '0')"
    ]


# pip puts the console script beside the interpreter it installed the package for.
SCRIPT = Path(sys.executable).parent / "trickle"


@pytest.mark.skipif(not SCRIPT.exists(), reason="the package is not installed")
def test_console_script_runs_the_same_main() -> None:
    result = subprocess.run([str(SCRIPT), "--port", "70000"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "'port'" in result.stderr


PROGRAM = [sys.executable, str(ROOT / "server.py")]


def serve_command(model_dir: Path, port: int, program: list[str] = PROGRAM) -> list[str]:
    return [*program, "--model", str(model_dir), "--port", str(port), "--device", "cpu"]


@contextlib.contextmanager
def serving(
    model_dir: Path, program: list[str] = PROGRAM, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`program` serving the model on a free port, from the moment it logs that it is ready (JSON logs,
    on a pipe): its URL and process, killed afterwards if it still runs."""
    port = free_port()
    process = subprocess.Popen(
        serve_command(model_dir, port, program),
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "TRICKLE_LOG_FORMAT": "auto", "TRICKLE_MAX_SEQ_LEN": "512", **(env or {})},
    )
    assert process.stderr is not None
    try:
        for line in process.stderr:  # the process says when it is ready; no polling
            if json.loads(line)["event"] == "ready":
                break
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()


@contextlib.contextmanager
def drained(model_dir: Path, env: dict[str, str], cwd: Path | None = None) -> Iterator[str]:
    """The real program serving the model (`serving`) with its log pipe read away: its URL."""
    with serving(model_dir, env=env, cwd=cwd) as (url, process):
        assert process.stderr is not None
        threading.Thread(target=drain_lines, args=(process.stderr,), daemon=True).start()
        yield url


def drain_lines(lines: Iterator[str]) -> None:
    """Read a served process's log pipe to its end, so a long run never blocks on a full pipe."""
    with contextlib.suppress(ValueError, OSError):  # the pipe is closed when the server is stopped
        for _ in lines:
            pass


@pytest.fixture
def server(model_dir: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with serving(model_dir) as served:
        yield served


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_served_process_streams_logs_json_with_request_ids_and_exits_0_on_sigint(
    server: tuple[str, subprocess.Popen[str]],
) -> None:
    url, process = server
    with urllib.request.urlopen(f"{url}/ready", timeout=10) as ready:
        assert ready.status == 200
    body = json.dumps({"prompt": "The baker", "max_new_tokens": 5, "min_new_tokens": 5}).encode()
    headers = {"X-Request-Id": "proc-1", "Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}/stream", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read().decode()
        assert response.status == 200 and "event: end" in raw
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0
    records = json_lines(err)
    mine = [rec for rec in records if rec.get("request_id") == "proc-1"]
    assert {rec["logger"] for rec in mine} >= {"generation.engine", "aiohttp.access"}
    access = next(rec for rec in mine if rec["logger"] == "aiohttp.access")
    assert access["status"] == 200 and access["path"] == "/stream"


def test_an_unreachable_hub_is_one_line_within_seconds_not_minutes_of_retries(tmp_path: Path) -> None:
    # An empty cache and a Hub endpoint that refuses connections: nothing local, nothing reachable.
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    started = time.perf_counter()
    result = run_cli("--port", str(free_port()), env=env)
    assert time.perf_counter() - started < 20
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "trickle: cannot load model 'tiiuae/falcon-7b-instruct': not found locally and the Hugging Face Hub"
        " cannot be reached (check the network, or pass a local directory)"
    ]


def test_a_port_in_use_is_one_line_and_exit_2_before_anything_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The demo model is not cached here: building it would take seconds and log; nothing may come
        # before the refusal.
        result = run_cli("--model", "demo", "--port", str(port), env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trickle: cannot listen on 127.0.0.1:{port}: ")
    assert not (tmp_path / "trickle").exists(), "the demo model was built before the port was bound"


def test_on_a_terminal_the_logs_are_readable_lines_not_json(model_dir: Path) -> None:
    import pty

    port = free_port()
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        serve_command(model_dir, port),
        stderr=follower,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "TRICKLE_LOG_FORMAT": "auto", "TRICKLE_MAX_SEQ_LEN": "512"},
    )
    os.close(follower)
    seen = b""
    try:
        while b"ready" not in seen:
            chunk = os.read(leader, 65536)
            assert chunk, "the server closed its terminal before it was ready"
            seen += chunk
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        os.close(leader)
    text = seen.decode(errors="replace")
    assert "listening" in text and '{"' not in text, "console lines, not JSON, on a terminal"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "bars"), [(_Terminal(), True), (io.StringIO(), False)], ids=["tty", "pipe"]
)
def test_download_and_loading_progress_bars_show_on_a_terminal_only(stream: io.StringIO, bars: bool) -> None:
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, structlog.get_config())
    try:
        configure_logging("info", "auto", stream)
        assert hf_logging.is_progress_bar_enabled() is bars
        assert hub_utils.are_progress_bars_disabled() is not bars
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.configure(**saved[2])
        hf_logging.disable_progress_bar()
