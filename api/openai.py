"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions and /v1/models, on the same engine.

Every request field OpenAI defines either maps onto the engine's sampling parameters or, where the
engine cannot honour it (tools, `logit_bias`, `echo`, `suffix`, structured output), is refused with a
400 naming it: nothing is silently ignored. `n` choices are one engine request each (`Choices`).
`top_k`, `min_tokens`, `repetition_penalty`, `stop_token_ids` and `ignore_eos` are accepted as
extensions, under the names other open servers use.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import structlog
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from trickle.api import logprobs
from trickle.api.common import (
    SETTINGS_KEY,
    Choices,
    ClientError,
    Gathered,
    Refs,
    Route,
    admit_choices,
    check_format,
    engine_for,
    gather,
    read_json,
    stream_events,
)
from trickle.api.logprobs import ChatLogprobs, CompletionLogprobs
from trickle.api.openapi import ERROR_TEXT, errors, json_content, sse
from trickle.generation import Prompts, RequestOutput, RequestStream, SamplingParams
from trickle.generation.messages import TokenLogprobs
from trickle.generation.params import (
    MAX_SEED,
    MAX_STOP_STRINGS,
    MAX_TOP_K,
    LogprobCount,
    OpenAIPenalty,
    RepetitionPenalty,
    StopString,
    StopTokenIds,
)
from trickle.generation.params import ResponseFormat as OutputFormat

OWNER = "trickle"
STARTED_KEY = web.AppKey("openai_started", int)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 16  # most choices (n, best_of) one request may ask for
# The engine's finish reasons that OpenAI's shape can express; the others end a response as an error.
Finish = Literal["stop", "length"]
FINISH_REASONS: dict[str, Finish] = {"eos": "stop", "stop": "stop", "length": "length"}
# Status of a non-streamed response whose generation ended some other way.
UNFINISHED_STATUS = {"timeout": 504, "shutdown": 503, "cancelled": 503}
# Fields whose every value but the default asks for something the engine does not do.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logit_bias": (lambda v: not v, "not supported"),
    "echo": (lambda v: v is None or v is False, "not supported"),
    "suffix": (lambda v: not v, "not supported"),
    "tools": (lambda v: not v, "tools are not supported"),
    "tool_choice": (lambda v: v is None or v == "none", "tools are not supported"),
    "parallel_tool_calls": (lambda v: v is None or v is False, "tools are not supported"),
}


# ---------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(default=False, description="Send a last chunk with the token counts.")


class _SamplingFields(BaseModel):
    """Fields the completion and the chat request share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="The served model's id (see GET /v1/models).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(
        default=1,
        ge=1,
        le=MAX_CHOICES,
        description="Choices to generate. They share the prompt's KV cache (it is computed once); with a "
        "`seed`, choice i uses seed + i, so each is reproducible alone.",
    )
    stream: bool = Field(default=False, description="Send server-sent events as the text is generated.")
    stream_options: StreamOptions | None = Field(default=None, description="Only with `stream`.")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        default=None, description="Strings that end generation; they are never emitted."
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="The same seed gives the same text, whatever the batch."
    )
    frequency_penalty: OpenAIPenalty = Field(
        default=0.0,
        description="Subtracted from a token's logit once for each time it is in the output so far.",
    )
    presence_penalty: OpenAIPenalty = Field(
        default=0.0,
        description="Subtracted from a token's logit if it is in the output so far.",
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=0, description="Not supported: only an empty map."
    )
    user: str | None = Field(default=None, max_length=256, description="Logged with the request.")
    response_format: ResponseFormat | None = Field(
        default=None,
        description="What the output must be: `json_object`, `json_schema` (strict), and as extensions "
        "`regex` and `grammar`; followed token by token.",
    )
    top_k: int = Field(
        default=0, ge=0, le=MAX_TOP_K, description="Extension: keep the k most likely tokens; 0 disables."
    )
    min_tokens: int = Field(
        default=0, ge=0, description="Extension: end-of-text is ignored before this many."
    )
    repetition_penalty: RepetitionPenalty = Field(
        default=1.0,
        description="Extension: divides positive and multiplies negative logits of every token in the "
        "prompt or the output so far; 1.0 disables.",
    )
    stop_token_ids: StopTokenIds = Field(
        default_factory=list,
        description="Extension (as vLLM's): token ids that end generation (finish_reason `stop`); the "
        "token's text is kept unless it is a special token.",
    )
    ignore_eos: bool = Field(
        default=False, description="Extension (as vLLM's): end-of-text does not end generation."
    )

    @field_validator(*UNSUPPORTED, mode="before", check_fields=False)
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: Any) -> Any:
        allowed, reason = UNSUPPORTED[info.field_name]
        if not allowed(value):
            raise ValueError(reason)
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> tuple[str, int | None]:
        """The field that sets the most tokens to generate, and its value."""
        raise NotImplementedError

    def requested_logprobs(self) -> int | None:
        """The alternatives each token's log-probabilities list, or None where none are asked for."""
        raise NotImplementedError


class CompletionRequest(_SamplingFields):
    """The body of POST /v1/completions."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    ) = Field(description="The text to continue (a list holds exactly one prompt).")
    max_tokens: int | None = Field(
        default=COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1, description="Most tokens to generate."
    )
    echo: Literal[False] = Field(default=False, description="Not supported: only false.")
    logprobs: LogprobCount | None = Field(
        default=None,
        description="Report each token's log-probability and this many most likely alternatives' "
        "(the model's distribution, before temperature and penalties).",
    )
    best_of: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CHOICES,
        description="Generate this many (at least `n`; not with `stream`) and return the `n` with the "
        "highest sum of their tokens' log-probabilities.",
    )
    suffix: None = Field(default=None, description="Not supported: only null.")

    def requested_max_tokens(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON Schema the output is an instance of."
    )
    strict: bool | None = Field(default=None, description="Always followed strictly here.")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`, and two extensions: `regex` (with `pattern`) and `grammar` (with
    `grammar`, a Lark grammar in llguidance's dialect)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JsonSchemaFormat | None = None
    pattern: str | None = Field(default=None, max_length=65536)
    grammar: str | None = Field(default=None, max_length=1 << 20)

    def output_format(self) -> OutputFormat | None:
        """The engine's form of it (None for plain text); ValueError naming what is missing."""
        if self.type == "text":
            return None
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.json_schema is None:
                raise ValueError("json_schema: needs a schema")
            return OutputFormat(type="json_schema", schema=self.json_schema.json_schema)
        return OutputFormat(type=self.type, pattern=self.pattern, grammar=self.grammar)


class ChatCompletionRequest(_SamplingFields):
    """The body of POST /v1/chat/completions. The prompt is built with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate (the newer name; wins over max_tokens)."
    )
    logprobs: bool = Field(
        default=False,
        description="Report each token's log-probability (the model's distribution, before temperature "
        "and penalties).",
    )
    top_logprobs: LogprobCount | None = Field(
        default=None,
        description="With `logprobs`: this many most likely alternatives.",
    )
    tools: Annotated[list[Any], Field(max_length=0)] | None = Field(
        default=None, description="Not supported."
    )
    tool_choice: Literal["none"] | None = Field(default=None, description="Not supported beyond `none`.")
    parallel_tool_calls: Literal[False] | None = Field(default=None, description="Not supported.")

    def requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Finish | None


class Completion(BaseModel):
    """A completion, or (streamed, `object` the same) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Finish


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Finish | None

    @field_serializer("delta")
    def _only_what_changed(self, delta: ChatDelta) -> dict[str, Any]:
        # OpenAI leaves out what a delta does not carry: the finishing chunk's delta is {}.
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object, on every /v1/ error response and inside a stream that fails."""

    error: ErrorDetail


# ---------------------------------------------------------------- building a request


def served_model(app: web.Application) -> str:
    return app[SETTINGS_KEY].model


def _check_model(request: web.Request, model: str) -> None:
    served = served_model(request.app)
    if model != served:
        raise ClientError(404, f"model: {model!r} does not exist; this server serves {served!r}", "model")


def _prompt_ids(prompts: Prompts, text: str, field: str, *, special_tokens: bool = True) -> list[int]:
    """The prompt's ids, refused when they cannot fit the context: from the text's length alone where
    that tells, before tokenizing it. Runs on a tokenizer thread (`Prompts.off_loop`)."""
    limit = prompts.max_seq_len
    _check_length(prompts, len(text), field)
    try:
        ids = prompts.encode(text, special_tokens=special_tokens)
    except ValueError as err:
        raise ClientError(400, f"{field}: {err}", field) from err
    if not ids:
        raise ClientError(400, f"{field}: the prompt encodes to no tokens", field)
    if len(ids) >= limit:
        message = f"{field}: the prompt has {len(ids)} tokens; this model's context is {limit}"
        raise ClientError(400, message, field)
    return ids


def _check_length(prompts: Prompts, chars: int, field: str) -> None:
    fewest, limit = prompts.fewest_tokens(chars), prompts.max_seq_len
    if fewest >= limit:
        message = f"{field}: the prompt has at least {fewest} tokens; this model's context is {limit}"
        raise ClientError(400, message, field)


def _chat_ids(prompts: Prompts, messages: list[ChatMessage]) -> list[int]:
    """The chat's prompt ids; a conversation too long for the context is refused before it is rendered.
    Runs on a tokenizer thread."""
    tokenizer = prompts.tokenizer
    if not tokenizer.chat_template:
        raise ClientError(400, "messages: this model has no chat template; use /v1/completions", "messages")
    _check_length(prompts, sum(len(m.text()) for m in messages), "messages")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = str(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
    except Exception as err:  # a template may raise on a conversation it does not accept
        raise ClientError(400, f"messages: the chat template refused them: {err}", "messages") from err
    # The template writes the special tokens itself.
    return _prompt_ids(prompts, text, "messages", special_tokens=False)


def _sampling_params(body: _SamplingFields, prompt_tokens: int, limit: int) -> SamplingParams:
    room = limit - prompt_tokens
    field, max_tokens = body.requested_max_tokens()
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        message = (
            f"{field}: {max_tokens} plus the prompt's {prompt_tokens} tokens exceeds this model's "
            f"context of {limit}"
        )
        raise ClientError(400, message, field)
    if body.min_tokens > max_tokens:
        raise ClientError(
            400, f"min_tokens: {body.min_tokens} exceeds max_tokens ({max_tokens})", "min_tokens"
        )
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_new_tokens=max_tokens,
        min_new_tokens=body.min_tokens,
        stop=body.stop_strings(),
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        logprobs=body.requested_logprobs(),
        response_format=_output_format(body),
        seed=body.seed,
    )


async def _parse(request: web.Request, model: type[CompletionRequest] | type[ChatCompletionRequest]) -> Any:
    body = await read_json(request, model, invalid_status=400)
    if body.stream_options is not None and not body.stream:
        raise ClientError(400, "stream_options: only allowed when stream is true", "stream_options")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None and not body.logprobs:
        raise ClientError(400, "top_logprobs: only allowed when logprobs is true", "top_logprobs")
    if isinstance(body, CompletionRequest) and body.best_of is not None:
        if body.best_of < body.n:
            raise ClientError(400, f"best_of: must be at least n ({body.n})", "best_of")
        if body.stream and body.best_of > 1:
            raise ClientError(400, "best_of: not allowed with stream", "best_of")
    _check_model(request, body.model)
    if body.user is not None:
        structlog.contextvars.bind_contextvars(user=body.user)
    return body


# ---------------------------------------------------------------- routes


async def completions(request: web.Request) -> web.StreamResponse:
    body: CompletionRequest = await _parse(request, CompletionRequest)
    engine = engine_for(request)
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    ids = await engine.prompts.off_loop(_prompt_ids, engine.prompts, text, "prompt")
    params = _sampling_params(body, len(ids), engine.prompts.max_seq_len)
    await check_format(engine, params.response_format, 400)
    best_of = body.best_of or body.n
    if best_of > body.n and params.logprobs is None:  # ranked by their log-probabilities
        params = params.model_copy(update={"logprobs": 0})
    choices = admit_choices(request, engine, ids, _choice_params(params, best_of))
    reply = _Reply(f"cmpl-{choices.request_id}", body.model)
    sent = [0] * best_of  # characters each choice has sent: where its next tokens begin (`text_offset`)

    def chunk(
        text: str,
        finish: Finish | None,
        usage: Usage | None = None,
        last: bool = False,
        entries: list[TokenLogprobs] | None = None,
        index: int = 0,
    ) -> Completion:
        scores = None
        if entries is not None:
            scores = logprobs.completion(engine.prompts, entries, sent[index])
            sent[index] += len(text)
        choice = CompletionChoice(index=index, text=text, logprobs=scores, finish_reason=finish)
        return Completion(**reply.envelope, choices=[] if last else [choice], usage=usage)

    if body.stream:
        return await _stream(request, choices, body, chunk, first=None)
    finished = await _finished(request, choices)
    usage = _usage([one.final for one in finished])
    if best_of > body.n:
        finished = _best(finished, body.n)
    asked = body.logprobs is not None
    parts = [
        chunk(one.whole.text, one.finish, entries=one.whole.logprobs if asked else None, index=index)
        for index, one in enumerate(finished)
    ]
    return _json(Completion(**reply.envelope, choices=[part.choices[0] for part in parts], usage=usage))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
    engine = engine_for(request)
    ids = await engine.prompts.off_loop(_chat_ids, engine.prompts, body.messages)
    params = _sampling_params(body, len(ids), engine.prompts.max_seq_len)
    await check_format(engine, params.response_format, 400)
    choices = admit_choices(request, engine, ids, _choice_params(params, body.n))
    reply = _Reply(f"chatcmpl-{choices.request_id}", body.model)

    def chunk(
        text: str,
        finish: Finish | None,
        usage: Usage | None = None,
        last: bool = False,
        entries: list[TokenLogprobs] | None = None,
        index: int = 0,
    ) -> BaseModel:
        delta = ChatDelta() if finish is not None else ChatDelta(content=text)
        scores = None if entries is None else logprobs.chat(engine.prompts, entries)
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=scores, finish_reason=finish)
        return ChatCompletionChunk(**reply.envelope, choices=[] if last else [choice], usage=usage)

    if body.stream:
        hello = [
            ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""), finish_reason=None)
            for index in range(body.n)
        ]
        opening = [ChatCompletionChunk(**reply.envelope, choices=[choice]) for choice in hello]
        return await _stream(request, choices, body, chunk, first=opening)
    finished = await _finished(request, choices)
    parts = []
    for index, one in enumerate(finished):
        entries = one.whole.logprobs
        scores = None if entries is None else logprobs.chat(engine.prompts, entries)
        message = AssistantMessage(content=one.whole.text)
        parts.append(ChatChoice(index=index, message=message, logprobs=scores, finish_reason=one.finish))
    usage = _usage([one.final for one in finished])
    return _json(ChatCompletion(**reply.envelope, choices=parts, usage=usage))


def _output_format(body: _SamplingFields) -> OutputFormat | None:
    if body.response_format is None:
        return None
    try:
        return body.response_format.output_format()
    except ValueError as err:
        raise ClientError(400, f"response_format.{err}", "response_format") from err


def _choice_params(params: SamplingParams, count: int) -> list[SamplingParams]:
    """Each choice's parameters: with a seed, choice i's is seed + i (each reproducible alone)."""
    if count == 1 or params.seed is None:
        return [params] * count
    return [params.model_copy(update={"seed": (params.seed + i) % (MAX_SEED + 1)}) for i in range(count)]


def _best(finished: list[_Finished], n: int) -> list[_Finished]:
    """The `n` choices whose tokens' log-probabilities sum highest, best first."""

    def score(choice: _Finished) -> float:
        return sum(entry.logprob for entry in choice.whole.logprobs or [])

    return sorted(finished, key=score, reverse=True)[:n]


async def models(request: web.Request) -> web.Response:
    card = ModelCard(id=served_model(request.app), created=request.app[STARTED_KEY], owned_by=OWNER)
    return _json(ModelList(data=[card]))


def prepare(app: web.Application) -> None:
    """The time /v1/models reports as the model's creation: when the app was made."""
    app[STARTED_KEY] = int(time.time())


STREAM_TEXT = """\
Server-sent events, as OpenAI sends them: `data: <chunk>` lines (a Completion with one choice per
chunk on /v1/completions, a ChatCompletionChunk on /v1/chat/completions), then, with
`stream_options.include_usage`, a chunk with no choices and the usage, then `data: [DONE]`. A
generation that fails after the stream began sends an ErrorResponse as a data line before
`[DONE]`."""
ERRORS = (400, 401, 404, 408, 413, 415, 503, 504)


def _generation_responses(reply: type[BaseModel]) -> Callable[[Refs], dict[str, Any]]:
    def responses(ref: Refs) -> dict[str, Any]:
        events = sse(["message"], "JSON: a chunk or an ErrorResponse; the last event is [DONE].")
        content = {"application/json": {"schema": ref(reply)}, "text/event-stream": events}
        description = "With `stream: false`, the whole reply. " + STREAM_TEXT
        return {
            "200": {"description": description, "content": content},
            **errors(ERRORS, ref(ErrorResponse)),
            "500": json_content(ref(ErrorResponse), ERROR_TEXT[500]),
        }

    return responses


ROUTES = (
    Route(
        "POST",
        "/v1/completions",
        completions,
        "Complete a prompt",
        "OpenAI-compatible",
        _generation_responses(Completion),
        request=CompletionRequest,
        replies=(Completion, ErrorResponse),
    ),
    Route(
        "POST",
        "/v1/chat/completions",
        chat_completions,
        "Reply to a conversation (built with the model's chat template)",
        "OpenAI-compatible",
        _generation_responses(ChatCompletion),
        request=ChatCompletionRequest,
        replies=(ChatCompletion, ChatCompletionChunk, ErrorResponse),
    ),
    Route(
        "GET",
        "/v1/models",
        models,
        "The served model",
        "OpenAI-compatible",
        lambda ref: {"200": json_content(ref(ModelList)), **errors((401,), ref(ErrorResponse))},
        replies=(ModelList, ErrorResponse),
    ),
)


# ---------------------------------------------------------------- writing responses


class _Reply:
    """What every chunk of one reply repeats: its id, creation time and model."""

    def __init__(self, reply_id: str, model: str) -> None:
        self.envelope: dict[str, Any] = {"id": reply_id, "created": int(time.time()), "model": model}


ChunkBuilder = Callable[..., BaseModel]


def _json(model: BaseModel) -> web.Response:
    return web.json_response(model.model_dump(mode="json"))


def _usage(finals: list[RequestOutput]) -> Usage:
    """A request's usage over its choices' final outputs: the prompt once (and what the prefix cache held
    of it when the first choice came), the tokens every choice generated."""
    first = finals[0].usage
    prompt = first["prompt_tokens"]
    completion = sum(final.usage["completion_tokens"] for final in finals)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=first.get("cached_tokens", 0)),
    )


@dataclass
class _Finished:
    """One choice's whole output, its final output and OpenAI's finish reason."""

    whole: Gathered
    final: RequestOutput
    finish: Finish


async def _finished(request: web.Request, choices: Choices) -> list[_Finished]:
    """Each choice's whole output, in choice order; a generation that ended some other way (timeout,
    shutdown, failure) raises its error response (and cancels the others)."""

    async def one(stream: RequestStream) -> _Finished:
        whole = await gather(stream)
        final = whole.final
        if final is None:
            raise ClientError(503, "the engine stopped")
        if final.finish_reason not in FINISH_REASONS:
            raise _unfinished(final)
        return _Finished(whole, final, FINISH_REASONS[final.finish_reason])

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(stream)) for stream in choices.streams]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _unfinished(final: RequestOutput) -> ClientError:
    """The error for a generation that did not end with stop or length (timeout, shutdown, failure)."""
    status = UNFINISHED_STATUS.get(final.finish_reason or "", 500)
    message = final.error or {
        "timeout": "the request ran past its time limit",
        "shutdown": "the server is shutting down",
    }.get(final.finish_reason or "", f"generation ended: {final.finish_reason}")
    return ClientError(status, message)


class _TextChunks:
    """One stream's text chunks as JSON, built once for each choice as a template around the text: a
    token then costs one `json.dumps` of its text, not a pydantic model and its dump."""

    _MARK = "\x00text\x00"

    def __init__(self, encode: Callable[[BaseModel], str], chunk: ChunkBuilder) -> None:
        self._encode, self._chunk = encode, chunk
        self._templates: dict[int, tuple[str, str]] = {}

    def __call__(self, text: str, index: int = 0) -> str:
        template = self._templates.get(index)
        if template is None:
            whole = self._encode(self._chunk(self._MARK, None, index=index))
            before, _, after = whole.partition(json.dumps(self._MARK))
            template = self._templates[index] = (before, after)
        return template[0] + json.dumps(text) + template[1]


async def _stream(
    request: web.Request,
    choices: Choices,
    body: _SamplingFields,
    chunk: ChunkBuilder,
    first: Sequence[BaseModel] | None,
) -> web.StreamResponse:
    """`data:` chunks as the text comes (each choice's, as it comes), each choice's finishing chunk, the
    usage chunk if asked once all have finished, then [DONE]. A generation that fails after the headers
    went out sends OpenAI's error object before [DONE]."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def encode(model: BaseModel) -> str:
        data = model.model_dump(mode="json")
        if not include_usage:
            data.pop("usage", None)
        return json.dumps(data)

    text_chunk = _TextChunks(encode, chunk)

    async def write(response: EventSourceResponse) -> None:
        for opening in first or []:
            await response.send(encode(opening))
        finals: list[RequestOutput] = []
        async for index, output in choices:
            if output.logprobs is not None:  # asked for: whole chunks, with the tokens' entries
                if output.text or output.logprobs:
                    await response.send(
                        encode(chunk(output.text, None, entries=output.logprobs, index=index))
                    )
            elif output.text:
                await response.send(text_chunk(output.text, index))
            if not output.finished:
                continue
            if output.finish_reason in FINISH_REASONS:
                finals.append(output)
                finish = FINISH_REASONS[output.finish_reason or ""]
                await response.send(encode(chunk("", finish, index=index)))
                if include_usage and len(finals) == len(choices.streams):
                    await response.send(encode(chunk("", None, _usage(finals), last=True)))
            else:
                await response.send(_unfinished(output).response(request.path).text or "")
        await response.send("[DONE]")

    return await stream_events(request, choices, write)
