"""HTTP worker processes: started and watched by the engine's process (`Workers`), each serving the
app on the shared listening socket (`worker_main`).

The engine's process binds the port, starts the workers, then loads the model; workers answer /health
and /ready (with what the server is doing) from the start. A worker that dies is replaced; the engine
aborts its requests at once. Workers ignore SIGINT and SIGTERM (systemd and a terminal's Ctrl-C send
them to every process): the engine's process drains, then tells them to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import generate_latest

import trickle
from trickle.api.common import ENGINE_KEY
from trickle.api.operations import HTTP_METRICS_KEY, HttpMetrics
from trickle.config import Settings
from trickle.generation.remote import (
    Link,
    MetricsQuery,
    MetricsText,
    Questions,
    Ready,
    Refusing,
    RemoteEngine,
    Responded,
    Shutdown,
    State,
    Step,
    WorkerLink,
    socket_pair,
)
from trickle.generation.resume import Cancelled, Evict, Reattached

if TYPE_CHECKING:
    from trickle.generation.host import EngineHost

log = structlog.get_logger("server")

# Connections the kernel queues for each worker to accept (a burst of clients at once, say).
LISTEN_BACKLOG = 1024
# How long a stopping worker may take to finish the responses it is writing, once told to stop.
STOP_GRACE_S = 10.0

# Run by `python -c` in a new process: import trickle from where this process found it (an installed
# package, or a checkout run as `python server.py`), then serve.
BOOT = (
    "import importlib.machinery, importlib.util, sys\n"
    "spec = importlib.machinery.ModuleSpec('trickle', None, is_package=True)\n"
    "spec.submodule_search_locations = [sys.argv[1]]\n"
    "sys.modules['trickle'] = importlib.util.module_from_spec(spec)\n"
    "from trickle.api.workers import worker_main\n"
    "sys.exit(worker_main(int(sys.argv[2])))\n"
)


# ---------------------------------------------------------------- the engine's process


@dataclass(frozen=True)
class Listening:
    """Worker -> host: the worker accepts connections."""


@dataclass(eq=False)
class Worker:
    process: subprocess.Popen[bytes]
    link: WorkerLink
    listening: asyncio.Event = field(default_factory=asyncio.Event)


class WorkerStartError(RuntimeError):
    """An HTTP worker process exited before it could listen (it will not do better a second time)."""


class Workers:
    """The HTTP worker processes of the engine's process, and what it tells them. A worker that dies
    after it listened is replaced; one that dies before is a failure of the server: `failure` says it
    and `on_failure` (the server's stop) is called."""

    def __init__(
        self,
        settings: Settings,
        listener: socket.socket,
        http_metrics: HttpMetrics,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings, self.listener, self.http_metrics = settings, listener, http_metrics
        self.on_failure = on_failure
        self.failure: WorkerStartError | None = None
        self.host: EngineHost | None = None
        self.state = State(doing="starting")
        self.stopping = False
        self._workers: list[Worker] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._serial = 0

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    async def start(self, count: int) -> None:
        for _ in range(count):
            await self._spawn()

    async def _spawn(self) -> None:
        mine, theirs = socket_pair()
        command = [sys.executable, "-c", BOOT, trickle.__path__[0], str(theirs.fileno())]
        process = subprocess.Popen(command, pass_fds=(theirs.fileno(),))
        theirs.close()
        self._serial += 1
        link = WorkerLink(await Link.open(mine), f"worker-{self._serial}")
        worker = Worker(process, link)
        self._workers.append(worker)
        link.link.send(Setup(self.settings, self.listener.family, self.listener.getsockname()))
        link.link.send(self.state)
        if self.host is not None:
            link.link.send(self.host.ready_message())
            self.host.workers.append(link)
            link.link.send(Step([], [], [], self.host.state()))
        log.info("worker started", worker=link.name, pid=process.pid)
        task = asyncio.create_task(self._serve(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def listening(self) -> None:
        """Until every worker accepts connections."""
        for worker in list(self._workers):
            await worker.listening.wait()

    def set_state(self, state: State) -> None:
        """What the server is doing, before the engine runs (for the workers' /ready)."""
        self.state = state
        for worker in self._workers:
            worker.link.link.send(state)

    def engine_ready(self, host: EngineHost) -> None:
        self.host = host
        ready = host.ready_message()
        for worker in self._workers:
            worker.link.link.send(ready)
            host.workers.append(worker.link)
        host.broadcast()

    async def _serve(self, worker: Worker) -> None:
        link = worker.link
        try:
            while True:
                message = await link.link.receive()
                if isinstance(message, Listening):
                    worker.listening.set()
                elif isinstance(message, Responded):
                    self.http_metrics.record(message.route, message.status)
                elif isinstance(message, MetricsQuery):
                    link.link.send(MetricsText(message.query, await self.metrics_text()))
                elif self.host is None:
                    continue
                elif isinstance(message, Refusing):
                    self.host.refusing(link)
                else:
                    self.host.take(link, message)
        except EOFError:
            pass
        listened = worker.listening.is_set()
        worker.listening.set()  # nobody waits for a worker that is gone
        link.link.close()
        if self.host is not None:
            with contextlib.suppress(ValueError):
                self.host.workers.remove(link)
            self.host.lost(link)
        self._workers.remove(worker)
        code = await asyncio.to_thread(worker.process.wait)
        if self.stopping:
            return
        if not listened:
            self.failure = WorkerStartError(
                f"an HTTP worker exited before it could listen (exit status {code})"
            )
            log.error("worker failed to start", worker=link.name, pid=worker.process.pid, code=code)
            self.on_failure()
            return
        log.warning("worker exited; starting another", worker=link.name, pid=worker.process.pid, code=code)
        await self._spawn()

    async def metrics_text(self) -> bytes:
        body = generate_latest(self.http_metrics.registry)
        if self.host is not None:
            body += await self.host.metrics_text()
        return body

    async def stop(self) -> None:
        """Tell every worker to stop once its responses are written; wait for them (killing stragglers).
        Workers that never served (a stop while the model loads) are killed at once."""
        self.stopping = True
        for worker in self._workers:
            worker.link.link.send(Shutdown())
        deadline = time.monotonic() + (STOP_GRACE_S if self.host is not None else 0.0)
        for worker in list(self._workers):
            try:
                await asyncio.to_thread(worker.process.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if self.host is not None:
                    log.warning("worker did not stop; killing it", pid=worker.process.pid)
                worker.process.kill()
                await asyncio.to_thread(worker.process.wait)
            log.debug("worker stopped", pid=worker.process.pid)
        for task in list(self._tasks):
            task.cancel()


# ---------------------------------------------------------------- a worker's process


class ForwardedHttpMetrics(HttpMetrics):
    """A worker's HTTP metrics: each response is counted in the engine's process, which answers
    /metrics for the whole server."""

    def __init__(self, link: Link, questions: Questions) -> None:
        super().__init__()
        self.link, self.questions = link, questions

    def record(self, route: str, status: int) -> None:
        self.link.send(Responded(route, status))

    async def text(self, engine: object) -> bytes:
        text: bytes = await self.questions.ask(MetricsQuery)
        return text


@dataclass(frozen=True)
class Setup:
    """Host -> worker, first: the settings, and the address to listen on beside the other workers."""

    settings: Settings
    family: int
    address: tuple[Any, ...]

    def listener(self) -> socket.socket:
        """This worker's own listening socket on the shared port (SO_REUSEPORT: the kernel spreads new
        connections over the workers evenly; a shared socket would let whichever worker wakes first take
        a whole burst)."""
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(self.address)
        sock.listen(LISTEN_BACKLOG)
        return sock


def worker_main(link_fd: int) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    asyncio.run(_serve_worker(socket.socket(fileno=link_fd)))
    # Its responses are written and its logs flushed: nothing is left that the interpreter's own
    # teardown (most of a second, with torch imported) would save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def _serve_worker(link_socket: socket.socket) -> None:
    from trickle.api.app import KEEPALIVE_TIMEOUT_S, create_app
    from trickle.api.logs import AccessLogger, configure_logging

    link = await Link.open(link_socket)
    setup: Setup = await link.receive()
    settings = setup.settings
    listener = setup.listener()
    configure_logging(settings.log_level, settings.log_format, secrets=settings.all_api_keys())
    structlog.contextvars.bind_contextvars(worker=os.getpid())
    questions = Questions(link)
    app = create_app(settings)
    app[HTTP_METRICS_KEY] = ForwardedHttpMetrics(link, questions)
    slot = app[ENGINE_KEY]
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log_class=AccessLogger, keepalive_timeout=KEEPALIVE_TIMEOUT_S
    )
    await runner.setup()
    await web.SockSite(runner, listener).start()
    link.send(Listening())
    gc.collect()
    gc.freeze()
    engine: RemoteEngine | None = None
    state = State()
    try:
        while True:
            message = await link.receive()
            if isinstance(message, Step):
                if engine is not None:
                    engine.step(message)
            elif isinstance(message, State):
                state = message
                slot.doing = message.doing or slot.doing
            elif isinstance(message, Ready):
                engine = RemoteEngine(link, message, state, questions)
                slot.engine = engine
            elif isinstance(message, MetricsText):
                questions.answer(message.query, message.text)
            elif isinstance(message, Cancelled):
                questions.answer(message.query, message.found)
            elif isinstance(message, Reattached):
                if engine is not None:
                    engine.reattached(message)
            elif isinstance(message, Evict):
                if engine is not None:
                    engine.streams.evict(message.request_id, message.reader)
            elif isinstance(message, Shutdown):
                break
    except EOFError:
        log.warning("the engine's process is gone")
        if engine is not None:
            engine.disconnected()
        questions.disconnected()
    if engine is not None:  # the app's cleanup stops an engine of its own process, not this one
        slot.engine = None
        await engine.stop()
    await runner.cleanup()
    link.close()
