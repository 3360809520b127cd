"""The aiohttp application: its middlewares (request id, metrics, errors, API keys) and `create_app`,
which adds every route of the dialects' tables. Served by the engine's process (`--workers 0`) or by
each HTTP worker; nothing here imports torch."""

from __future__ import annotations

import asyncio
import gc
import hmac
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from trickle.api import native, openai, openapi, operations, playground
from trickle.api.common import (
    API_KEYS_KEY,
    CREDENTIAL_KEY,
    ENGINE_KEY,
    REQUEST_ID_KEY,
    SETTINGS_KEY,
    ClientError,
    EngineSlot,
    Handler,
    json_error,
)
from trickle.api.operations import HTTP_METRICS_KEY, HttpMetrics
from trickle.config import Settings
from trickle.config.cli import version
from trickle.generation.resume import credential_of

if TYPE_CHECKING:
    from trickle.generation import AsyncEngine

log = structlog.get_logger("server")

# Every route, each declared once beside its handler, by dialect.
ROUTES = (*native.ROUTES, *openai.ROUTES, *operations.ROUTES, *openapi.ROUTES, *playground.ROUTES)
# No key needed: probes, metrics, the API's description and the playground page (its calls need one).
OPEN_PATHS = frozenset(route.path for route in ROUTES if route.open)
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# An idle connection (or one whose request headers never complete) is closed after this long: longer than
# the 60 s a proxy keeps its idle upstream connections by default, so that the proxy, not the server,
# closes them and never sends a request down a connection the server is closing (aiohttp's own default
# is an hour).
KEEPALIVE_TIMEOUT_S = 75.0
# ---------------------------------------------------------------- middlewares


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    request_id = given if REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex
    request[REQUEST_ID_KEY] = request_id
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    request.app[HTTP_METRICS_KEY].record(route, response.status)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ClientError as err:
        return err.response(request.path)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        allow = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
        return json_error(request.path, err.status, err.reason, headers=allow)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error")
        return json_error(request.path, 500, "internal server error")


def _presented_key(request: web.Request) -> str:
    value = request.headers.get("Authorization", "").strip()
    scheme, _, rest = value.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else value


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys: list[bytes] = request.app[API_KEYS_KEY]
    if keys and request.path not in OPEN_PATHS:
        presented = _presented_key(request).encode()
        # Compare with every key so the time taken does not tell which one (or whether any) nearly matched.
        matched = [hmac.compare_digest(presented, key) for key in keys]
        if not any(matched):
            raise ClientError(
                401, "a valid API key is required (Authorization: Bearer <key>)", WWW_Authenticate="Bearer"
            )
        request[CREDENTIAL_KEY] = credential_of(presented.decode())
    return await handler(request)


# ---------------------------------------------------------------- app


# ---------------------------------------------------------------- app


def create_app(settings: Settings, engine: AsyncEngine | None = None) -> web.Application:
    """The aiohttp application; a given engine starts and stops with it. Without one, `serve` builds
    one from the settings once the port is bound, and until then the app answers 503."""
    app = web.Application(
        middlewares=[request_id_middleware, metrics_middleware, error_middleware, auth_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS_KEY] = settings
    app[ENGINE_KEY] = EngineSlot()
    app[HTTP_METRICS_KEY] = HttpMetrics()
    app[API_KEYS_KEY] = [key.encode() for key in settings.all_api_keys()]
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    openai.prepare(app)
    playground.prepare(app, settings.model)
    app[openapi.DOCUMENT_KEY] = openapi.build_document(ROUTES, "trickle", version(), settings.model)
    app.cleanup_ctx.append(_engine_context(engine))
    return app


def _engine_context(engine: AsyncEngine | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """A given engine starts with the app. Without one, `serve` builds it once the port is bound
    (`EngineSlot.startup`), and /ready says what is being done until the engine runs. Either way the
    engine stops with the app."""

    async def run_engine(app: web.Application) -> AsyncIterator[None]:
        if engine is not None:
            await start_engine(app, engine)
        yield
        startup = app[ENGINE_KEY].startup
        if startup is not None and not startup.done():
            startup.cancel()
        running = app[ENGINE_KEY].engine
        if running is not None:
            gc.unfreeze()
            await running.stop()
            log.info("engine stopped")

    return run_engine


async def start_engine(app: web.Application, engine: AsyncEngine) -> None:
    await engine.start()
    app[ENGINE_KEY].engine = engine
    log.info("engine started", model=app[SETTINGS_KEY].model)
    # What is loaded now lives as long as the server: freeze it out of the cyclic collector, whose full
    # passes over it (some 440,000 objects of torch, transformers and the model, even for the demo)
    # held the interpreter lock for 200 ms and stalled every stream.
    gc.collect()
    gc.freeze()
