"""systemd's sd_notify protocol with the standard library: tell the service manager that the server is
ready, still alive, what it is doing, and that it is stopping.

The protocol is one datagram of newline-separated VAR=value assignments sent to the AF_UNIX socket named
by $NOTIFY_SOCKET. Outside systemd (a terminal, a container, the tests) that variable is unset and every
method here does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Mapping

# sendto on a datagram socket blocks while the manager's receive queue is full; bound the wait so a stalled
# systemd cannot hang the event loop or the engine thread. A message that times out is dropped.
SEND_TIMEOUT_S = 1.0


class Notifier:
    """Sends sd_notify messages; never raises on a send error, since a missing or restarting systemd must
    not take the server down. Safe to share between threads."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self._address = address or ""
        # Without a socket the watchdog cannot be fed, so callers should not schedule heartbeats.
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.settimeout(SEND_TIMEOUT_S)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """A notifier for $NOTIFY_SOCKET, with the watchdog from $WATCHDOG_USEC when it is meant for us."""
        return cls(_socket_address(environ.get("NOTIFY_SOCKET", "")), _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog() calls: half the timeout, as systemd recommends, so one late
        heartbeat does not get the service killed. None when no watchdog is configured."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def send(self, *assignments: str) -> None:
        """Send VAR=value assignments in one datagram."""
        if self._sock is None:
            return
        message = "\n".join(assignments).encode()
        with self._lock:
            # Checked again under the lock: close() may have run meanwhile, and its fd number reused.
            if self._sock is None:
                return
            with contextlib.suppress(OSError):
                self._sock.sendto(message, self._address)

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        # A newline would start a new assignment, so text (which may quote a model name or an error)
        # could otherwise forge READY=1 or STOPPING=1.
        self.send("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _socket_address(value: str) -> str | None:
    if not value:
        return None
    # "@name" is systemd's spelling of a Linux abstract socket, whose address starts with a NUL byte.
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        # WATCHDOG_PID names the process the watchdog is for; a child that inherited it must not feed it.
        pid = environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec if usec > 0 else None
