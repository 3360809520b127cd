"""Scheduler: the waiting and running queues, admission by rows, prefill budget and KV blocks, the
prefix cache's lookups, and preemption when blocks run out. No tensors here."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from trickle.generation.kv.blocks import BlockPool, block_keys
from trickle.generation.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int
    """Most rows running at once."""
    prefill_token_budget: int
    """Most prompt tokens prefilled in one step, counting the padding the runner adds (`prefill_size`;
    the first admission of a step always goes through)."""
    num_blocks: int
    """KV blocks in the pool, the null block included."""
    block_size: int = 16
    """Positions a KV block holds."""
    prefix_caching: bool = True
    """Reuse cached blocks of a prompt's leading tokens instead of prefilling them again."""
    prefill_read_budget: int | None = None
    """Most positions one prefill step reads: newcomers x the longest one's tokens, cached ones included
    (the first admission of a step always goes through); None: no limit."""
    prefill_size: Callable[[int, int], int] | None = None
    """The tokens a prefill of (newcomers, the longest one's uncached tokens) runs as, padding included
    (the runner pads to the shapes it captured); None: newcomers x longest."""
    prefill_pacing: float = 0.0
    """While rows decode, a step prefills apart only the tokens that keep it within this many times a
    decode part's time, as the steps measure them (`PrefillPacing`); mixed newcomers are bounded by
    `mixed_prefill_tokens` instead. 0: every step up to the token budget."""
    mixed_prefill_tokens: int = 0
    """While rows decode, a step's newcomers run inside the decoding rows' own forward (one read of the
    weights for both), up to this many prompt tokens in all, which is then the step's prefill budget;
    0: newcomers always prefill in a forward of their own."""
    mixed_read_limit: int | None = None
    """Most positions a step's mixed newcomers' tokens may read in all (a token at position p reads
    p + 1, as a decoding row does): past it their reads cost more than a forward of their own (a
    newcomer beyond it prefills apart); None: no limit."""


@dataclass
class PrefillPacing:
    """How many prompt tokens a step may prefill beside rows that decode, so that it takes at most
    `stall` times a step that only decodes: every decoding row waits for the step's prefill, and a
    stream's gap between two tokens is that step's whole time.

    Learnt from the steps themselves. The decode part's time is a moving average. A prefill's time is
    modelled as a fixed part (a forward reads every weight once, however few its tokens) plus a part
    per token (padding included), fitted by least squares over the moving average of each size seen
    (the sizes are the runner's padded shapes: few, each measured again as it recurs). A model that
    charged the fixed part to each token would make every prefill as small as one newcomer, and pay
    the fixed part every step. No limit until the decode part and a prefill are measured."""

    stall: float
    decode_seconds: float = 0.0
    by_size: dict[int, float] = field(default_factory=dict)
    """A moving average of the prefill part's seconds for each size (tokens) it ran as."""
    fixed_seconds: float = 0.0
    token_seconds: float = 0.0

    WEIGHT = 0.25  # of the newest step in the averages
    SIZES = 64  # sizes remembered, the least recently run forgotten first

    def observe(
        self, decode_rows: int, decode_seconds: float, prefill_tokens: int, prefill_seconds: float
    ) -> None:
        if not self.stall:  # off: nothing to learn
            return
        if decode_rows and decode_seconds > 0:
            self.decode_seconds = self._average(self.decode_seconds, decode_seconds)
        if prefill_tokens and prefill_seconds > 0:
            seconds = self._average(self.by_size.pop(prefill_tokens, 0.0), prefill_seconds)
            self.by_size[prefill_tokens] = seconds
            if len(self.by_size) > self.SIZES:
                del self.by_size[next(iter(self.by_size))]
            self.fixed_seconds, self.token_seconds = self._fit()

    def _average(self, average: float, value: float) -> float:
        return value if not average else average + self.WEIGHT * (value - average)

    def _fit(self) -> tuple[float, float]:
        """(fixed seconds, seconds a token) of a line through the sizes' times; with one size, or a
        line that does not rise, no fixed part: all of a prefill's time counted per token."""
        count = len(self.by_size)
        mean_x = sum(self.by_size) / count
        mean_y = sum(self.by_size.values()) / count
        spread = sum((x - mean_x) ** 2 for x in self.by_size)
        if count > 1 and spread > 0:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in self.by_size.items()) / spread
            fixed = mean_y - slope * mean_x
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, mean_y / mean_x

    def budget(self) -> int | None:
        """The prefill tokens a step with decoding rows may run; None where pacing sets no limit."""
        if not self.stall or not (self.decode_seconds and self.token_seconds):
            return None
        spare = (self.stall - 1) * self.decode_seconds - self.fixed_seconds
        return max(0, int(spare / self.token_seconds))


@dataclass
class ScheduledBatch:
    """What one engine step runs.

    `moves` are (src, dst) row moves the runner's per-row tables must make before running, to keep the
    running rows in rows 0..n-1. `decode` rows hold rows 0..len(decode)-1 in order; `prefill` rows take
    the following rows in order, the first `mixed` of them prefilled inside the decode rows' forward.
    Every running row is in exactly one of the two lists. `preempted` rows gave their blocks back this
    step and wait again.
    """

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[Sequence] = field(default_factory=list)
    moves: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    mixed: int = 0
    """The leading `prefill` rows whose uncached tokens run in the decode rows' forward."""
    logprobs: bool = False
    """Some row asked for log-probabilities."""
    constrained: bool = False
    """Some row follows a grammar."""

    @property
    def rows(self) -> list[Sequence]:
        """All rows of the step in row order: the order of the step's logits."""
        return self.decode + self.prefill

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    """Decides, each step, which requests run.

    Only the engine thread calls it. `add` queues a new sequence; `abort` marks one cancelled (it leaves
    at the next `schedule`). `schedule` drops every finished row and every row whose last token is
    already launched (their blocks go back to the pool, their full blocks into the prefix cache), gives
    each running row the block its next position needs (preempting the most recently admitted rows
    when the pool has none left), compacts rows, and admits waiting sequences in arrival order while
    there are free rows, prefill budget and blocks. While rows decode, newcomers run inside their
    forward (`mixed_prefill_tokens`, which is then the step's prefill budget; those it cannot take
    prefill apart, within what `pacing` allows), and a prompt longer than the budget is
    admitted for a chunk (`Sequence.prefill_end`): that step's token is not the row's, and the next
    `schedule` puts the row back at the head of the queue, its chunk's blocks in the prefix cache, for
    the next chunk.

    A preempted row goes back to the head of the queue with every token it has streamed; re-admitted,
    it prefills its prompt and those tokens again (mostly from the prefix cache) and goes on from there.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.pool = BlockPool(config.num_blocks, config.block_size, config.prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found
        self.preemptions = 0
        self.pacing = PrefillPacing(config.prefill_pacing)
        # Running rows that asked for log-probabilities, and that follow grammars: a step asks the rows
        # only where some do.
        self._asking = self._constrained = 0
        self._admissions = 0
        # Prompt blocks of the last step's newcomers: findable from the next step on, once the step
        # that writes them is queued (a block is never shared while it is being written).
        self._fresh: list[tuple[Sequence, list[int], list[bytes]]] = []
        # Rows admitted for a chunk of their prompt (at most one a step): back to the queue next step.
        self._chunking: list[Sequence] = []

    def __iter__(self) -> Iterator[Sequence]:
        yield from self.running
        yield from self.waiting

    @property
    def num_running(self) -> int:
        """Rows generating now; a row that finished this step still holds its row until the next."""
        return sum(not seq.is_finished for seq in self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_tokens(self) -> int:
        """Positions in blocks that rows hold (cached blocks nobody holds not counted)."""
        return self.pool.num_held * self.config.block_size

    @property
    def kv_capacity(self) -> int:
        return self.pool.num_usable * self.config.block_size

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        return next((seq for seq in self if seq.request_id == request_id), None)

    def abort(self, request_id: str, status: Status = Status.CANCELLED) -> Sequence | None:
        """Finish a live sequence with `status`; it leaves at the next `schedule`. Returns it, if it was
        live."""
        seq = self.find(request_id)
        if seq is None or seq.is_finished:
            return None
        seq.finish(status)
        return seq

    def expire(self, now: float) -> list[Sequence]:
        """Mark every live sequence whose deadline has passed as timed out; they leave at `schedule`."""
        expired = [
            seq for seq in self if seq.deadline is not None and seq.deadline <= now and not seq.is_finished
        ]
        for seq in expired:
            seq.finish(Status.TIMEOUT)
        return expired

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        for _, blocks, keys in self._fresh:
            self.pool.register(blocks, keys)
        self._fresh = []
        self.waiting = deque(seq for seq in self.waiting if not seq.is_finished)
        # Rows whose last step prefilled a chunk of their prompt go back to the head of the queue, their
        # chunks' blocks in the prefix cache: `_admit` takes them first and prefills the next chunk.
        chunked, self._chunking = [seq for seq in self._chunking if not seq.is_finished], []
        for seq in chunked:
            self._requeue(seq)
        if chunked:
            self.running = [seq for seq in self.running if seq not in chunked]
        leaving = [seq for seq in self.running if seq.is_finished or seq.fully_launched]
        for seq in leaving:
            self._release(seq)
        live = [seq for seq in self.running if not (seq.is_finished or seq.fully_launched)]
        leaving += chunked
        batch.preempted = self._grow(live)
        self._compact(live, leaving + batch.preempted, batch.moves)
        batch.decode = list(self.running)
        batch.prefill, batch.mixed = self._admit()
        batch.logprobs, batch.constrained = self._asking > 0, self._constrained > 0
        return batch

    # ------------------------------------------------------------ blocks

    def _blocks_for(self, positions: int) -> int:
        return -(-positions // self.config.block_size)

    def _grow(self, live: list[Sequence]) -> list[Sequence]:
        """Give every live row the blocks for the position its next step writes, oldest rows first;
        when none are left, the most recently admitted rows give theirs back (possibly the row asking).
        Returns the rows preempted; `live` keeps the others."""
        preempted: list[Sequence] = []
        by_age = sorted(live, key=lambda seq: seq.admission)
        index = 0
        while index < len(by_age):
            seq = by_age[index]
            # The next step writes position context_len - 1 (the token it feeds).
            missing = self._blocks_for(seq.context_len) - len(seq.blocks)
            if missing <= 0:
                index += 1
            elif self.pool.can_allocate(missing):
                seq.blocks += self.pool.allocate(missing)
                index += 1
            else:
                youngest = by_age.pop()
                self._preempt(youngest)
                preempted.append(youngest)
                live.remove(youngest)
        return preempted

    def _preempt(self, seq: Sequence) -> None:
        self._requeue(seq)  # the youngest goes first, so older rows end up ahead of it
        seq.preemptions += 1
        self.preemptions += 1

    def _requeue(self, seq: Sequence) -> None:
        """A running row gives its blocks back and waits again, at the head of the queue."""
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _count(self, seq: Sequence, sign: int) -> None:
        self._asking += sign * (seq.params.logprobs is not None)
        self._constrained += sign * (seq.matcher is not None)

    def _release(self, seq: Sequence) -> None:
        """The row's blocks go back to the pool; its full blocks of written tokens stay findable in the
        prefix cache (a preempted row finds its own there when it comes back)."""
        self._count(seq, -1)
        size = self.config.block_size
        # Once its launched steps run, a row's cache holds its prompt and every token fed since (each
        # step feeds the token the one before made; the host knows them all, the newest one aside); a
        # row whose step prefilled a chunk, its prompt up to the chunk's end.
        if seq.is_partial:
            written = seq.prefill_end
        else:
            written = seq.num_prompt_tokens + seq.launched - 1 if seq.launched else 0
        full = 0 if seq.status is Status.ERROR else written // size
        seq.block_keys = block_keys(seq.tokens[: full * size], size, seq.block_keys[:full])
        self.pool.register(seq.blocks[:full], seq.block_keys)
        self.pool.release(seq.blocks)
        seq.blocks = []

    def forget(self, seq: Sequence) -> None:
        """The row's step failed: the blocks it was to write (not those it found cached) leave the prefix
        cache, so no later request reads what was never written."""
        self._fresh = [fresh for fresh in self._fresh if fresh[0] is not seq]
        self.pool.forget(seq.blocks[seq.num_cached // self.config.block_size :])

    # ------------------------------------------------------------ rows

    def _compact(self, live: list[Sequence], gone: list[Sequence], moves: list[tuple[int, int]]) -> None:
        """Live rows past the new count move into the rows that `gone` left, so rows stay 0..n-1."""
        holes = sorted(seq.slot for seq in gone if 0 <= seq.slot < len(live))
        movers = sorted((seq for seq in live if seq.slot >= len(live)), key=lambda seq: seq.slot)
        for seq, hole in zip(movers, holes, strict=True):
            moves.append((seq.slot, hole))
            seq.slot = hole
        for seq in gone:
            seq.slot = -1
        self.running = sorted(live, key=lambda seq: seq.slot)

    def _admit(self) -> tuple[list[Sequence], int]:
        """Admit waiting sequences while rows, budget and blocks allow; returns them and how many of
        them (the first ones) run inside the decode rows' forward."""
        admitted: list[Sequence] = []
        # Keys of the full blocks this step's newcomers write: a newcomer whose next uncached block is
        # one of them waits a step and finds it cached (n choices of one prompt, say, prefill it once).
        writing: set[bytes] = set()
        # Newcomers prefilled apart are padded to the longest: they cost rows x longest tokens. Mixed
        # ones cost their own tokens, and their reads of what they attend to.
        longest = longest_read = 0
        mixed = mixed_tokens = mixed_reads = 0
        size = self.config.block_size
        read_budget = self.config.prefill_read_budget
        prefill_size = self.config.prefill_size or (lambda rows, width: rows * width)
        token_budget = self.config.prefill_token_budget
        mixing = bool(self.running) and self.config.mixed_prefill_tokens > 0
        if mixing:
            token_budget = min(token_budget, self.config.mixed_prefill_tokens)
        # Pacing bounds the prefills run apart (it learns their cost: a forward of their own each).
        paced = self.pacing.budget() if self.running else None
        if paced is None:
            paced = token_budget
        chunk_budget = token_budget if mixing else min(token_budget, paced)
        while self.waiting and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            if seq.in_flight:  # preempted with a token on its way: it comes back once that is seen
                break
            tokens = seq.tokens
            seq.block_keys = block_keys(tokens, size, seq.block_keys)
            # At least one token is prefilled: its hidden state gives the next token.
            reusable = (len(tokens) - 1) // size
            found = self.pool.match(seq.block_keys, reusable)
            if len(found) < reusable and seq.block_keys[len(found)] in writing:
                self.pool.release(found)
                break
            cached = len(found) * size
            # A prompt longer than the budget, coming while rows decode, is prefilled a chunk a step
            # (whole blocks; each chunk's blocks are found in the prefix cache by the next), so no step
            # holds the decoding rows back for all of it.
            end = 0
            if not admitted and self.running and self.config.prefix_caching:
                chunk = max(size, chunk_budget // size * size)
                if cached + chunk < len(tokens):
                    end = cached + chunk
            upto = end or len(tokens)
            new = upto - cached
            reading = new * (cached + 1 + upto) // 2  # its tokens at positions p read p + 1 positions each
            # Mixed while every newcomer before it is, and within the mixed tokens and reads.
            mixes = (
                mixing
                and mixed == len(admitted)
                and mixed_tokens + new <= self.config.mixed_prefill_tokens
                and (
                    self.config.mixed_read_limit is None
                    or mixed_reads + reading <= self.config.mixed_read_limit
                )
            )
            width = longest if mixes else max(longest, new)
            apart = len(admitted) - mixed + (not mixes)
            reads = longest_read if mixes else max(longest_read, upto)
            needed = self._blocks_for(upto) - len(found)
            # Room for running rows to grow into: a block each, up to 1% of the pool.
            reserve = min(len(self.running), self.pool.num_usable // 100)
            apart_tokens = prefill_size(apart, width) if apart else 0
            fits_budget = not admitted or (
                mixed_tokens + mixes * new + apart_tokens <= token_budget
                and apart_tokens <= paced
                and (read_budget is None or apart * reads <= read_budget)
            )
            if not fits_budget or not self.pool.can_allocate(needed, reserve):
                self.pool.release(found)
                break
            self.waiting.popleft()
            self._admissions += 1
            seq.admission = self._admissions
            seq.blocks = found + self.pool.allocate(needed)
            full = upto // size
            self._fresh.append((seq, seq.blocks[:full], seq.block_keys[:full]))
            if self.config.prefix_caching:
                writing.update(seq.block_keys[len(found) : full])
            seq.num_cached = cached
            if not seq.prefill_end:  # a chunked prompt is looked up (and reported) at its first chunk
                if seq.preemptions == 0:
                    seq.cached_prompt_tokens = cached
                self.prefix_queries += len(tokens)
                self.prefix_hits += cached
            seq.prefill_end = end
            if end:
                seq.chunked = True
                self._chunking.append(seq)
            if mixes:
                mixed, mixed_tokens, mixed_reads = mixed + 1, mixed_tokens + new, mixed_reads + reading
            longest, longest_read = width, reads
            seq.slot = len(self.running)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._count(seq, 1)
            admitted.append(seq)
        return admitted, mixed
