"""Why a request is refused before anything is streamed: the same in the engine's process and in an HTTP
worker (no torch here: workers import it)."""

from __future__ import annotations


class EngineUnavailableError(RuntimeError):
    """The engine thread is not running (not started yet, stopped, dead) or is draining."""


class QueueFullError(RuntimeError):
    """The waiting queue is full; `retry_after` is a hint in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is at capacity; retry in about {retry_after} s")
        self.retry_after = retry_after
