"""Typed messages that cross the thread boundary between the event loop and the engine thread."""

from __future__ import annotations

from dataclasses import dataclass, field

from trickle.generation.params import SamplingParams


@dataclass(frozen=True)
class AddRequest:
    """Event loop -> engine: start generating for a tokenized prompt."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival_time: float
    deadline: float | None = None
    """time.monotonic() after which the request ends with finish_reason `timeout`."""
    label: str = ""
    """What logs call the request (the client's request id, say); `request_id` is the engine's key."""
    resumable: bool = False
    """Its client may come back for it (the engine's process keeps its tokens: generation/resume.py)."""
    credential: str = ""
    """Of the API key that opened it (a digest): only that key may resume it."""


@dataclass(frozen=True)
class AbortRequest:
    """Event loop -> engine: free the row. The caller went away (the request ends `cancelled`), or, with
    `stop_at`, its text reached a stop string at that many generated tokens (it ends `stop`)."""

    request_id: str
    stop_at: int | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A generated token's log-probability under the model's distribution (before temperature and
    penalties), and the most likely tokens' (as many as the request asked for), most likely first."""

    token: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class Ending:
    """How a request ended, on the output that ends it (keywords only; None while it goes on)."""

    finish_reason: str | None = field(default=None, kw_only=True)
    error: str | None = field(default=None, kw_only=True)
    usage: dict[str, int] = field(default_factory=dict, kw_only=True)
    timings: dict[str, float | None] = field(default_factory=dict, kw_only=True)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class TokenOutput(Ending):
    """Engine -> event loop: one request's new token, and how it ended once it has. Only the tokens the
    engine keeps count in `usage`; a final output may come without a token (a cancel, a timeout)."""

    request_id: str
    token: int | None
    logprobs: TokenLogprobs | None = None
    """The token's log-probabilities, where the request asked for them."""


@dataclass(frozen=True)
class RequestOutput(Ending):
    """What a request's stream yields: new text, and how it ended once it has."""

    request_id: str
    text: str
    logprobs: list[TokenLogprobs] | None = None
    """Where the request asked for them: the log-probabilities of the tokens counted since the last
    output, in order (the text of a token may come in a later output than its log-probabilities, when
    the detokenizer holds it back)."""


@dataclass(frozen=True)
class StepReport:
    """Engine -> event loop, once per step: the outputs of the step and the engine's load after it."""

    step: int
    outputs: list[TokenOutput]
    """Outputs that end a request (with its last token, if the step made one)."""
    num_running: int
    num_waiting: int
    decoded_rows: int = 0
    """Rows that got their next token this step (not their first): one inter-token interval each."""
    step_seconds: float = 0.0
    """Time since the previous step ended (or since this one began, after an idle spell)."""
    wait_seconds: float = 0.0
    """Of that, the time the engine thread waited for the device to finish the step; the rest is the
    host's work (scheduling, inputs, launching, reading the tokens back)."""
    decode_device_seconds: float = 0.0
    """The step's decode forward and sampling on the device (GPU only; 0 elsewhere)."""
    handoff_seconds: float = 0.0
    """How long the engine thread took to hand the previous report over (waking the event loop can
    cost it the loop's work, the two sharing the interpreter lock: bench/results/gil-handoff.md)."""
    kv_tokens: int = 0
    """Positions of KV blocks that running rows hold."""
    prefix_queries: int = 0
    """Tokens looked up in the prefix cache so far (a running total)."""
    prefix_hits: int = 0
    """Of those, tokens found (a running total)."""
    preemptions: int = 0
    """Rows preempted for lack of KV blocks so far (a running total)."""
    ids: list[str] = field(default_factory=list)
    """Requests that got a token this step and go on; `tokens` holds their tokens, in the same order
    (two flat lists: no object a row)."""
    tokens: list[int] = field(default_factory=list)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    """The log-probabilities of the tokens in `tokens` whose requests asked for them."""
