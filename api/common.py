"""What every route shares: how a route is declared, the app's keys, client errors in the native and
the OpenAI dialect, JSON bodies, and admitting a request to the engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import BaseModel, ValidationError

from trickle.config import Settings
from trickle.generation import (
    EngineUnavailableError,
    Prompts,
    QueueFullError,
    RequestError,
    RequestOutput,
    RequestStream,
    SamplingParams,
)
from trickle.generation.messages import TokenLogprobs
from trickle.generation.params import ResponseFormat
from trickle.generation.structured import Grammars

log = structlog.get_logger("api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A model's schema reference in the OpenAPI document.
Refs = Callable[[type[BaseModel]], dict[str, Any]]


@dataclass(frozen=True)
class Route:
    """One route, declared once, beside its handler: how the app serves it, whether it needs an API key
    (where the server has keys), and how /openapi.json documents it."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    responses: Callable[[Refs], dict[str, Any]]
    """Its responses in the document, given the models' schema references."""
    request: type[BaseModel] | None = None
    """The JSON body it validates."""
    replies: tuple[type[BaseModel], ...] = ()
    """The models its responses name."""
    open: bool = False
    """Served without an API key: probes, metrics, the document and the playground page."""
    parameters: tuple[dict[str, Any], ...] = ()
    """Its path and header parameters, as the document lists them."""


SETTINGS_KEY = web.AppKey("settings", Settings)


class ServedEngine(Protocol):
    """The engine as the routes use it: AsyncEngine in the engine's own process, RemoteEngine in an HTTP
    worker process."""

    prompts: Prompts
    grammars: Grammars

    @property
    def unavailable(self) -> str | None: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    def check_admissible(self, count: int = 1) -> None: ...
    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        timeout: float | None = None,
        label: str = "",
        resumable: bool = False,
        credential: str = "",
    ) -> RequestStream: ...
    async def reattach(self, request_id: str, credential: str) -> RequestStream | str: ...
    async def cancel(self, request_id: str, credential: str) -> bool: ...
    async def metrics_text(self) -> bytes: ...
    async def stop(self) -> None: ...


@dataclass
class EngineSlot:
    """The app's engine once it runs, and until then what the server is doing (for /ready). A slot set
    once the app has started, which aiohttp's frozen app mapping would not allow."""

    engine: ServedEngine | None = None
    doing: str = "the model is not ready"
    startup: asyncio.Task[None] | None = None
    """The task that builds and starts the engine, where `serve` builds it after binding the port."""


ENGINE_KEY = web.AppKey("engine", EngineSlot)
API_KEYS_KEY = web.AppKey("api_keys", list)
REQUEST_ID_KEY = web.RequestKey("request_id", str)
CREDENTIAL_KEY = web.RequestKey("credential", str)
"""What a request's streams remember of its API key (a digest; empty where the server has no keys)."""

RETRY_AFTER_NOT_READY = "5"
OPENAI_PREFIX = "/v1/"

# OpenAI's error `type` for each status we send on its routes.
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}

Body = TypeVar("Body", bound=BaseModel)


def error_body(path: str, status: int, message: str, field: str | None = None) -> dict[str, Any]:
    """The JSON error for a response on `path`: OpenAI's error object under /v1/, ours elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        return {"error": {"message": message, "type": kind, "param": field, "code": None}}
    error: dict[str, Any] = {"status": status, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


def json_error(
    path: str,
    status: int,
    message: str,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(path, status, message, field), status=status, headers=headers)


class ClientError(Exception):
    """An error answer decided before any streaming starts (mostly a request we refuse); the error
    middleware turns it into a JSON error response."""

    def __init__(self, status: int, message: str, field: str | None = None, **headers: str) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.headers = {name.replace("_", "-"): value for name, value in headers.items()}

    def response(self, path: str) -> web.Response:
        return json_error(path, self.status, self.message, field=self.field, headers=self.headers)


# Parts of a pydantic error location that name a union member, not a field: `str`, `constrained-str`,
# `list[constrained-str]`, `TextPart`.
_UNION_TAG = re.compile(r"[A-Z].*|.*[\[\-].*|str|int|float|bool|list|dict|none")


def validation_error(err: ValidationError, status: int = 422) -> ClientError:
    first = err.errors()[0]
    parts = [str(part) for part in first["loc"] if isinstance(part, int) or not _UNION_TAG.fullmatch(part)]
    field = ".".join(parts) or None
    message = first["msg"].removeprefix("Value error, ")
    return ClientError(status, f"{field}: {message}" if field else message, field=field)


async def read_json(request: web.Request, model: type[Body], invalid_status: int = 422) -> Body:
    """The body as `model`: 415 unless JSON, 413 past the size limit, 408 unless it arrives within the
    read timeout, 400 unless it parses, and `invalid_status` naming the first field at fault."""
    if request.content_type != "application/json":
        raise ClientError(415, f"Content-Type must be application/json, not {request.content_type!r}")
    settings = request.app[SETTINGS_KEY]
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ClientError(413, f"the body has {request.content_length} bytes; the limit is {limit}")
    try:
        async with asyncio.timeout(settings.read_timeout):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        raise ClientError(413, f"the body is larger than the limit of {limit} bytes") from err
    except TimeoutError as err:
        message = f"the body did not arrive within the read timeout of {settings.read_timeout:g} s"
        raise ClientError(408, message) from err
    return _validated(_parsed(raw), model, invalid_status)


def _parsed(raw: bytes) -> Any:
    """JSON, or 400. The parser's RecursionError (nesting too deep) and ValueError (an integer past
    Python's 4,300 digits, bytes that are not UTF-8) are the client's mistakes too."""
    try:
        return json.loads(raw)
    except RecursionError as err:
        raise ClientError(400, "the body is not valid JSON: it is nested too deeply") from err
    except json.JSONDecodeError as err:
        raise ClientError(400, f"the body is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise ClientError(400, "the body is not valid JSON: it is not UTF-8") from err
    except ValueError as err:  # the only other: int() past sys.get_int_max_str_digits()
        raise ClientError(400, "the body is not valid JSON: it holds a number too long to read") from err


def _validated(body: Any, model: type[Body], invalid_status: int) -> Body:
    if not isinstance(body, dict):
        raise ClientError(invalid_status, "the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err, invalid_status) from err


def engine_for(request: web.Request) -> ServedEngine:
    """The engine, when it would take a request now; 503 otherwise (not built yet, not running, draining,
    queue full), before the request's prompt costs any work. `admit` asks again."""
    engine = running_engine(request)
    with _refusals():
        engine.check_admissible()
    return engine


def running_engine(request: web.Request) -> ServedEngine:
    """The engine, once it runs (503 before): for routes that read what it has, whatever its load."""
    engine = request.app[ENGINE_KEY].engine
    if engine is None:
        raise ClientError(503, "the model is not ready", Retry_After=RETRY_AFTER_NOT_READY)
    return engine


def admit(
    request: web.Request,
    engine: ServedEngine,
    prompt_ids: list[int],
    params: SamplingParams,
    timeout: float | None = None,
    resumable: bool = False,
) -> RequestStream:
    """Hand the request to the engine, or refuse it with 503 (full queue, draining, not ready)."""
    label, credential = request[REQUEST_ID_KEY], request.get(CREDENTIAL_KEY, "")
    with _refusals():
        return engine.generate(prompt_ids, params, timeout, label, resumable, credential)


def admit_choices(
    request: web.Request, engine: ServedEngine, prompt_ids: list[int], params: list[SamplingParams]
) -> Choices:
    """Hand the engine one generation of the prompt for each of `params` (OpenAI's `n` choices), all or
    none: 503 if the queue cannot take them all."""
    label = request[REQUEST_ID_KEY]
    with _refusals():
        engine.check_admissible(len(params))
        if len(params) == 1:
            return Choices([engine.generate(prompt_ids, params[0], label=label)])
        return Choices([engine.generate(prompt_ids, p, label=f"{label}.{i}") for i, p in enumerate(params)])


class Choices:
    """A request's generations (OpenAI's `n` choices), read as one: `(index, output)` pairs in the order
    they come. Closing it closes every generation (those not finished are cancelled)."""

    def __init__(self, streams: list[RequestStream]) -> None:
        self.streams = streams
        self.request_id = streams[0].request_id
        self._reading: dict[int, asyncio.Future[RequestOutput]] = {}
        self._ended: set[int] = set()

    def __aiter__(self) -> Choices:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if len(self.streams) == 1:  # one choice: no task a token
            return 0, await self.streams[0].__anext__()
        for index, stream in enumerate(self.streams):
            if index not in self._reading and index not in self._ended:
                self._reading[index] = asyncio.ensure_future(stream.__anext__())
        if not self._reading:
            raise StopAsyncIteration
        done, _ = await asyncio.wait(self._reading.values(), return_when=asyncio.FIRST_COMPLETED)
        index = min(i for i, reading in self._reading.items() if reading in done)
        output = self._reading.pop(index).result()
        if output.finished:
            self._ended.add(index)
        return index, output

    async def aclose(self) -> None:
        for reading in self._reading.values():
            reading.cancel()
        for stream in self.streams:
            await stream.aclose()


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except QueueFullError as err:
        raise ClientError(503, str(err), Retry_After=str(err.retry_after)) from err
    except EngineUnavailableError as err:
        raise ClientError(503, str(err), Retry_After=RETRY_AFTER_NOT_READY) from err


def request_error(err: RequestError, status: int = 422) -> ClientError:
    return ClientError(status, f"{err.field}: {err}", field=err.field)


async def check_format(engine: ServedEngine, spec: ResponseFormat | None, status: int) -> None:
    """A `status` error naming `response_format` when the engine could not follow it (a schema the
    grammar library cannot compile, a pattern that does not parse); checked on a tokenizer thread."""
    if spec is None:
        return
    try:
        await engine.prompts.off_loop(engine.grammars.check, spec)
    except RequestError as err:
        raise request_error(err, status) from err


async def stream_events(
    request: web.Request,
    outputs: RequestStream | Choices,
    write: Callable[[EventSourceResponse], Awaitable[None]],
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """An SSE response that `write` fills from `outputs`; closing `outputs` on the way out cancels the
    request if it has not finished (a client that hung up, say)."""
    response = EventSourceResponse(
        sep="\n",
        ping_interval=request.app[SETTINGS_KEY].ping_interval,
        headers={"X-Request-Id": request[REQUEST_ID_KEY], **(headers or {})},
        allow_all_methods=True,
    )
    try:
        async with contextlib.aclosing(outputs):
            await response.prepare(request)
            await write(response)
    except (ConnectionResetError, EngineUnavailableError) as err:
        log.info("stream ended early", reason=type(err).__name__)
    return response


@dataclass
class Gathered:
    """A request's whole output: its text, its final output (None if the engine stopped first), and its
    tokens' log-probabilities where it asked for them."""

    text: str
    final: RequestOutput | None
    logprobs: list[TokenLogprobs] | None


async def gather(outputs: RequestStream) -> Gathered:
    pieces: list[str] = []
    final: RequestOutput | None = None
    logprobs: list[TokenLogprobs] | None = None
    async with contextlib.aclosing(outputs):
        async for output in outputs:
            pieces.append(output.text)
            if output.logprobs is not None:
                logprobs = [] if logprobs is None else logprobs
                logprobs.extend(output.logprobs)
            final = output
    return Gathered("".join(pieces), final, logprobs)
