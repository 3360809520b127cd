"""The operations routes: GET /health (the process is up), GET /ready (the engine takes requests) and
GET /metrics (Prometheus: the engine's metrics and the HTTP responses by route and status). They need
no API key."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, Field

from trickle.api.common import ENGINE_KEY, RETRY_AFTER_NOT_READY, Refs, Route, ServedEngine, json_error
from trickle.api.native import NativeError
from trickle.api.openapi import TEXT, errors, json_content


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    running: int = Field(description="Requests generating now.")
    waiting: int = Field(description="Requests queued for a row.")


class HttpMetrics:
    """HTTP responses by route and status. The route is the matched pattern, never the raw path, so
    the label set stays bounded."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.responses = Counter(
            "trickle:http_responses",
            "HTTP responses, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )

    def record(self, route: str, status: int) -> None:
        self.responses.labels(route=route, status=str(status)).inc()

    async def text(self, engine: ServedEngine | None) -> bytes:
        """The whole server's metrics in Prometheus' text format: these and the engine's."""
        body = generate_latest(self.registry)
        if engine is not None:
            body += await engine.metrics_text()
        return body


HTTP_METRICS_KEY = web.AppKey("http_metrics", HttpMetrics)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    slot = request.app[ENGINE_KEY]
    engine = slot.engine
    reason = slot.doing if engine is None else engine.unavailable
    if engine is None or reason is not None:
        return json_error(request.path, 503, reason or "", headers={"Retry-After": RETRY_AFTER_NOT_READY})
    return web.json_response(
        {"status": "ready", "running": engine.num_running, "waiting": engine.num_waiting}
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: the engine's metrics and the HTTP responses by route and status."""
    body = await request.app[HTTP_METRICS_KEY].text(request.app[ENGINE_KEY].engine)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _ready_responses(ref: Refs) -> dict[str, Any]:
    return {"200": json_content(ref(Readiness)), **errors((503,), ref(NativeError))}


ROUTES = (
    Route(
        "GET",
        "/health",
        health,
        "The process is up",
        "operations",
        lambda ref: {"200": json_content(ref(Health))},
        replies=(Health,),
        open=True,
    ),
    Route(
        "GET",
        "/ready",
        ready,
        "The engine takes requests",
        "operations",
        _ready_responses,
        replies=(Readiness, NativeError),
        open=True,
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        "operations",
        lambda ref: {"200": {"description": "Prometheus text format.", "content": {"text/plain": TEXT}}},
        open=True,
    ),
)
