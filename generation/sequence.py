"""Sequence: one request's state inside the engine, from arrival to its finish reason."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from trickle.generation.detokenizer import IncrementalDetokenizer
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
    """A request as the engine sees it: its tokens, its slot in the KV cache, and its timings."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    detokenizer: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
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
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

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
