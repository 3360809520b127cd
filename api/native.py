"""The native dialect: POST /stream (server-sent events) and POST /predict (one JSON document), their
bodies as pydantic models (what the handlers validate and what /openapi.json documents), and their
routes."""

from __future__ import annotations

import json
from typing import Any, Literal

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import BaseModel, Field

from trickle.api import logprobs
from trickle.api.common import (
    CREDENTIAL_KEY,
    SETTINGS_KEY,
    ClientError,
    Refs,
    Route,
    admit,
    check_format,
    engine_for,
    gather,
    json_error,
    read_json,
    request_error,
    running_engine,
    stream_events,
)
from trickle.api.logprobs import NativeLogprob
from trickle.api.openapi import ERROR_TEXT, errors, json_content, sse
from trickle.generation import Prompts, RequestError, RequestOutput, RequestStream, SamplingParams

FinishReason = Literal["eos", "stop", "length", "cancelled", "timeout", "shutdown", "error"]


class GenerateRequest(SamplingParams):
    """The body of POST /stream and POST /predict."""

    prompt: str = Field(min_length=1, description="The text to continue.")
    cutoff_len: int = Field(
        default=256, ge=1, description="Keep at most this many prompt tokens (the latest)."
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="End the request (finish_reason `timeout`) after this many seconds."
    )


class TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(
        default=0, description="Prompt tokens whose KV the prefix cache held: they were not computed again."
    )


class Timings(BaseModel):
    queue_ms: float | None = Field(description="From arrival to admission into the batch.")
    ttft_ms: float | None = Field(description="From arrival to the first token.")
    total_ms: float | None = Field(description="From arrival to the end.")


class EndEvent(BaseModel):
    """The data of the stream's last event (`event: end`); /predict returns it with the whole text."""

    finish_reason: FinishReason
    usage: TokenUsage
    timings: Timings


class PredictResponse(EndEvent):
    text: str
    logprobs: list[NativeLogprob] | None = Field(
        default=None, description="Each generated token's, where the request asked (`logprobs`)."
    )


class TokenEvent(BaseModel):
    """The data of a token event."""

    text: str
    logprobs: list[NativeLogprob] | None = Field(
        default=None,
        description="Where the request asked (`logprobs`): those of the tokens generated since the last "
        "event (a token whose text is held back, part of a character say, has its entry in the event "
        "where it was generated and its text in a later one).",
    )


class NativeErrorDetail(BaseModel):
    status: int
    message: str
    field: str | None = Field(default=None, description="The request field at fault, where one is.")


class NativeError(BaseModel):
    """The error body of every route outside /v1/."""

    error: NativeErrorDetail


# ---------------------------------------------------------------- handlers


async def open_generation(request: web.Request, resumable: bool = False) -> RequestStream:
    """Everything that can refuse a request, done before any byte of the response is sent: the
    returned stream has been admitted, and must be closed."""
    body = await read_json(request, GenerateRequest)
    engine = engine_for(request)
    limit = request.app[SETTINGS_KEY].request_timeout
    if body.timeout_s is not None and body.timeout_s > limit:
        message = f"timeout_s: {body.timeout_s} exceeds the server's limit of {limit}"
        raise ClientError(422, message, field="timeout_s")
    prompts = engine.prompts
    try:
        ids = await prompts.off_loop(prompts.truncated, body.prompt, body.cutoff_len, body.max_new_tokens)
    except RequestError as err:
        raise request_error(err) from err
    await check_format(engine, body.response_format, 422)
    return admit(request, engine, ids, sampling_params(body), body.timeout_s, resumable)


def sampling_params(body: GenerateRequest) -> SamplingParams:
    return SamplingParams.model_validate(body.model_dump(exclude={"prompt", "cutoff_len", "timeout_s"}))


def end_payload(output: RequestOutput) -> dict[str, Any]:
    return {"finish_reason": output.finish_reason, "usage": output.usage, "timings": output.timings}


async def stream(request: web.Request) -> web.StreamResponse:
    resumable = request.app[SETTINGS_KEY].resume_grace > 0
    outputs = await open_generation(request, resumable)
    prompts = engine_for(request).prompts
    # The stream's id is the engine's key for the request: made here, 128 random bits, never the client's.
    headers = {"X-Stream-Id": outputs.request_id} if resumable else None
    return await stream_events(
        request, outputs, lambda response: _write_events(response, outputs, prompts), headers
    )


async def resume(request: web.Request) -> web.StreamResponse:
    """A client that lost its /stream comes back: the events after `Last-Event-ID` (all of them without
    it), then the live ones."""
    settings = request.app[SETTINGS_KEY]
    engine = running_engine(request)
    stream_id = request.match_info["stream_id"]
    seen = request.headers.get("Last-Event-ID", "").strip()
    if seen and not (seen.isascii() and seen.isdigit() and len(seen) < 10):
        raise ClientError(400, "Last-Event-ID: must be an event id this stream sent (a number)")
    outputs = await engine.reattach(stream_id, request.get(CREDENTIAL_KEY, ""))
    if isinstance(outputs, str):
        message = (
            f"no stream {stream_id[:64]!r} to resume: it never was, or it ended or was left more than "
            f"{settings.resume_grace:g} s ago"
        )
        raise ClientError(404, message)
    after = int(seen) if seen else -1
    headers = {"X-Stream-Id": outputs.request_id}
    return await stream_events(
        request, outputs, lambda response: _write_events(response, outputs, engine.prompts, after), headers
    )


async def cancel(request: web.Request) -> web.Response:
    """Cancel a stream now (a client that stops reading on purpose: leaving would keep it running for the
    grace period, for a resume)."""
    engine = running_engine(request)
    stream_id = request.match_info["stream_id"]
    if not await engine.cancel(stream_id, request.get(CREDENTIAL_KEY, "")):
        raise ClientError(404, f"no stream {stream_id[:64]!r} to cancel")
    return web.Response(status=204)


async def _write_events(
    response: EventSourceResponse, outputs: RequestStream, prompts: Prompts, after: int = -1
) -> None:
    """The events of a request's outputs, numbered from 0; those numbered `after` or less (a resumed
    reading's, already sent) are counted, not sent."""
    event_id = 0

    async def send(data: str, event: str | None = None) -> None:
        nonlocal event_id
        if event_id > after:
            await response.send(data, id=str(event_id), event=event)
        event_id += 1

    async for output in outputs:
        if output.logprobs is not None:  # asked for: each token's, with the text released (maybe none)
            if output.text or output.logprobs:
                await send(
                    json.dumps({"text": output.text, "logprobs": logprobs.native(prompts, output.logprobs)})
                )
        elif output.text:
            await send(json.dumps({"text": output.text}))
        if output.error is not None:
            await send(json.dumps({"message": output.error}), "error")
        if output.finished:
            await send(json.dumps(end_payload(output)), "end")


async def predict(request: web.Request) -> web.Response:
    whole = await gather(await open_generation(request))
    final = whole.final
    if final is None or final.error is not None:
        message = final.error if final is not None and final.error else "the engine stopped"
        return json_error(request.path, 500, message)
    reply = {"text": whole.text, **end_payload(final)}
    if whole.logprobs is not None:
        reply["logprobs"] = logprobs.native(engine_for(request).prompts, whole.logprobs)
    return web.json_response(reply)


# ---------------------------------------------------------------- routes

STREAM_TEXT = """\
Server-sent events. Each token event is unnamed, carries an `id:` and the data `{"text": "..."}`
(a TokenEvent: with `logprobs` where the request asked for them).
A failure sends `event: error` with `{"message": "..."}`. The last event is `event: end` with the
data of the EndEvent schema. Comment lines (`: ping`) keep idle connections open."""
ERRORS = (400, 401, 408, 413, 415, 422, 503)


def _stream_responses(ref: Refs) -> dict[str, Any]:
    events = sse(
        ["message", "error", "end"],
        'JSON: {"text": ...} for a token event, {"message": ...} for `error`, an EndEvent for `end`.',
    )
    return {
        "200": {"description": STREAM_TEXT, "content": {"text/event-stream": events}},
        **errors(ERRORS, ref(NativeError)),
    }


def _resume_responses(ref: Refs) -> dict[str, Any]:
    events = sse(["message", "error", "end"], "As POST /stream's, with the same ids.")
    text = (
        "The stream's events after Last-Event-ID (every one without it), then the live ones. A connection "
        "that still read it ends with an `error` event and no `end`: the newest reading takes it over."
    )
    return {
        "200": {"description": text, "content": {"text/event-stream": events}},
        **errors((400, 401, 404, 503), ref(NativeError)),
    }


RESUME_PARAMETERS = (
    {
        "name": "stream_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "The X-Stream-Id header of the POST /stream response.",
    },
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]{1,9}$"},
        "description": "The id of the last event received; EventSource sends it when it reconnects.",
    },
)


def _cancel_responses(ref: Refs) -> dict[str, Any]:
    return {
        "204": {"description": "Cancelled (or it had ended)."},
        **errors((401, 404, 503), ref(NativeError)),
    }


def _predict_responses(ref: Refs) -> dict[str, Any]:
    return {
        "200": json_content(ref(PredictResponse)),
        **errors(ERRORS, ref(NativeError)),
        "500": json_content(ref(NativeError), ERROR_TEXT[500]),
    }


ROUTES = (
    Route(
        "POST",
        "/stream",
        stream,
        "Stream a continuation of the prompt as server-sent events",
        "native",
        _stream_responses,
        request=GenerateRequest,
        replies=(TokenEvent, EndEvent, NativeError),
    ),
    Route(
        "GET",
        "/stream/{stream_id}",
        resume,
        "Resume a stream whose connection was lost (within the server's resume grace period)",
        "native",
        _resume_responses,
        replies=(TokenEvent, EndEvent, NativeError),
        parameters=RESUME_PARAMETERS,
    ),
    Route(
        "DELETE",
        "/stream/{stream_id}",
        cancel,
        "Cancel a stream now (one its client leaves runs on for the resume grace period)",
        "native",
        _cancel_responses,
        replies=(NativeError,),
        parameters=RESUME_PARAMETERS[:1],
    ),
    Route(
        "POST",
        "/predict",
        predict,
        "Generate a continuation and return it whole",
        "native",
        _predict_responses,
        request=GenerateRequest,
        replies=(PredictResponse, NativeError),
    ),
)
