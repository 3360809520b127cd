"""notify.Notifier against a fake systemd: a datagram socket bound where NOTIFY_SOCKET points."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from trickle import notify
from trickle.notify import Notifier


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths hold about 107 bytes, and pytest's tmp_path can be longer than that.
    directory = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory)


def listen(address: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    # A unix datagram is queued on the listener before sendto returns, so nothing needs waiting for.
    listener.setblocking(False)
    return listener


def received(listener: socket.socket) -> list[str]:
    """Every datagram waiting on the listener, so a test sees extra or missing messages too."""
    messages = []
    try:
        while True:
            messages.append(listener.recv(4096).decode())
    except BlockingIOError:
        return messages


@pytest.fixture
def listener(short_dir: Path) -> Iterator[socket.socket]:
    with listen(str(short_dir / "notify")) as sock:
        yield sock


@pytest.fixture
def notifier(listener: socket.socket) -> Iterator[Notifier]:
    sender = Notifier.from_environment({"NOTIFY_SOCKET": listener.getsockname()})
    yield sender
    sender.close()


def test_each_method_sends_its_assignment(listener: socket.socket, notifier: Notifier) -> None:
    assert notifier.enabled
    notifier.status("loading weights 3/7")
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    assert received(listener) == ["STATUS=loading weights 3/7", "READY=1", "WATCHDOG=1", "STOPPING=1"]


def test_send_joins_assignments_in_one_datagram(listener: socket.socket, notifier: Notifier) -> None:
    notifier.send("READY=1", "STATUS=serving", "MAINPID=42")
    assert received(listener) == ["READY=1\nSTATUS=serving\nMAINPID=42"]


def test_status_cannot_inject_assignments(listener: socket.socket, notifier: Notifier) -> None:
    notifier.status("model x\nREADY=1")
    assert received(listener) == ["STATUS=model x READY=1"]


def test_abstract_socket_name() -> None:
    name = f"trickle-test-{uuid.uuid4().hex}"
    with listen("\0" + name) as listener:
        sender = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        sender.ready()
        sender.close()
        assert received(listener) == ["READY=1"]


def test_reads_os_environ_by_default(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    sender = Notifier.from_environment()
    sender.ready()
    sender.close()
    assert received(listener) == ["READY=1"]


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "4000000"}])
def test_without_notify_socket_nothing_happens(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_socket(*args: object) -> None:
        raise AssertionError("a disabled notifier opened a socket")

    monkeypatch.setattr(notify.socket, "socket", no_socket)
    sender = Notifier.from_environment(environ)
    assert not sender.enabled
    assert sender.watchdog_interval is None
    sender.ready()
    sender.status("idle")
    sender.watchdog()
    sender.stopping()
    sender.send("READY=1")
    sender.close()


@pytest.mark.parametrize(
    ("watchdog_env", "interval"),
    [
        ({"WATCHDOG_USEC": "4000000"}, 2.0),
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    listener: socket.socket, watchdog_env: dict[str, str], interval: float | None
) -> None:
    sender = Notifier.from_environment({"NOTIFY_SOCKET": listener.getsockname(), **watchdog_env})
    assert sender.watchdog_interval == interval
    sender.close()


def test_a_vanished_listener_does_not_raise(short_dir: Path) -> None:
    path = short_dir / "notify"
    sender = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
    with listen(str(path)):
        pass
    path.unlink()
    sender.ready()  # FileNotFoundError inside
    with listen(str(path)) as stale:
        stale.close()
        sender.status("still here")  # ConnectionRefusedError inside: the path exists, nobody reads it
    # The failures did not break the notifier: a systemd that comes back gets the next message.
    path.unlink()
    with listen(str(path)) as listener:
        sender.watchdog()
        assert received(listener) == ["WATCHDOG=1"]
    sender.close()


def test_abstract_listener_gone_does_not_raise() -> None:
    sender = Notifier.from_environment({"NOTIFY_SOCKET": f"@trickle-test-{uuid.uuid4().hex}"})
    sender.ready()  # ConnectionRefusedError inside: no such abstract name
    assert sender.enabled
    sender.close()


def test_close_stops_sending(listener: socket.socket, notifier: Notifier) -> None:
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    notifier.ready()
    assert received(listener) == []
