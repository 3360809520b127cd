"""The native routes' bodies as pydantic models: what the handlers validate and what /openapi.json
documents."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from trickle.generation import SamplingParams

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


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    running: int = Field(description="Requests generating now.")
    waiting: int = Field(description="Requests queued for a row.")


class NativeErrorDetail(BaseModel):
    status: int
    message: str
    field: str | None = Field(default=None, description="The request field at fault, where one is.")


class NativeError(BaseModel):
    """The error body of every route outside /v1/."""

    error: NativeErrorDetail
