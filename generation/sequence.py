"""Sequence: one request's state inside the engine, from arrival to its finish reason."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from trickle.generation.params import SamplingParams


class Status(enum.Enum):
    """Where a sequence is. WAITING and RUNNING are live; every other status is final."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_LENGTH = "finished_length"
    FINISHED_EOS = "finished_eos"
    FINISHED_STOP = "finished_stop"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    ERROR = "error"


FINISH_REASONS: dict[Status, str] = {
    Status.FINISHED_LENGTH: "length",
    Status.FINISHED_EOS: "eos",
    Status.FINISHED_STOP: "stop",
    Status.CANCELLED: "cancelled",
    Status.TIMEOUT: "timeout",
    Status.SHUTDOWN: "shutdown",
    Status.ERROR: "error",
}


@dataclass(eq=False)
class Sequence:
    """A request as the engine sees it: its tokens, its row and KV blocks, and its timings."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    """The row's place in the running batch (and in the runner's per-row tables); -1 while waiting."""
    blocks: list[int] = field(default_factory=list)
    """The KV blocks holding the row's positions, in order (shared ones read-only)."""
    block_keys: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the row's full blocks of known tokens, as far as computed."""
    num_cached: int = 0
    """Leading tokens found in the prefix cache at the row's last admission: its prefill skips them."""
    cached_prompt_tokens: int = 0
    """Prompt tokens found in the prefix cache at the first admission (what usage reports)."""
    preemptions: int = 0
    """Times the row gave its blocks back for lack of room and went back to the queue."""
    admission: int = 0
    """The scheduler's count of admissions at the row's last one: the most recent are preempted first."""
    deadline: float | None = None
    admitted_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None
    launched: int = 0
    """Tokens the runner has been asked to produce; one more than `output_ids` while a step is in flight."""
    row_index: int = -1
    """The row's index in the last step it was launched in (where its newest token lands)."""
    label: str = ""
    """What logs call the request; `request_id` is the engine's key."""
    matcher: Any = None
    """The grammar the output follows (an llguidance matcher at the output's end so far), if any."""
    prefill_end: int = 0
    """Where the chunk of a long prompt that its step prefills ends (a chunked prefill: one chunk a step,
    each read back from the prefix cache by the next); 0 where the step prefills to the last token."""
    chunked: bool = False
    """Its prompt is prefilled in chunks (it was admitted for a chunk at least once)."""

    @property
    def log_name(self) -> str:
        return self.label or self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_completion_tokens

    @property
    def tokens(self) -> list[int]:
        """Every known token: the prompt, then what was generated."""
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def prefill_to(self) -> int:
        """The tokens the row's cache holds once its prefill has run."""
        return self.prefill_end or self.num_tokens

    @property
    def is_partial(self) -> bool:
        """Its step prefills a chunk of its prompt, not to the end: that step's token is not its own."""
        return 0 < self.prefill_end < self.num_tokens

    @property
    def in_flight(self) -> bool:
        """A launched step holds this row's next token; the host has not seen it yet."""
        return self.launched > len(self.output_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the row's KV cache once its launched steps have run."""
        return self.num_prompt_tokens + self.launched

    @property
    def fully_launched(self) -> bool:
        """Every token the row may produce has been launched: it needs no further step."""
        return self.launched >= self.params.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def finish(self, status: Status, error: str | None = None) -> None:
        self.status = status
        self.error = error
        self.finished_time = time.monotonic()

    def timings_ms(self) -> dict[str, float | None]:
        def since_arrival(moment: float | None) -> float | None:
            return None if moment is None else round((moment - self.arrival_time) * 1000.0, 3)

        return {
            "queue_ms": since_arrival(self.admitted_time),
            "ttft_ms": since_arrival(self.first_token_time),
            "total_ms": since_arrival(self.finished_time),
        }
