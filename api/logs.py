"""Logs: one renderer for structlog and the standard library, the access log, and what never goes in a log.

No log line carries an API key, an `Authorization` value or prompt text, whatever happens:
- tracebacks are rendered without frame locals (the auth middleware's frame holds every key, a handler's
  the prompt);
- aiohttp's reports of a client's protocol errors carry the raw request bytes, headers included: they
  become one short line naming the error, at most one a second (a flood of bad connections once wrote
  88 MB of log in 35 s);
- as a last guard, any configured key that still reaches the renderer is written as `[redacted]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from trickle.api.common import REQUEST_ID_KEY

REDACTED = "[redacted]"
# What a client can make aiohttp's server log: a malformed request, or a connection lost mid-request.
CLIENT_FAULTS = (HttpProcessingError, ConnectionError, asyncio.TimeoutError)
CLIENT_FAULT_INTERVAL_S = 1.0


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log as structured lines carrying the request id (never the query string)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "http request",
            extra={
                "request_id": request.get(REQUEST_ID_KEY),
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000.0, 3),
            },
        )


class ClientFaults(logging.Filter):
    """Rewrites aiohttp's log records of a client's protocol errors as one short warning (the error's
    class and status, no message: it quotes the request's bytes), and lets at most one through every
    `interval` seconds; the next one says how many were left out. Other records pass unchanged."""

    def __init__(
        self, interval: float = CLIENT_FAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval, self._clock = interval, clock
        self._next_at = float("-inf")
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        fault = record.exc_info[1] if record.exc_info else None
        if not isinstance(fault, CLIENT_FAULTS):
            return True
        now = self._clock()
        if now < self._next_at:
            self._left_out += 1
            return False
        self._next_at = now + self.interval
        record.msg, record.args, record.exc_info, record.exc_text = "client protocol error", (), None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.error = type(fault).__name__
        record.status = getattr(fault, "code", None)
        record.left_out = self._left_out
        self._left_out = 0
        return True


class RedactingFormatter(structlog.stdlib.ProcessorFormatter):
    """The rendered line with every configured secret (as written, and as JSON escapes it) replaced."""

    def __init__(self, secrets: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        forms = {form for secret in secrets if secret for form in (secret, json.dumps(secret)[1:-1])}
        self._secrets = sorted(forms, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


def configure_logging(level: str, fmt: str, stream: Any = None, secrets: Iterable[str] = ()) -> None:
    """Route structlog and the standard library (aiohttp, transformers) through one renderer."""
    out = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if as_json:
        no_locals = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        final: list[Any] = [structlog.processors.ExceptionRenderer(no_locals)]
        renderer = structlog.processors.JSONRenderer()
    else:
        final = []
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        RedactingFormatter(
            secrets,
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    server_log = logging.getLogger("aiohttp.server")
    server_log.filters[:] = [ClientFaults()]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    _route_transformers_logs(progress=out.isatty())


def _route_transformers_logs(progress: bool) -> None:
    """transformers' and huggingface_hub's logs through our renderer; their progress bars (downloads,
    loading weight shards) only on a terminal, never inside JSON logs."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if progress:
        hf_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()
    else:
        hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    # huggingface_hub writes through a handler of its own as well as ours (each line twice), and its
    # HTTP layer announces every retry: the loader says in one line when the Hub cannot be reached.
    logging.getLogger("huggingface_hub").handlers.clear()
    logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)
