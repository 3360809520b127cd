"""The server's process: `serve` (bind first, then load; signals, drain, sd_notify), with HTTP in this
process or in worker processes (`serve_with_workers`), and `run`, its entry. The app itself is
api/app.py."""

from __future__ import annotations

if __name__ == "__main__":
    # `python server.py` from a checkout: the checkout is the `trickle` package (installed, the same
    # modules are `trickle.*` by their place in site-packages). --help, --version and a bad setting are
    # answered before torch and transformers are imported (seconds); valid settings import this file
    # again, as `trickle.server`, to serve.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    checkout = importlib.machinery.ModuleSpec("trickle", None, is_package=True)
    checkout.submodule_search_locations = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules["trickle"] = importlib.util.module_from_spec(checkout)

    from trickle.config.cli import main

    sys.exit(main())

import asyncio
import contextlib
import gc
import resource
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import TypeVar, cast

import structlog
from aiohttp import web

from trickle.api.app import KEEPALIVE_TIMEOUT_S, create_app, start_engine
from trickle.api.common import ENGINE_KEY, SETTINGS_KEY
from trickle.api.logs import AccessLogger, configure_logging
from trickle.api.operations import HttpMetrics
from trickle.api.workers import Workers, WorkerStartError
from trickle.config import Settings
from trickle.generation import (
    AsyncEngine,
    EngineConfig,
    ModelLoadError,
    ModelRunError,
    check_source,
    load_model,
)
from trickle.generation.async_engine import EngineCore
from trickle.generation.engine import HEARTBEAT_S
from trickle.generation.engine_config import context_length
from trickle.generation.host import EngineHost
from trickle.generation.remote import State
from trickle.notify import Notifier

log = structlog.get_logger("server")

# Open files beside the clients' sockets: model shards, the tokenizer, the GPU driver's device nodes,
# idle keep-alive connections, logs.
FILES_RESERVE = 512
Built = TypeVar("Built")
Core = TypeVar("Core", bound=EngineCore)


def build_engine(settings: Settings, kind: type[Core] = AsyncEngine) -> Core:  # type: ignore[assignment]
    """Load the model named by the settings and wrap it in an (unstarted) engine: an AsyncEngine, which
    serves its requests in this process, or an EngineHost, which serves HTTP workers'."""
    loaded = load_model(
        settings.model, dtype=settings.dtype, device=settings.device, quantize=settings.quantize
    )
    config = EngineConfig.from_settings(settings, context_length(loaded.model.config))
    return kind(loaded.model, loaded.tokenizer, config)


async def _build_and_start(app: web.Application) -> None:
    settings, slot = app[SETTINGS_KEY], app[ENGINE_KEY]
    slot.doing = f"loading the model {settings.model}"
    engine = await _in_daemon_thread(build_engine, settings)
    slot.doing = "warming up the engine"
    await start_engine(app, engine)


def _in_daemon_thread(work: Callable[..., Built], *args: object) -> asyncio.Future[Built]:
    """`work(*args)` on a daemon thread: a process told to stop while a model loads exits without
    waiting for the load (a default executor's thread would be joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Built] = loop.create_future()

    def settle(result: Built | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(Built, result))

    def run() -> None:
        try:
            result: Built | None = work(*args)
            error: BaseException | None = None
        except BaseException as err:
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="trickle-load", daemon=True).start()
    return future


# ---------------------------------------------------------------- main


class BindError(OSError):
    """The server cannot listen where the settings say (a port in use, an address that is not this
    machine's)."""


def run(settings: Settings) -> int:
    """Bind, load the model, serve until interrupted. Errors a user can fix are one line on stderr:
    exit 2 for an address that cannot be bound (before any loading), 1 for a model that cannot load."""
    configure_logging(settings.log_level, settings.log_format, secrets=settings.all_api_keys())
    raise_open_files_limit(open_files_needed(settings))
    try:
        check_source(settings.model)  # seconds at most: a model that cannot be found fails before binding
        asyncio.run(serve(settings, None, Notifier.from_environment()))
    except BindError as err:
        print(f"trickle: {err}", file=sys.stderr)
        return 2
    except (ModelLoadError, ModelRunError, WorkerStartError) as err:
        print(f"trickle: {err}", file=sys.stderr)
        return 1
    return 0


def open_files_needed(settings: Settings) -> int:
    """File descriptors the server may hold at once: a socket for every request it admits (running and
    queued) and what the process keeps open besides."""
    return settings.max_batch_size + settings.max_queue + FILES_RESERVE


def raise_open_files_limit(needed: int) -> None:
    """Lift the soft limit on open files to the hard one (1,024 by default, which a burst of clients
    exhausts: then every new connection, /health's included, fails), and warn when even the hard limit
    is short of `needed` (systemd's LimitNOFILE= sets it; deploy/trickle.service does)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        log.warning("the open files limit is low for the queue and batch", limit=hard, needed=needed)


async def serve(
    settings: Settings, engine: AsyncEngine | None, notifier: Notifier, stop: asyncio.Event | None = None
) -> None:
    """Serve until `stop` is set (by default: until SIGTERM or SIGINT), then drain and shut down.

    Without an engine, the port is bound first and the model loads behind it (/health answers, /ready
    says what is being done); BindError when the port cannot be bound. systemd hears READY only once
    the engine is warmed up and the socket is bound, WATCHDOG while the engine thread keeps turning, and
    STOPPING when the drain begins.

    Without an engine and with `workers` (by default a quarter of the cores), HTTP is served by worker
    processes on the same port and this process runs the engine (`serve_with_workers`).
    """
    stop = stop or _stop_on_signals()
    if engine is None and settings.worker_count() > 0:
        await serve_with_workers(settings, notifier, stop)
        return
    notifier.status("starting")
    app = create_app(settings, engine)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log_class=AccessLogger, keepalive_timeout=KEEPALIVE_TIMEOUT_S
    )
    await runner.setup()
    try:
        await _listen(runner, settings)
        if engine is None and not await _loaded_unless_stopped(app, stop, notifier):
            log.info("stopped while loading")
            await runner.cleanup()
            notifier.close()
            return
    except BaseException:
        await runner.cleanup()
        raise
    engine = cast(AsyncEngine, app[ENGINE_KEY].engine)  # running: the startup above raised otherwise
    await _serve_until_stopped(engine, settings, notifier, stop, runner.addresses[0][:2])
    await runner.cleanup()
    notifier.close()


async def serve_with_workers(settings: Settings, notifier: Notifier, stop: asyncio.Event) -> None:
    """The engine in this process, HTTP in `settings.worker_count()` worker processes sharing the port
    bound here (api/workers.py). Same order and promises as `serve`: bind, load behind the bound port,
    READY, WATCHDOG while the engine thread turns, drain on `stop`."""
    notifier.status("starting")
    listener = _bind(settings)
    host, port = listener.getsockname()[:2]
    log.info("listening", url=f"http://{host}:{port}")
    workers = Workers(settings, listener, HttpMetrics(), on_failure=stop.set)
    try:
        await workers.start(settings.worker_count())
        engine = await _host_unless_stopped(settings, workers, stop, notifier)
        if engine is not None:
            await workers.listening()
    except BaseException:
        await workers.stop()
        listener.close()
        raise
    if engine is None:
        log.info("stopped while loading")
    else:
        await _serve_until_stopped(engine, settings, notifier, stop, (host, port), workers=workers.pids)
        gc.unfreeze()
        log.info("engine stopped")
    await workers.stop()
    listener.close()
    notifier.close()
    if workers.failure is not None:
        raise workers.failure


async def _serve_until_stopped(
    engine: EngineCore,
    settings: Settings,
    notifier: Notifier,
    stop: asyncio.Event,
    address: tuple[str, int],
    **ready: object,
) -> None:
    """READY, then WATCHDOG while the engine thread turns; once `stop` is set, STOPPING and the drain."""
    host, port = address
    log.info("ready", url=f"http://{host}:{port}", **ready)
    notifier.ready()
    notifier.status(f"serving {settings.model} on {host}:{port}")
    watchdog = asyncio.create_task(_feed_watchdog(engine, notifier))
    await stop.wait()
    notifier.stopping()
    await engine.refuse_new(settings.drain_timeout)  # every request that arrives from now on gets 503
    log.info("draining", timeout_s=settings.drain_timeout, live=engine.live)
    notifier.status("draining")
    await engine.drain(settings.drain_timeout)
    watchdog.cancel()


async def _unless_stopped(startup: asyncio.Task[Built], stop: asyncio.Event, notifier: Notifier) -> bool:
    """Whether `startup` finished (its error raised) before `stop` was set; if not, it is cancelled (a
    SIGTERM while a model downloads must not wait for the download)."""
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not startup.done():
        notifier.stopping()
        startup.cancel()
        return False
    startup.result()
    return True


async def _host_unless_stopped(
    settings: Settings, workers: Workers, stop: asyncio.Event, notifier: Notifier
) -> EngineHost | None:
    """Load the model and start the engine for the workers, or give up (None) when `stop` comes first.
    The model loads while the workers start; systemd hears `loading` once they answer /health."""

    async def build_and_start() -> EngineHost:
        workers.set_state(State(doing=f"loading the model {settings.model}"))
        building = _in_daemon_thread(build_engine, settings, EngineHost)
        await workers.listening()
        notifier.status(f"loading {settings.model}")
        engine = await building
        workers.set_state(State(doing="warming up the engine"))
        await engine.start()
        log.info("engine started", model=settings.model)
        gc.collect()
        gc.freeze()
        workers.engine_ready(engine)
        return engine

    startup = asyncio.create_task(build_and_start())
    return startup.result() if await _unless_stopped(startup, stop, notifier) else None


def _bind(settings: Settings) -> socket.socket:
    """The port the workers will share, held for them: bound with SO_REUSEPORT, never listening (the kernel
    spreads connections over the workers' own listening sockets on it). A plain bind first proves the
    port free: no other program (nor another trickle of this user) listens there."""
    try:
        with socket.create_server((settings.host, settings.port)) as probe:
            family, address = probe.family, probe.getsockname()
            probe.close()
            anchor = socket.socket(family, socket.SOCK_STREAM)
            anchor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            anchor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            anchor.bind(address)
            return anchor
    except OSError as err:
        reason = err.strerror or str(err)
        raise BindError(f"cannot listen on {settings.host}:{settings.port}: {reason}") from err


async def _loaded_unless_stopped(app: web.Application, stop: asyncio.Event, notifier: Notifier) -> bool:
    """Build and start the app's engine, or give up when `stop` is set first (a SIGTERM while a model
    downloads must not wait for the download). Load errors are raised."""
    settings, slot = app[SETTINGS_KEY], app[ENGINE_KEY]
    notifier.status(f"loading {settings.model}")
    slot.startup = asyncio.create_task(_build_and_start(app))
    return await _unless_stopped(slot.startup, stop, notifier)


async def _listen(runner: web.AppRunner, settings: Settings) -> None:
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as err:
        reason = err.strerror or str(err)
        raise BindError(f"cannot listen on {settings.host}:{settings.port}: {reason}") from err
    host, port = runner.addresses[0][:2]
    log.info("listening", url=f"http://{host}:{port}")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _feed_watchdog(engine: EngineCore, notifier: Notifier) -> None:
    interval = notifier.watchdog_interval
    if interval is None:
        return
    # Ping only while the engine thread turns its loop: a hung step stops the pings and systemd
    # restarts the service. An idle engine turns every HEARTBEAT_S.
    threshold = max(interval, 2 * HEARTBEAT_S)
    while True:
        if engine.alive_within(threshold):
            notifier.watchdog()
        await asyncio.sleep(interval)  # a timer: there is no event to wait for
