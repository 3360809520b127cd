"""The runner's fixed-address inputs, refilled each step with few host-to-device copies: the decode
step's per-row inputs and sampling parameters, a prefill's tokens, and the rows' block tables."""

from __future__ import annotations

import itertools
import time

import torch
from llguidance import LLExecutor, LLMatcher

from trickle.generation.kv.blocks import NULL_BLOCK
from trickle.generation.sampler import SamplingTensors
from trickle.generation.scheduler import ScheduledBatch
from trickle.generation.sequence import Sequence


class BlockTables:
    """The host's copy of the per-row block tables, updated for the rows that changed, and sent to the
    cache's device tables in a step where any did (rows 0..n-1, and rows left empty since the last
    step). Most decode steps change nothing: a row takes a new block every `block_size` tokens."""

    def __init__(self, device_tables: torch.Tensor) -> None:
        pinned = device_tables.device.type == "cuda"
        self.device_tables = device_tables
        self.host = torch.zeros(device_tables.shape, dtype=torch.long)
        self._staging = torch.zeros((2, *device_tables.shape), dtype=torch.long, pin_memory=pinned)
        self._turn = 0
        self._owners: list[list[int] | None] = [None] * device_tables.shape[0]  # each row's block list
        self._lengths = [0] * device_tables.shape[0]  # how much of it the host table has
        self._used = 0  # rows the device tables may have non-empty

    def update(self, batch: ScheduledBatch) -> None:
        changed = bool(batch.moves)
        for src, dst in batch.moves:
            self.host[dst] = self.host[src]
            self._owners[dst], self._lengths[dst] = self._owners[src], self._lengths[src]
        rows = batch.rows
        for row, seq in enumerate(rows):
            blocks = seq.blocks
            if self._owners[row] is not blocks:
                self._owners[row], self._lengths[row] = blocks, 0
                self.host[row].fill_(NULL_BLOCK)
                changed = True
            known = self._lengths[row]
            if len(blocks) > known:
                self.host[row, known : len(blocks)] = torch.tensor(blocks[known:])
                self._lengths[row] = len(blocks)
                changed = True
        for row in range(len(rows), self._used):
            self._owners[row], self._lengths[row] = None, 0
            self.host[row].fill_(NULL_BLOCK)
            changed = True
        count, self._used = max(len(rows), self._used), len(rows)
        if not changed:
            return
        self._turn ^= 1
        staging = self._staging[self._turn, :count]
        staging.copy_(self.host[:count])
        self.device_tables[:count].copy_(staging, non_blocking=True)


class StepInputs:
    """Fixed-address input buffers of the decode forward, kept on the device from step to step and
    updated for the rows that changed.

    Entry i < rows is batch row i (the last one the spare row, which prefill padding samples into).
    A step's forward runs its rows (0..n-1) and then, from entry n on, every token of its mixed
    newcomers but the last (which its own row feeds): each such entry says its token, its position and
    the table row whose blocks it writes and reads (`TABLE`, its newcomer's row). A newcomer's tokens
    see the ones before them of the same step in the step's own keys: each mixed entry (its row's too)
    says how many earlier positions of its newcomer the step adds (`EARLIER`) and the entry of the first
    of them (`FIRST`); the others follow it in order. Rows that decode add none.

    A row that decodes again in the row it held last step, one launched token on, is advanced on the
    device (its position and step count go up by one, and its token comes from the previous step's
    output, `feed_previous`); only the entries that changed (newcomers, rows moved into a hole, rows
    freed since the last step, mixed tokens) are written from the host, with two small host-to-device
    copies. The pinned host buffers are double-buffered: while one step's copies may still be queued
    on the device, the next step fills the other pair.
    """

    # Columns of the integer table, by name: the token in, its position, top_k, seed, step (tokens
    # launched), min_new_tokens (EOS is banned while step is below it), the row's index in the previous
    # step's output when its token comes from there (else -1), the earlier positions of its sequence the
    # step adds and the entry of the first of them, and the table row of its blocks.
    TOKEN, POSITION, TOP_K, SEED, STEP, MIN_NEW, SOURCE, EARLIER, FIRST, TABLE = range(10)
    LONGS = 10
    # Columns of the float table.
    TEMPERATURE, TOP_P, PENALTY, FREQUENCY, PRESENCE = range(5)
    FLOATS = 5

    def __init__(self, rows: int, mixed: int, max_len: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        entries = rows + mixed
        # A changed entry's index, then its integer inputs; and its float inputs.
        self._host_longs = torch.zeros(2, entries, 1 + self.LONGS, dtype=torch.long, pin_memory=pinned)
        self._host_floats = torch.zeros(2, entries, self.FLOATS, dtype=torch.float32, pin_memory=pinned)
        self._host_tokens = torch.zeros(2, rows, dtype=torch.long, pin_memory=pinned)
        self._turn = 0
        self.longs = torch.zeros(entries, self.LONGS, dtype=torch.long, device=device)
        self.floats = torch.zeros(entries, self.FLOATS, dtype=torch.float32, device=device)
        self._changed_longs = torch.zeros_like(self._host_longs[0], device=device)
        self._changed_floats = torch.zeros_like(self._host_floats[0], device=device)
        self.ids = self.longs[:, self.TOKEN : self.TOKEN + 1]
        self.positions = self.longs[:, self.POSITION : self.POSITION + 1]
        self.tables = self.longs[:, self.TABLE]
        self.earlier = self.longs[:, self.EARLIER]
        self.first = self.longs[:, self.FIRST]
        self.rows = torch.arange(rows, device=device)
        self.key_index = torch.arange(max_len, device=device)
        # Padding reads and writes the spare row's table: empty, so only the null block.
        self._padding = [0, 0, 0, 0, 0, 0, -1, 0, 0, rows - 1]
        # What an advancing row adds to its integer inputs: a position and a step; and what its SOURCE and
        # EARLIER become: its own row in the previous step's output, and none.
        self._advance = torch.zeros(self.LONGS, dtype=torch.long, device=device)
        self._advance[[self.POSITION, self.STEP]] = 1
        self._advanced = torch.stack((self.rows, torch.zeros_like(self.rows)), 1)
        # Each entry's sequence at the last load, and how many tokens it had launched then.
        self._owners: list[Sequence | None] = [None] * entries
        self._launched = [0] * entries
        self._used = 0  # entries the device tables may hold a sequence's inputs in
        self.written = 0
        """Entries the last load wrote from the host (the others advanced on the device)."""
        self.mixed = 0
        """The mixed tokens the last load placed after the rows."""
        self.forward = 0
        """Entries the decode forward of the last load's step runs: its decoding and mixed rows, and where
        mixed tokens follow, every entry through them (rows prefilled apart ride along between: what they
        write, their own prefill writes again after)."""
        self.clear()

    def load(self, rows: list[Sequence], decoded: int = 0, mixed: int = 0) -> None:
        """Bring every row's inputs and sampling parameters up to date for the next step: `rows` in
        batch order, of which the first `decoded` decode, the next `mixed` prefill in the decode
        forward (their other uncached tokens placed after the rows), the others apart.

        Entries past the live ones (a graph's padding, and the spare row) are greedy, token 0 at
        position 0, reading the spare row's empty table: they write and read only the null block."""
        self._turn ^= 1
        owners, launched = self._owners, self._launched
        # The mixed newcomers' tokens but their last, after the rows: each with its position, its
        # newcomer's table row, and how many of its newcomer's tokens come before it in the step, from
        # which entry on (so are its row's: all but the last).
        ids: list[int] = []
        positions: list[int] = []
        tables: list[int] = []
        earlier: list[int] = []
        firsts: list[int] = []
        spans: dict[int, tuple[int, int]] = {}
        for row, seq in enumerate(rows[decoded : decoded + mixed], decoded):
            first, count = len(rows) + len(ids), seq.prefill_to - 1 - seq.num_cached
            ids += seq.tokens[seq.num_cached : seq.prefill_to - 1]
            positions += range(seq.num_cached, seq.prefill_to - 1)
            tables += [seq.slot] * count
            earlier += range(count)
            firsts += [first] * count
            spans[row] = (count, first)
        changed: list[tuple[int, list[int], list[float]]] = []
        for row, seq in enumerate(rows):
            # It held this row at the last load, and has launched one token since: advanced on the device.
            if row < decoded and owners[row] is seq and seq.launched == launched[row] + 1:
                launched[row] = seq.launched
                continue
            owners[row], launched[row] = seq, seq.launched
            inputs = _long_inputs(seq, prefill=row >= decoded, earlier=spans.get(row, (0, 0)))
            changed.append((row, inputs, _float_inputs(seq)))
        extra = len(ids)
        end = len(rows) + extra
        for entry in range(len(rows), max(end, self._used)):
            owners[entry] = None
        for entry in range(end, self._used):
            changed.append((entry, self._padding, [0.0] * self.FLOATS))
        self._used, self.mixed = end, extra
        self.forward = end if extra else decoded + mixed
        count = self.written = len(changed) + extra
        if decoded:
            # Every decoding row advances; the changed ones among them are overwritten just below.
            advancing = self.longs[:decoded]
            advancing += self._advance
            advancing[:, self.SOURCE : self.EARLIER + 1] = self._advanced[:decoded]
        if not count:
            return
        longs, floats = self._host_longs[self._turn, :count], self._host_floats[self._turn, :count]
        if changed:
            longs[: len(changed)] = torch.tensor([[row, *values] for row, values, _ in changed])
            floats[: len(changed)] = torch.tensor([values for _, _, values in changed])
        if extra:
            # Padding's inputs (its sampling parameters go unread), but each its token, position, table
            # and place among its newcomer's tokens.
            block = longs[len(changed) :]
            block[:, 0] = torch.arange(len(rows), end)
            block[:, 1:] = torch.tensor(self._padding)
            columns = [self.TOKEN, self.POSITION, self.TABLE, self.EARLIER, self.FIRST]
            block[:, [1 + column for column in columns]] = torch.tensor(
                [ids, positions, tables, earlier, firsts]
            ).T
            floats[len(changed) :] = 0.0
        device_longs, device_floats = self._changed_longs[:count], self._changed_floats[:count]
        device_longs.copy_(longs, non_blocking=True)
        device_floats.copy_(floats, non_blocking=True)
        where = device_longs[:, 0]
        self.longs.index_copy_(0, where, device_longs[:, 1:])
        self.floats.index_copy_(0, where, device_floats)

    def host_tokens(self) -> torch.Tensor:
        """The pinned buffer this step's tokens are copied back into."""
        return self._host_tokens[self._turn]

    def feed_previous(self, last_tokens: torch.Tensor) -> None:
        """On the device: rows whose token is still in flight take it from the previous step's output."""
        source = self.longs[:, self.SOURCE]
        fed = last_tokens[source.clamp(min=0)]
        self.longs[:, self.TOKEN] = torch.where(source >= 0, fed, self.longs[:, self.TOKEN])

    def sampling(self, start: int, stop: int) -> SamplingTensors:
        """Sampling parameters of batch rows start..stop-1."""
        return self._sampling(self.longs[start:stop], self.floats[start:stop])

    def sampling_rows(self, rows: torch.Tensor) -> SamplingTensors:
        """Sampling parameters of the given batch rows (a device tensor of row indices)."""
        return self._sampling(self.longs[rows], self.floats[rows])

    @classmethod
    def _sampling(cls, longs: torch.Tensor, floats: torch.Tensor) -> SamplingTensors:
        return SamplingTensors(
            temperature=floats[:, cls.TEMPERATURE],
            top_p=floats[:, cls.TOP_P],
            penalty=floats[:, cls.PENALTY],
            frequency=floats[:, cls.FREQUENCY],
            presence=floats[:, cls.PRESENCE],
            top_k=longs[:, cls.TOP_K],
            seeds=longs[:, cls.SEED],
            steps=longs[:, cls.STEP],
            ban_eos=longs[:, cls.STEP] < longs[:, cls.MIN_NEW],
        )

    def clear(self) -> None:
        """Every row padding, and no row known: the next load writes each of its rows."""
        self.longs[:] = torch.tensor(self._padding)
        self.floats.zero_()
        self._owners = [None] * len(self._owners)
        self._used = 0


class PrefillInputs:
    """Fixed-address inputs of a prefill: the newcomers' uncached tokens as [rows, width], laid out flat
    so every padded shape is a contiguous prefix, and per row how many tokens it prefills, its batch row
    (the spare row for padding rows) and how many leading tokens it found cached. Pinned host tables
    are double-buffered like `StepInputs`."""

    def __init__(self, max_tokens: int, max_rows: int, spare_row: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._host_ids = torch.zeros(2, max_tokens, dtype=torch.long, pin_memory=pinned)
        self._host_rows = torch.zeros(2, max_rows, 3, dtype=torch.long, pin_memory=pinned)
        self._turn = 0
        self.ids = torch.zeros_like(self._host_ids[0], device=device)
        self.rows = torch.zeros_like(self._host_rows[0], device=device)
        self.spare_row = spare_row

    def load(self, rows: list[Sequence], n: int, width: int) -> None:
        """Fill `n` rows of `width` tokens: the newcomers, then padding rows (copies of the first one,
        in the spare row)."""
        self._turn ^= 1
        ids, table = self._host_ids[self._turn, : n * width].view(n, width), self._host_rows[self._turn]
        tails = [seq.tokens[seq.num_cached : seq.prefill_to] for seq in rows]
        ids[: len(rows)] = torch.tensor([tail + tail[:1] * (width - len(tail)) for tail in tails])
        ids[len(rows) :] = ids[0]
        table[: len(rows)] = torch.tensor(
            [[len(tail), seq.slot, seq.num_cached] for seq, tail in zip(rows, tails, strict=True)]
        )
        table[len(rows) : n] = table[0]
        table[len(rows) : n, 1] = self.spare_row
        self.ids[: n * width].copy_(ids.view(-1), non_blocking=True)
        self.rows[:n].copy_(table[:n], non_blocking=True)

    def clear(self) -> None:
        """Inputs that are safe to capture with: one-token prompts from position 0 in the spare row."""
        self.ids.zero_()
        self.rows[:] = torch.tensor([1, self.spare_row, 0])


class RowHistory:
    """What the penalties know of each newcomer's row: `seen[row, token]`, every token of its prompt and
    output (the repetition penalty), and `counts[row, token]`, the times a token is in its output (the
    frequency and presence penalties; a row that comes back after a preemption has output already).
    Their rows are cleared, then their tokens set.

    The rows, their token counts and the tokens go to the device in one copy from a pinned buffer, so
    marking never waits for the step in flight (a copy from pageable memory would). The buffers are
    double-buffered like `StepInputs`' and grow when a prefill needs more."""

    def __init__(self, seen: torch.Tensor, counts: torch.Tensor) -> None:
        self.seen, self.counts = seen, counts
        self._pinned = seen.device.type == "cuda"
        self._host = [torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)]
        self._copied = [torch.cuda.Event() for _ in range(2)] if self._pinned else []
        self._turn = 0
        self._device = torch.zeros(0, dtype=torch.long, device=seen.device)
        self._true = torch.ones((), dtype=torch.bool, device=seen.device)
        self._one = torch.ones((), dtype=counts.dtype, device=seen.device)

    def mark(self, rows: list[Sequence]) -> None:
        held = [seq.tokens for seq in rows]
        made = [seq.output_ids for seq in rows]
        n, count, outputs = len(rows), sum(map(len, held)), sum(map(len, made))
        size = 3 * n + count + outputs
        self._turn ^= 1
        if self._pinned:
            self._copied[self._turn].synchronize()  # the copy from this buffer two marks ago is done
        if self._host[self._turn].numel() < size:
            grown = max(size, 2 * self._host[self._turn].numel())
            self._host[self._turn] = torch.zeros(grown, dtype=torch.long, pin_memory=self._pinned)
        if self._device.numel() < size:
            self._device = torch.zeros(
                max(size, 2 * self._device.numel()), dtype=torch.long, device=self.seen.device
            )
        host = self._host[self._turn][:size]
        host[: 3 * n] = torch.tensor(
            [seq.slot for seq in rows] + [len(tokens) for tokens in held] + [len(ids) for ids in made]
        )
        host[3 * n :] = torch.tensor(list(itertools.chain(*held, *made)))
        device = self._device[:size]
        device.copy_(host, non_blocking=True)
        if self._pinned:
            self._copied[self._turn].record()
        slots, lengths, made_lengths = device[:n], device[n : 2 * n], device[2 * n : 3 * n]
        self.seen.index_fill_(0, slots, False)
        self.counts.index_fill_(0, slots, 0)
        where = torch.repeat_interleave(slots, lengths, output_size=count)
        self.seen.index_put_((where, device[3 * n : 3 * n + count]), self._true)
        if outputs:
            where = torch.repeat_interleave(slots, made_lengths, output_size=outputs)
            self.counts.index_put_((where, device[3 * n + count :]), self._one, accumulate=True)


def _long_inputs(seq: Sequence, prefill: bool = False, earlier: tuple[int, int] = (0, 0)) -> list[int]:
    made = seq.launched
    if prefill:
        # Its last uncached token, which a mixed prefill feeds in the row itself (a chunk's last one).
        token, position, source = seq.tokens[seq.prefill_to - 1], seq.prefill_to - 1, -1
    else:
        # Counted from what has been launched, so a row with a token in flight is described one step on.
        token, position = seq.last_token, seq.num_prompt_tokens + made - 1
        source = seq.row_index if seq.in_flight else -1
    # In StepInputs' column order.
    return [
        token,
        position,
        seq.params.top_k,
        seq.seed,
        made,
        seq.params.min_new_tokens,
        source,
        *earlier,
        seq.slot,
    ]


def _float_inputs(seq: Sequence) -> list[float]:
    params = seq.params
    # In StepInputs' column order.
    return [
        params.temperature,
        params.top_p,
        params.repetition_penalty,
        params.frequency_penalty,
        params.presence_penalty,
    ]


class GrammarMasks:
    """The tokens each constrained row may take next, for the steps that have constrained rows: filled
    on the host by each row's grammar matcher (llguidance's bitmask, 32 tokens a word; rows without a
    grammar allow every token), sent with one copy from a pinned double-buffered table, and unpacked on
    the device for the rows a sampling reads. The spare row (prefill padding) allows everything.

    A JSON mask takes a few microseconds a row, so a step's masks are usually cheaper than handing them
    to llguidance's thread pool: on a busy host (HTTP workers, clients) waking its threads took 2-3 ms
    a step where the engine thread did 64 rows in 0.2 ms at the median
    (`bench/results/grammar-masks.md`). The engine thread computes them itself unless the last steps'
    cost a row says the step's rows would take longer than `POOL_ABOVE` seconds; then the pool does,
    in parallel."""

    POOL_ABOVE = 0.002
    PROBE_EVERY = 50

    def __init__(self, rows: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        self._pinned = device.type == "cuda"
        self._host = torch.zeros(2, rows, self.words, dtype=torch.int32, pin_memory=self._pinned)
        self._copied = [torch.cuda.Event() for _ in range(2)] if self._pinned else []
        self._turn = 0
        self.bits = torch.full((rows, self.words), -1, dtype=torch.int32, device=device)
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)
        self._executor = LLExecutor()
        self.row_seconds = 0.0  # a moving average of one row's mask on the engine thread
        self._until_probe = self.PROBE_EVERY  # pool steps before the next timed one
        self._stale = False  # `bits` holds some row's grammar: a step without grammars resets it

    def load(self, rows: list[Sequence]) -> bool:
        """Fill the masks of a step's rows (batch order); False where none is constrained, and every
        row then allows every token (prefills always apply the masks: their graphs sample inside)."""
        # A row that has just ended (its matcher stopped) or whose matcher failed takes any token: its
        # token is not the request's, and one matcher must not fail a whole step.
        constrained = [
            (seq.matcher, row)
            for row, seq in enumerate(rows)
            if seq.matcher is not None and not seq.is_finished and not seq.matcher.is_error()
        ]
        if not constrained:
            return self.reset()
        self._stale = True
        self._turn ^= 1
        if self._pinned:
            self._copied[self._turn].synchronize()  # the copy from this buffer two loads ago is done
        host = self._host[self._turn, : len(rows)]
        if len(constrained) < len(rows):  # llguidance writes every word of a constrained row's mask
            host.fill_(-1)
        self._compute(constrained, host)
        self.bits[: len(rows)].copy_(host, non_blocking=True)
        if self._pinned:
            self._copied[self._turn].record()
        return True

    def _compute(self, constrained: list[tuple[LLMatcher, int]], host: torch.Tensor) -> None:
        """Each constrained row's mask into its row of `host` (llguidance releases the interpreter lock
        while it computes). Where the pool computes, every `PROBE_EVERY`th step is still timed on the
        engine thread, so the estimate follows the grammars the rows have now."""
        size = 4 * self.words
        costly = len(constrained) * self.row_seconds > self.POOL_ABOVE
        if costly and self._until_probe > 0:
            self._until_probe -= 1
            self._executor.unsafe_compute_mask_ptr(constrained, host.data_ptr(), size, host.shape[0])
            return
        self._until_probe = self.PROBE_EVERY
        # The thread's CPU time: the work, not the waits for the interpreter lock between rows.
        address, started = host.data_ptr(), time.thread_time()
        for matcher, row in constrained:
            matcher.unsafe_compute_mask_ptr(address + row * size, size)
        per_row = (time.thread_time() - started) / len(constrained)
        # A probe's time replaces the estimate: the pool ran since, and the rows may have changed.
        fresh = costly or not self.row_seconds
        self.row_seconds = per_row if fresh else 0.8 * self.row_seconds + 0.2 * per_row

    def reset(self) -> bool:
        """Every row allows every token again (one fill on the device, only after a constrained step);
        returns False: the step has no constrained row."""
        if self._stale:
            self.bits.fill_(-1)
            self._stale = False
        return False

    def allowed(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), vocab] bool: the tokens each of `rows` (batch rows, a device tensor) may take."""
        bits = self.bits[rows]
        unpacked = (bits[:, :, None] >> self._shifts) & 1
        return unpacked.view(bits.shape[0], -1)[:, : self.vocab_size].bool()
