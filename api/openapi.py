"""GET /openapi.json: an OpenAPI 3.1 document of every route, built from the pydantic models the
handlers use, so the document and the validation cannot drift apart."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from trickle.api import openai, schemas

REF = "#/components/schemas/{model}"

REQUESTS: list[type[BaseModel]] = [
    schemas.GenerateRequest,
    openai.CompletionRequest,
    openai.ChatCompletionRequest,
]
RESPONSES: list[type[BaseModel]] = [
    schemas.EndEvent,
    schemas.PredictResponse,
    schemas.Health,
    schemas.Readiness,
    schemas.NativeError,
    openai.Completion,
    openai.ChatCompletion,
    openai.ChatCompletionChunk,
    openai.ModelList,
    openai.ErrorResponse,
]

NATIVE_STREAM = """\
Server-sent events. Each token event is unnamed, carries an `id:` and the data `{"text": "..."}`.
A failure sends `event: error` with `{"message": "..."}`. The last event is `event: end` with the
data of the EndEvent schema. Comment lines (`: ping`) keep idle connections open."""

OPENAI_STREAM = """\
Server-sent events, as OpenAI sends them: `data: <chunk>` lines (a Completion with one choice per
chunk on /v1/completions, a ChatCompletionChunk on /v1/chat/completions), then, with
`stream_options.include_usage`, a chunk with no choices and the usage, then `data: [DONE]`. A
generation that fails after the stream began sends an ErrorResponse as a data line before
`[DONE]`."""

ERROR_TEXT = {
    400: "The body is not JSON, or (under /v1/) a field is invalid or asks for what is not supported.",
    401: "An API key is configured and the request did not present it.",
    404: "No such model.",
    408: "The body did not arrive within the server's read timeout.",
    413: "The body is larger than the server's limit.",
    415: "The body is not application/json.",
    422: "A field is invalid; the error names it.",
    500: "The generation failed.",
    503: "Not ready, draining, or the queue is full (see Retry-After).",
    504: "The request ran past its time limit.",
}

NATIVE_ERRORS = (400, 401, 408, 413, 415, 422, 503)
OPENAI_ERRORS = (400, 401, 404, 408, 413, 415, 503, 504)


def _ref(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    # Models that read and write differently get "-Input"/"-Output" names; pick the right one.
    for name in (model.__name__, f"{model.__name__}-Input", f"{model.__name__}-Output"):
        if name in defs:
            return {"$ref": REF.format(model=name)}
    raise KeyError(model.__name__)


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(statuses: tuple[int, ...], schema: dict[str, Any]) -> dict[str, Any]:
    return {str(status): _json(schema, ERROR_TEXT[status]) for status in statuses}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _sse(events: list[str], data: str) -> dict[str, Any]:
    """An event-stream body as OpenAPI 3.1 tools read it: the schema of one event."""
    return {
        "schema": {
            "type": "object",
            "required": ["data", "event"],
            "properties": {
                "event": {"enum": events},
                "data": {"type": "string", "description": data},
                "id": {"type": "string"},
            },
        }
    }


def build_document(title: str, version: str, model: str) -> dict[str, Any]:
    """The document; `model` is the one value the /v1/ routes accept for their `model` field."""
    _, top = models_json_schema(
        [(m, "validation") for m in REQUESTS] + [(m, "serialization") for m in RESPONSES], ref_template=REF
    )
    defs: dict[str, Any] = top["$defs"]
    for request in (openai.CompletionRequest, openai.ChatCompletionRequest):
        defs[request.__name__]["properties"]["model"]["enum"] = [model]

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return _ref(model, defs)

    native_error, openai_error = ref(schemas.NativeError), ref(openai.ErrorResponse)
    # The key is needed only where the server is configured with keys.
    keyed: list[dict[str, list[str]]] = [{"apiKey": []}, {}]
    text = {"schema": {"type": "string"}}
    native_events = _sse(
        ["message", "error", "end"],
        'JSON: {"text": ...} for a token event, {"message": ...} for `error`, an EndEvent for `end`.',
    )
    openai_events = _sse(["message"], "JSON: a chunk or an ErrorResponse; the last event is [DONE].")

    def openai_route(summary: str, request: type[BaseModel], reply: type[BaseModel]) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "tags": ["OpenAI-compatible"],
                "security": keyed,
                "requestBody": _body(ref(request)),
                "responses": {
                    "200": {
                        "description": "With `stream: false`, the whole reply. " + OPENAI_STREAM,
                        "content": {
                            "application/json": {"schema": ref(reply)},
                            "text/event-stream": openai_events,
                        },
                    },
                    **_errors(OPENAI_ERRORS, openai_error),
                    "500": _json(openai_error, ERROR_TEXT[500]),
                },
            }
        }

    paths: dict[str, Any] = {
        "/stream": {
            "post": {
                "summary": "Stream a continuation of the prompt as server-sent events",
                "tags": ["native"],
                "security": keyed,
                "requestBody": _body(ref(schemas.GenerateRequest)),
                "responses": {
                    "200": {
                        "description": NATIVE_STREAM,
                        "content": {"text/event-stream": native_events},
                    },
                    **_errors(NATIVE_ERRORS, native_error),
                },
            }
        },
        "/predict": {
            "post": {
                "summary": "Generate a continuation and return it whole",
                "tags": ["native"],
                "security": keyed,
                "requestBody": _body(ref(schemas.GenerateRequest)),
                "responses": {
                    "200": _json(ref(schemas.PredictResponse)),
                    **_errors(NATIVE_ERRORS, native_error),
                    "500": _json(native_error, ERROR_TEXT[500]),
                },
            }
        },
        "/v1/completions": openai_route("Complete a prompt", openai.CompletionRequest, openai.Completion),
        "/v1/chat/completions": openai_route(
            "Reply to a conversation (built with the model's chat template)",
            openai.ChatCompletionRequest,
            openai.ChatCompletion,
        ),
        "/v1/models": {
            "get": {
                "summary": "The served model",
                "tags": ["OpenAI-compatible"],
                "security": keyed,
                "responses": {"200": _json(ref(openai.ModelList)), **_errors((401,), openai_error)},
            }
        },
        "/health": {
            "get": {
                "summary": "The process is up",
                "tags": ["operations"],
                "responses": {"200": _json(ref(schemas.Health))},
            }
        },
        "/ready": {
            "get": {
                "summary": "The engine takes requests",
                "tags": ["operations"],
                "responses": {"200": _json(ref(schemas.Readiness)), **_errors((503,), native_error)},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "tags": ["operations"],
                "responses": {
                    "200": {"description": "Prometheus text format.", "content": {"text/plain": text}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "tags": ["operations"],
                "responses": {"200": _json({"type": "object"})},
            }
        },
        "/": {
            "get": {
                "summary": "The playground: a page that streams from the model in the browser",
                "tags": ["operations"],
                "responses": {"200": {"description": "HTML.", "content": {"text/html": text}}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }


DOCUMENT_KEY = web.AppKey("openapi_document", dict)


async def document(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOCUMENT_KEY])


def add_routes(app: web.Application, title: str, version: str, model: str) -> None:
    app[DOCUMENT_KEY] = build_document(title, version, model)
    app.add_routes([web.get("/openapi.json", document)])
