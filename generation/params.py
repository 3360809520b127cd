"""SamplingParams: one request's decoding parameters, validated once and frozen."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_STRINGS = 16
MAX_STOP_TOKENS = 64
MAX_LOGPROBS = 20  # alternatives a token's log-probabilities may list (OpenAI's top_logprobs limit)
MAX_SEED = 2**63 - 1
# top_k travels to the device as an int64; any k past the vocabulary means "all", so a bound this loose
# refuses nothing useful and keeps a huge number from failing the step of every row beside it.
MAX_TOP_K = 2**31 - 1

StopString = Annotated[str, Field(min_length=1, max_length=256)]
# Bounds both dialects share (their defaults and descriptions are their own).
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]
OpenAIPenalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # frequency and presence, as OpenAI bounds them
StopTokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKENS)]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class ResponseFormat(BaseModel):
    """What the output must be, followed token by token (each step's choice is masked to the tokens
    that keep the output valid)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["json_object", "json_schema", "regex", "grammar"] = Field(
        description="`json_object`: a JSON object; `json_schema`: an instance of `schema`; `regex`: a full "
        "match of `pattern`; `grammar`: a sentence of `grammar` (a Lark grammar, llguidance's dialect)."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, alias="schema", description="With `json_schema`: the JSON Schema."
    )
    pattern: str | None = Field(default=None, max_length=65536, description="With `regex`.")
    grammar: str | None = Field(default=None, max_length=1 << 20, description="With `grammar`.")

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        needed = {"json_schema": "json_schema", "regex": "pattern", "grammar": "grammar"}.get(self.type)
        if needed is not None and getattr(self, needed) is None:
            raise ValueError(f"type {self.type} needs {'schema' if needed == 'json_schema' else needed}")
        return self


class SamplingParams(BaseModel):
    """How one request is decoded. Every field is honoured by the engine; none is advisory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.8, ge=0.0, le=10.0, description="0 means greedy decoding.")
    top_p: float = Field(default=0.75, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(
        default=40, ge=0, le=MAX_TOP_K, description="Keep the k most likely tokens; 0 disables."
    )
    max_new_tokens: int = Field(default=250, ge=1, description="Upper bound on generated tokens.")
    min_new_tokens: int = Field(default=0, ge=0, description="End-of-sequence is ignored before this many.")
    stop: list[StopString] = Field(
        default_factory=list,
        max_length=MAX_STOP_STRINGS,
        description="Strings that end generation; they are never emitted.",
    )
    repetition_penalty: RepetitionPenalty = Field(
        default=1.0,
        description="Divides positive and multiplies negative logits of every token in the prompt or "
        "the output so far (as transformers does); 1.0 disables.",
    )
    frequency_penalty: OpenAIPenalty = Field(
        default=0.0,
        description="Subtracted from a token's logit once for each time it is in the output so far "
        "(OpenAI's definition); 0 disables.",
    )
    presence_penalty: OpenAIPenalty = Field(
        default=0.0,
        description="Subtracted from a token's logit if it is in the output so far (OpenAI's definition); "
        "0 disables.",
    )
    stop_token_ids: StopTokenIds = Field(
        default_factory=list,
        description="Token ids that end generation as end-of-sequence does (once min_new_tokens are "
        "made); the token's text is kept unless it is a special token.",
    )
    ignore_eos: bool = Field(
        default=False, description="End-of-sequence does not end generation: only max_new_tokens does."
    )
    logprobs: LogprobCount | None = Field(
        default=None,
        description="Report each generated token's log-probability and this many most likely "
        "alternatives' (0: the token's only), from the model's distribution before temperature and "
        "penalties; null: none.",
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="The same seed gives the same text, whatever the batch."
    )
    response_format: ResponseFormat | None = Field(
        default=None,
        description="What the output must be (JSON, JSON Schema, a regular expression, a grammar).",
    )

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if self.min_new_tokens > self.max_new_tokens:
            limit = f"max_new_tokens ({self.max_new_tokens})"
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed {limit}")
        return self
