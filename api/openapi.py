"""GET /openapi.json: an OpenAPI 3.1 document of every route, built from the route table and the
pydantic models the handlers use, so the document, the routes and the validation cannot drift apart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from trickle.api.common import Route

REF = "#/components/schemas/{model}"

ERROR_TEXT = {
    400: "The body is not JSON, or (under /v1/) a field is invalid or asks for what is not supported.",
    401: "An API key is configured and the request did not present it.",
    404: "No such model (under /v1/), or no such stream to resume (it ended or was left too long ago).",
    408: "The body did not arrive within the server's read timeout.",
    413: "The body is larger than the server's limit.",
    415: "The body is not application/json.",
    422: "A field is invalid; the error names it.",
    500: "The generation failed.",
    503: "Not ready, draining, or the queue is full (see Retry-After).",
    504: "The request ran past its time limit.",
}
TEXT = {"schema": {"type": "string"}}


def _ref(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    # Models that read and write differently get "-Input"/"-Output" names; pick the right one.
    for name in (model.__name__, f"{model.__name__}-Input", f"{model.__name__}-Output"):
        if name in defs:
            return {"$ref": REF.format(model=name)}
    raise KeyError(model.__name__)


def json_content(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def errors(statuses: tuple[int, ...], schema: dict[str, Any]) -> dict[str, Any]:
    return {str(status): json_content(schema, ERROR_TEXT[status]) for status in statuses}


def sse(events: list[str], data: str) -> dict[str, Any]:
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


def build_document(routes: Sequence[Route], title: str, version: str, model: str) -> dict[str, Any]:
    """The document of `routes`; `model` is the one value a request body's `model` field accepts."""
    requests = {route.request for route in routes if route.request is not None}
    replies = {reply for route in routes for reply in route.replies}
    _, top = models_json_schema(
        [(m, "validation") for m in sorted(requests, key=lambda m: m.__name__)]
        + [(m, "serialization") for m in sorted(replies, key=lambda m: m.__name__)],
        ref_template=REF,
    )
    defs: dict[str, Any] = top["$defs"]
    for request in requests:
        properties = defs[_ref(request, defs)["$ref"].rsplit("/", 1)[1]].get("properties", {})
        if "model" in properties:
            properties["model"]["enum"] = [model]

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return _ref(model, defs)

    # The key is needed only where the server is configured with keys.
    keyed: list[dict[str, list[str]]] = [{"apiKey": []}, {}]
    paths: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {"summary": route.summary, "tags": [route.tag]}
        if not route.open:
            operation["security"] = keyed
        if route.parameters:
            operation["parameters"] = list(route.parameters)
        if route.request is not None:
            body = {"application/json": {"schema": ref(route.request)}}
            operation["requestBody"] = {"required": True, "content": body}
        operation["responses"] = route.responses(ref)
        paths.setdefault(route.path, {})[route.method.lower()] = operation
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


ROUTES = (
    Route(
        "GET",
        "/openapi.json",
        document,
        "This document",
        "operations",
        lambda ref: {"200": json_content({"type": "object"})},
        open=True,
    ),
)
