"""The engine served to HTTP worker processes: `EngineHost` (generation/host.py) in the engine's
process, `RemoteEngine` in each worker, one `Link` (a Unix socket pair) between them. Nothing here
imports torch: the workers import this module.

Per engine step, the host sends each worker one frame with the new tokens of that worker's requests and
the engine's load; the worker turns them into text (`Streams`) and writes its responses. Text work and
socket writes thus run in the workers' interpreters, never competing with the engine thread for its
process's interpreter lock. A worker sends requests, aborts (a client gone, a stop string found), its
HTTP responses' counts (for /metrics) and metrics queries. A worker that dies is noticed by its link's
end: its requests are aborted, their rows freed at the engine's next step.

Frames are a 4-byte length and a pickle: both ends are this program, on one machine, over a socket pair
no other process holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from transformers import PreTrainedTokenizerFast

from trickle.generation.errors import EngineUnavailableError, QueueFullError
from trickle.generation.messages import TokenLogprobs, TokenOutput
from trickle.generation.params import SamplingParams
from trickle.generation.prompts import Prompts
from trickle.generation.resume import Cancel, Reattach, Reattached
from trickle.generation.streams import RequestStream, Streams, new_request
from trickle.generation.structured import Grammars

log = structlog.get_logger("generation.remote")

HEADER = struct.Struct("!I")


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class State:
    """Host -> worker: what the engine's side is doing and its load, with every step's frame."""

    doing: str | None = "starting"
    """What the server does before it takes requests (loading, warming up); None once the engine runs."""
    unavailable: str | None = None
    """Why the engine refuses new requests (draining, its thread gone), or None."""
    running: int = 0
    waiting: int = 0
    live: int = 0
    """Requests the engine holds for all workers."""
    retry_after: int = 5


@dataclass(frozen=True)
class Ready:
    """Host -> worker, once: the engine runs. What a worker needs to serve requests of its own."""

    tokenizer: PreTrainedTokenizerFast
    max_seq_len: int
    request_timeout: float
    capacity: int


@dataclass(frozen=True)
class Step:
    """Host -> worker, one per engine step: this worker's requests' tokens, and the engine's state.
    Tokens that do not end a request come as two parallel lists (cheap to pickle); ends as outputs."""

    ids: list[str]
    tokens: list[int]
    ends: list[TokenOutput]
    state: State
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    """Of the tokens in `tokens`, those whose requests asked for log-probabilities."""


@dataclass(frozen=True)
class Responded:
    """Worker -> host: one HTTP response, counted in /metrics by its route pattern and status."""

    route: str
    status: int


@dataclass(frozen=True)
class Refusing:
    """Worker -> host, once: this worker refuses new requests from now on (it saw the engine's state
    turn unavailable). Every request it sent came before this on the link."""


@dataclass(frozen=True)
class MetricsQuery:
    """Worker -> host: the whole server's metrics, please (answered by a MetricsText of the same id)."""

    query: int


@dataclass(frozen=True)
class MetricsText:
    query: int
    text: bytes


@dataclass(frozen=True)
class Shutdown:
    """Host -> worker: stop listening and exit once the responses in progress are written."""


# ---------------------------------------------------------------- link


class Link:
    """One end of a host-worker socket pair, framed. `send` queues a frame without waiting."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Link:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: Any) -> None:
        if self.writer.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(HEADER.pack(len(data)) + data)

    async def receive(self) -> Any:
        """The next message; EOFError once the other end is gone."""
        try:
            header = await self.reader.readexactly(HEADER.size)
            return pickle.loads(await self.reader.readexactly(HEADER.unpack(header)[0]))
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            raise EOFError from err

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------- the engine's process


@dataclass(eq=False)
class WorkerLink:
    """The host's view of one worker: its link and the requests it holds."""

    link: Link
    name: str
    ids: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    ends: list[TokenOutput] = field(default_factory=list)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    refusing: bool = False
    """The worker has said it refuses new requests (a drain waits for every worker's word)."""


# ---------------------------------------------------------------- a worker's process


class RemoteEngine:
    """The engine as an HTTP worker sees it: the same calls as AsyncEngine's that the routes make, over
    the link to the engine's process."""

    def __init__(self, link: Link, ready: Ready, state: State, questions: Questions) -> None:
        self.prompts = Prompts(ready.tokenizer, ready.max_seq_len)
        self.grammars = Grammars(ready.tokenizer)  # to check requests' response formats
        self.grammars.prepare_in_background()
        self.request_timeout = ready.request_timeout
        self.capacity = ready.capacity
        self.state = state
        self.connected = True
        self.link = link
        self.streams = Streams(ready.tokenizer.backend_tokenizer, link.send)
        self._sent = 0  # requests sent since the last state (the host's count does not have them yet)
        self.questions = questions

    @property
    def num_running(self) -> int:
        return self.state.running

    @property
    def num_waiting(self) -> int:
        return self.state.waiting

    @property
    def unavailable(self) -> str | None:
        if not self.connected:
            return "the model is not ready"
        return self.state.unavailable

    def check_admissible(self, count: int = 1) -> None:
        if self.unavailable is not None:
            raise EngineUnavailableError(self.unavailable)
        if self.state.live + self._sent + count > self.capacity:
            raise QueueFullError(self.state.retry_after)

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        timeout: float | None = None,
        label: str = "",
        resumable: bool = False,
        credential: str = "",
    ) -> RequestStream:
        self.check_admissible()
        self._sent += 1
        timeout = self.request_timeout if timeout is None else timeout
        return self.streams.open(new_request(prompt_ids, params, timeout, label, resumable, credential))

    async def reattach(self, request_id: str, credential: str) -> RequestStream | str:
        """A kept request's stream from its first event, from the engine's process (any worker may serve
        a client that comes back), or why not: `missing`."""
        answer: RequestStream | str = await self.questions.ask(
            lambda number: Reattach(number, request_id, credential)
        )
        return answer

    async def cancel(self, request_id: str, credential: str) -> bool:
        """Cancel a kept request of this client's now, through the engine's process; whether there was
        one."""
        found: bool = await self.questions.ask(lambda number: Cancel(number, request_id, credential))
        return found

    def reattached(self, message: Reattached) -> None:
        """The host's answer, taken as the link delivers it: the stream is tracked before the step frames
        that follow carry its next tokens."""
        stream = self.streams.replay(message.kept) if message.kept is not None else message.refusal
        if not self.questions.answer(message.query, stream) and isinstance(stream, RequestStream):
            self.streams.release(stream.request_id, finished=False)  # its reader left: kept, unread

    def step(self, step: Step) -> None:
        if step.state.unavailable is not None and self.state.unavailable is None:
            self.link.send(Refusing())
        self.state, self._sent = step.state, 0
        self.streams.feed_tokens(step.ids, step.tokens, step.logprobs)
        self.streams.feed(step.ends)

    def disconnected(self) -> None:
        """The engine's process is gone: every live request ends with an error."""
        self.connected = False
        self.streams.end_all("error", "the engine stopped")

    async def stop(self) -> None:
        self.prompts.close()

    async def metrics_text(self) -> bytes:
        return b""


class Questions:
    """What a worker asks the engine's process over its link (the whole server's metrics, a kept stream,
    a cancel): each question carries a number, and its answer the same one."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._numbers = itertools.count()
        self._waiting: dict[int, asyncio.Future[Any]] = {}

    async def ask(self, question: Callable[[int], Any]) -> Any:
        """Send `question(number)` and wait for its answer (EngineUnavailableError if the engine's
        process goes first)."""
        number = next(self._numbers)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        self.link.send(question(number))
        try:
            return await answer
        finally:
            self._waiting.pop(number, None)

    def answer(self, number: int, value: Any) -> bool:
        """Give a question its answer; False where nobody waits for it any more."""
        answer = self._waiting.get(number)
        if answer is None or answer.done():
            return False
        answer.set_result(value)
        return True

    def disconnected(self) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(EngineUnavailableError("the engine's process is gone"))


def socket_pair() -> tuple[socket.socket, socket.socket]:
    host, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(OSError):
        for end in (host, worker):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return host, worker
