"""Scheduler: the waiting and running queues, admission limits, and slot bookkeeping. No tensors here."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from trickle.generation.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int
    """Most rows running at once; also the number of KV cache slots."""
    prefill_token_budget: int
    """Most prompt tokens prefilled in one step, counting the padding up to the longest newcomer (the
    first admission of a step always goes through)."""
    packable: Callable[[int, int], bool] | None = None
    """Whether n newcomers, the longest of so many tokens, can join the running rows' decode step (a
    packed step); None where the model cannot pack."""


@dataclass
class ScheduledBatch:
    """What one engine step runs.

    `moves` are (src, dst) slot copies the KV cache must make before running, to keep the running rows
    in slots 0..n-1. `decode` rows hold slots 0..len(decode)-1 in order; `prefill` rows take the
    following slots in order. Every running row is in exactly one of the two lists.
    """

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[Sequence] = field(default_factory=list)
    moves: list[tuple[int, int]] = field(default_factory=list)

    @property
    def rows(self) -> list[Sequence]:
        """All rows of the step in slot order: the order of the step's logits."""
        return self.decode + self.prefill

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    """Decides, each step, which requests run.

    Only the engine thread calls it. `add` queues a new sequence; `abort` marks one cancelled (it leaves
    at the next `schedule`). `schedule` drops every finished row and every row whose last token is already
    launched, compacts slots, and admits waiting sequences in arrival order while there are free rows and
    prefill budget.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __iter__(self) -> Iterator[Sequence]:
        yield from self.running
        yield from self.waiting

    @property
    def num_running(self) -> int:
        """Rows generating now; a row that finished this step still holds its slot until the next."""
        return sum(not seq.is_finished for seq in self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        return next((seq for seq in self if seq.request_id == request_id), None)

    def abort(self, request_id: str) -> Sequence | None:
        """Mark a live sequence cancelled; it leaves at the next `schedule`. Returns it, if it was live."""
        seq = self.find(request_id)
        if seq is None or seq.is_finished:
            return None
        seq.finish(Status.CANCELLED)
        return seq

    def expire(self, now: float) -> list[Sequence]:
        """Mark every live sequence whose deadline has passed as timed out; they leave at `schedule`."""
        expired = [
            seq for seq in self if seq.deadline is not None and seq.deadline <= now and not seq.is_finished
        ]
        for seq in expired:
            seq.finish(Status.TIMEOUT)
        return expired

    @property
    def kv_tokens(self) -> int:
        return sum(seq.num_tokens for seq in self.running if not seq.is_finished)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self.waiting = deque(seq for seq in self.waiting if not seq.is_finished)
        self._drop_finished_running(batch.moves)
        batch.decode = list(self.running)
        batch.prefill = self._admit()
        return batch

    def _drop_finished_running(self, moves: list[tuple[int, int]]) -> None:
        """Remove rows that are finished or need no further step (their last token is in flight); live
        rows beyond the new count move into the holes, so slots stay 0..n-1."""
        finished = [seq for seq in self.running if seq.is_finished or seq.fully_launched]
        if not finished:
            return
        live = [seq for seq in self.running if not (seq.is_finished or seq.fully_launched)]
        holes = sorted(seq.slot for seq in finished if seq.slot < len(live))
        movers = sorted((seq for seq in live if seq.slot >= len(live)), key=lambda seq: seq.slot)
        for seq, hole in zip(movers, holes, strict=True):
            moves.append((seq.slot, hole))
            seq.slot = hole
        self.running = sorted(live, key=lambda seq: seq.slot)

    def _admit(self) -> list[Sequence]:
        # Newcomers are prefilled together, padded to the longest: they cost rows x longest tokens.
        admitted: list[Sequence] = []
        longest = 0
        fits = self._packed_limit() or self._within_budget
        while self.waiting and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            if admitted and not fits(len(admitted) + 1, max(longest, seq.num_prompt_tokens)):
                break
            self.waiting.popleft()
            longest = max(longest, seq.num_prompt_tokens)
            seq.slot = len(self.running)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _within_budget(self, rows: int, longest: int) -> bool:
        return rows * longest <= self.config.prefill_token_budget

    def _packed_limit(self) -> Callable[[int, int], bool] | None:
        """While rows are decoding, the newcomers that could join now (one per free row) join them in a
        packed step, if they all fit in one. When they do not, a prefill step of their own takes them
        in together: one packed step after another would keep the last of them waiting."""
        packable = self.config.packable
        if packable is None or not self.running or not self.waiting:
            return None
        joining = list(itertools.islice(self.waiting, self.config.max_batch_size - len(self.running)))
        if not joining:
            return None
        longest = max(seq.num_prompt_tokens for seq in joining)
        return packable if packable(len(joining), longest) else None
