"""The scheduler on the CPU with hand-made sequences: no model, no tensors."""

from __future__ import annotations

from trickle.generation.params import SamplingParams
from trickle.generation.scheduler import PrefillPacing, ScheduledBatch, Scheduler, SchedulerConfig
from trickle.generation.sequence import Sequence, Status


def seq(name: str, prompt_len: int = 4, first: int = 0, max_new_tokens: int = 256) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    prompt = list(range(first, first + prompt_len))
    return Sequence(name, prompt, params, 0)


def config(
    max_batch_size: int, prefill_token_budget: int, num_blocks: int = 1024, **rest: float
) -> SchedulerConfig:
    return SchedulerConfig(max_batch_size, prefill_token_budget, num_blocks, **rest)


def run_step(scheduler: Scheduler, token: int = 7) -> ScheduledBatch:
    """Schedule a step and play the engine's part: every row is launched and its token seen at once."""
    batch = scheduler.schedule()
    for row in batch.rows:
        row.launched += 1
        row.output_ids.append(token)
    return batch


def test_admits_in_arrival_order_up_to_the_row_limit() -> None:
    scheduler = Scheduler(config(max_batch_size=2, prefill_token_budget=100))
    a, b, c = seq("a"), seq("b"), seq("c")
    for s in (a, b, c):
        scheduler.add(s)
    batch = scheduler.schedule()
    assert batch.prefill == [a, b] and batch.decode == []
    assert [a.slot, b.slot] == [0, 1]
    assert list(scheduler.waiting) == [c]
    assert scheduler.schedule().decode == [a, b]


def test_prefill_budget_spreads_long_prompts_over_steps() -> None:
    scheduler = Scheduler(config(max_batch_size=8, prefill_token_budget=16))
    first, second, third, fourth = seq("first", 10), seq("second", 6), seq("third", 2), seq("fourth", 3)
    for s in (first, second, third, fourth):
        scheduler.add(s)
    assert scheduler.schedule().prefill == [first]
    batch = scheduler.schedule()
    # Newcomers are padded to the longest: 2 x 6 fits in 16, and 3 x 6 does not.
    assert batch.decode == [first] and batch.prefill == [second, third]
    assert scheduler.schedule().prefill == [fourth]


def test_a_long_prompt_coming_while_rows_decode_is_prefilled_a_chunk_a_step() -> None:
    """A 50-token prompt, a budget of 16 and blocks of 4, while a row decodes: chunks of 16 tokens, each
    found in the prefix cache by the next (its blocks written by the step before), then the rest, whose
    step makes its first token. Alone (no row decoding), the same prompt goes whole."""
    scheduler = Scheduler(config(max_batch_size=4, prefill_token_budget=16, block_size=4))
    decoding, big = seq("decoding", 4), seq("big", 50, first=100)
    scheduler.add(decoding)
    run_step(scheduler)
    scheduler.add(big)
    spans = []
    for _ in range(4):
        batch = scheduler.schedule()
        assert batch.decode == [decoding] and batch.prefill == [big]
        spans.append((big.num_cached, big.prefill_to))
        for row in batch.rows:  # the engine's part: a chunk's token is not the row's
            if not row.is_partial:
                row.launched += 1
                row.output_ids.append(7)
    assert spans == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert big.num_completion_tokens == 1 and big.cached_prompt_tokens == 0 and big.chunked
    assert scheduler.schedule().decode == [decoding, big]
    assert (scheduler.prefix_queries, scheduler.prefix_hits) == (4 + 50, 0)  # looked up once
    alone = Scheduler(config(max_batch_size=4, prefill_token_budget=16, block_size=4))
    whole = seq("whole", 50, first=100)
    alone.add(whole)
    assert alone.schedule().prefill == [whole] and whole.prefill_to == 50 and not whole.is_partial


def test_newcomers_joining_decoding_rows_mix_into_their_forward_within_tokens_and_reads() -> None:
    """With nothing decoding, newcomers prefill apart up to the token budget. While rows decode, the
    step's budget is the mixed tokens (12 here): newcomers mix, uncached tokens counted unpadded, in
    arrival order, while the positions their tokens read (p + 1 for a token at position p) stay within
    the read limit (50); the first that does not fit the reads prefills apart, and every later one
    with it."""
    scheduler = Scheduler(
        config(max_batch_size=8, prefill_token_budget=100, mixed_prefill_tokens=12, mixed_read_limit=50)
    )
    first = seq("first", 20)
    scheduler.add(first)
    batch = run_step(scheduler)
    assert (batch.prefill, batch.mixed) == ([first], 0)
    a, b, c, d = seq("a", 5, first=30), seq("b", 3, first=40), seq("c", 6, first=50), seq("d", 2, first=60)
    for s in (a, b, c, d):
        scheduler.add(s)
    # a reads 1 + ... + 5 = 15 and b 6: mixed; c would bring the tokens to 14, over 12.
    batch = run_step(scheduler)
    assert (batch.decode, batch.prefill, batch.mixed) == ([first], [a, b], 2)
    # c reads 21 and d 3: both mixed (8 tokens, 24 reads).
    batch = run_step(scheduler)
    assert (batch.prefill, batch.mixed) == ([c, d], 2)
    e, f = seq("e", 10, first=70), seq("f", 2, first=90)
    for s in (e, f):
        scheduler.add(s)
    # e reads 55, over 50: apart, with f after it (12 tokens padded: 2 x 10 = 20, over 12).
    batch = run_step(scheduler)
    assert (batch.prefill, batch.mixed) == ([e], 0)
    batch = run_step(scheduler)
    assert (batch.prefill, batch.mixed) == ([f], 1)


def test_the_budget_counts_the_padding_the_runner_runs_a_prefill_with() -> None:
    """Padded to power-of-two rows and widths (as the runner's captured shapes): three newcomers of 5
    tokens run as 4 x 8 = 32, over a budget of 24, so only two (2 x 8) go in one step."""

    def padded(rows: int, width: int) -> int:
        return (1 << (rows - 1).bit_length()) * (1 << (width - 1).bit_length())

    scheduler = Scheduler(
        SchedulerConfig(max_batch_size=8, prefill_token_budget=24, num_blocks=64, prefill_size=padded)
    )
    a, b, c = seq("a", 5), seq("b", 5, first=10), seq("c", 5, first=20)
    for s in (a, b, c):
        scheduler.add(s)
    assert scheduler.schedule().prefill == [a, b]
    assert scheduler.schedule().prefill == [c]


def test_a_prompt_over_the_budget_still_runs_alone() -> None:
    scheduler = Scheduler(config(max_batch_size=8, prefill_token_budget=4))
    big = seq("big", 50)
    scheduler.add(big)
    assert scheduler.schedule().prefill == [big]


def test_pacing_limits_a_steps_prefill_while_rows_decode_to_the_measured_stall() -> None:
    """Decode parts of 10 ms and prefills of 0.1 ms a token with a stall of 2.5: a step with decoding
    rows may prefill (2.5 - 1) x 10 / 0.1 = 150 tokens: three newcomers of 40 (padded to 40 each), not
    four. A step with no decoding row takes the whole token budget."""
    scheduler = Scheduler(config(max_batch_size=32, prefill_token_budget=1000, prefill_pacing=2.5))
    scheduler.pacing.observe(4, 0.010, 100, 0.010)
    assert scheduler.pacing.budget() == 150
    newcomers = [seq(f"n{i}", 40, first=100 * i) for i in range(12)]
    for s in newcomers:
        scheduler.add(s)
    assert run_step(scheduler).prefill == newcomers[:12]  # nothing decodes yet: up to 1,000 tokens
    late = [seq(f"late{i}", 40, first=5000 + 100 * i) for i in range(5)]
    for s in late:
        scheduler.add(s)
    batch = run_step(scheduler)
    assert batch.decode == newcomers and batch.prefill == late[:3]
    assert run_step(scheduler).prefill == late[3:]


def test_pacing_bounds_the_prefills_run_apart_not_the_mixed_newcomers() -> None:
    """Pacing learns what a prefill of its own costs, so it bounds only those: with a paced budget of
    50 tokens, two newcomers of 40 still mix into the decoding rows' forward (80 tokens); a newcomer
    past the mixed read limit prefills apart (the first of a step always goes in), and one after it
    waits, its 2 x 70 padded tokens apart being over the 50."""
    scheduler = Scheduler(
        config(
            max_batch_size=32,
            prefill_token_budget=1000,
            prefill_pacing=1.5,
            mixed_prefill_tokens=1000,
            mixed_read_limit=2000,
        )
    )
    scheduler.pacing.observe(4, 0.010, 100, 0.010)
    assert scheduler.pacing.budget() == 50
    first = seq("first", 8)
    scheduler.add(first)
    run_step(scheduler)
    a, b = seq("a", 40, first=100), seq("b", 40, first=200)
    for s in (a, b):
        scheduler.add(s)
    batch = run_step(scheduler)  # 40 x 41 / 2 = 820 positions read each
    assert (batch.decode, batch.prefill, batch.mixed) == ([first], [a, b], 2)
    c, d = seq("c", 70, first=300), seq("d", 10, first=400)
    for s in (c, d):
        scheduler.add(s)
    batch = run_step(scheduler)  # c reads 2,485 positions
    assert (batch.prefill, batch.mixed) == ([c], 0)
    batch = run_step(scheduler)
    assert (batch.prefill, batch.mixed) == ([d], 1)


def test_pacing_always_admits_one_newcomer_and_is_off_at_zero_or_unmeasured() -> None:
    paced = Scheduler(config(max_batch_size=8, prefill_token_budget=1000, prefill_pacing=2.0))
    paced.pacing.observe(1, 0.001, 10, 0.010)  # 1 ms decode, 1 ms a token: a budget of 1 token
    assert paced.pacing.budget() == 1
    unpaced = Scheduler(config(max_batch_size=8, prefill_token_budget=1000, prefill_pacing=0))
    unpaced.pacing.observe(1, 0.001, 10, 0.010)
    unmeasured = Scheduler(config(max_batch_size=8, prefill_token_budget=1000, prefill_pacing=2.0))
    assert unpaced.pacing.budget() is None and unmeasured.pacing.budget() is None
    for scheduler, admitted in ((paced, 1), (unpaced, 3), (unmeasured, 3)):
        scheduler.add(seq("first", 8))
        run_step(scheduler)
        for i in range(3):
            scheduler.add(seq(f"next{i}", 8, first=100 * (i + 1)))
        assert len(run_step(scheduler).prefill) == admitted


def test_pacing_follows_the_measured_times_as_a_moving_average() -> None:
    scheduler = Scheduler(config(max_batch_size=8, prefill_token_budget=1000, prefill_pacing=3.0))
    pacing = scheduler.pacing
    pacing.observe(8, 0.008, 0, 0.0)  # a decode-only step
    pacing.observe(0, 0.0, 512, 0.016)  # a prefill-only step: 31.25 us a token
    assert pacing.budget() == 512  # (3 - 1) x 8 ms / 31.25 us
    for _ in range(40):  # the decode part grows to 12 ms: the budget follows
        pacing.observe(8, 0.012, 0, 0.0)
    assert abs(pacing.budget() - 768) <= 1  # (3 - 1) x 12 ms / 31.25 us, reached from below


def test_pacing_fits_a_prefills_fixed_part_apart_from_its_part_per_token() -> None:
    """Prefills of 128 tokens in 6.2 ms and of 1,024 in 27.704 ms: 24 us a token beyond a fixed 3.128 ms
    (the weights read once a forward). With 8 ms decode parts and a stall of 2.5 a step may prefill
    (1.5 x 8 - 3.128) / 0.024 = 369 tokens: two newcomers of 128 plus. Charging the fixed part to each
    token (6.2 ms / 128) would allow 247, one newcomer, and pay the fixed part every step."""
    pacing = PrefillPacing(2.5)
    pacing.observe(64, 0.008, 128, 0.0062)
    assert pacing.budget() == int(1.5 * 0.008 / (0.0062 / 128))  # one size: all of it per token
    pacing.observe(0, 0.0, 1024, 0.027704)
    assert abs(pacing.fixed_seconds - 0.003128) < 1e-9 and abs(pacing.token_seconds - 0.000024) < 1e-12
    assert pacing.budget() == 369
    pacing.observe(0, 0.0, 1024, 0.031704)  # a size measured again: its moving average moves a quarter
    assert abs(pacing.by_size[1024] - 0.028704) < 1e-9
    # A line that does not rise (noise between two near sizes) falls back to all of it per token.
    flat = PrefillPacing(2.5)
    flat.observe(8, 0.008, 256, 0.008)
    flat.observe(8, 0.008, 384, 0.007)
    assert flat.fixed_seconds == 0.0 and flat.budget() == int(1.5 * 0.008 / (0.015 / 640))
    for size in range(1, PrefillPacing.SIZES + 10):
        flat.observe(0, 0.0, size, 0.001)
    assert len(flat.by_size) == PrefillPacing.SIZES and 256 not in flat.by_size  # oldest forgotten


def test_a_newcomer_whose_prefix_another_newcomer_writes_this_step_waits_and_finds_it_cached() -> None:
    """Four choices of one 40-token prompt (blocks of 4): the first prefills it; the others wait a step
    and find its 9 reusable blocks (the last token is always prefilled), so the prompt is prefilled
    once. A newcomer with another prompt behind them waits with them (arrival order)."""
    scheduler = Scheduler(config(max_batch_size=8, prefill_token_budget=1000, num_blocks=128, block_size=4))
    choices = [seq(f"choice{i}", 40) for i in range(4)]
    other = seq("other", 40, first=100)
    for s in (*choices, other):
        scheduler.add(s)
    assert run_step(scheduler).prefill == choices[:1]
    batch = run_step(scheduler)
    assert batch.prefill == [*choices[1:], other]
    assert [s.num_cached for s in batch.prefill] == [36, 36, 36, 0]
    assert scheduler.prefix_hits == 3 * 36


def test_without_the_prefix_cache_newcomers_of_one_prompt_do_not_wait() -> None:
    scheduler = Scheduler(
        config(
            max_batch_size=8, prefill_token_budget=1000, num_blocks=128, block_size=4, prefix_caching=False
        )
    )
    choices = [seq(f"choice{i}", 40) for i in range(3)]
    for s in choices:
        scheduler.add(s)
    assert run_step(scheduler).prefill == choices


def test_finished_rows_leave_and_the_last_rows_fill_their_slots() -> None:
    scheduler = Scheduler(config(max_batch_size=8, prefill_token_budget=100))
    rows = [seq(str(i)) for i in range(5)]
    for s in rows:
        scheduler.add(s)
    scheduler.schedule()
    rows[1].finish(Status.FINISHED_EOS)
    rows[4].finish(Status.FINISHED_LENGTH)
    batch = scheduler.schedule()
    assert batch.moves == [(3, 1)]
    assert batch.decode == [rows[0], rows[3], rows[2]]
    assert [s.slot for s in batch.decode] == [0, 1, 2]


def test_abort_cancels_waiting_and_running_sequences() -> None:
    scheduler = Scheduler(config(max_batch_size=1, prefill_token_budget=100))
    running, waiting = seq("running"), seq("waiting")
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    assert scheduler.abort("running") is running
    assert scheduler.abort("waiting") is waiting
    assert scheduler.abort("unknown") is None
    assert scheduler.abort("running") is None, "a finished sequence is not aborted twice"
    assert running.finish_reason == "cancelled" == waiting.finish_reason
    assert scheduler.num_running == 0
    batch = scheduler.schedule()
    assert batch.is_empty and not scheduler.has_work


# ---------------------------------------------------------------- KV blocks


def test_admission_asks_for_blocks_not_rows() -> None:
    # 8 usable blocks of 4 positions: three 8-token prompts take 2 blocks each, the fourth needs 2 more
    # than the 2 left once the first three may grow.
    scheduler = Scheduler(config(max_batch_size=8, prefill_token_budget=100, num_blocks=9, block_size=4))
    rows = [seq(str(i), 8, first=10 * i) for i in range(5)]
    for s in rows:
        scheduler.add(s)
    batch = scheduler.schedule()
    assert batch.prefill == rows[:4]
    assert [len(s.blocks) for s in rows[:4]] == [2, 2, 2, 2]
    assert len({b for s in rows[:4] for b in s.blocks}) == 8 and 0 not in rows[0].blocks
    assert list(scheduler.waiting) == [rows[4]]


def test_out_of_blocks_the_newest_row_is_preempted_and_comes_back_with_its_tokens() -> None:
    scheduler = Scheduler(config(max_batch_size=4, prefill_token_budget=100, num_blocks=5, block_size=4))
    old, new = seq("old", 4, first=0), seq("new", 4, first=50)
    scheduler.add(old)
    run_step(scheduler)
    scheduler.add(new)
    run_step(scheduler)  # both hold one block; their next positions need a second each
    for _ in range(3):
        batch = run_step(scheduler)
        assert not batch.preempted and batch.decode == [old, new]
    # 4 usable blocks, 2 each: the next step needs a third block for both; the newest gives way.
    batch = scheduler.schedule()
    assert batch.preempted == [new] and batch.decode == [old] and new.status.value == "waiting"
    assert new.blocks == [] and list(scheduler.waiting) == [new] and new.preemptions == 1
    assert scheduler.preemptions == 1
    old.launched += 1
    old.output_ids.append(7)
    # Back in: it prefills its prompt and the 4 tokens it already has, mostly from the prefix cache.
    old.finish(Status.FINISHED_LENGTH)
    batch = scheduler.schedule()
    assert batch.prefill == [new] and new.num_cached == 4 and len(new.blocks) == 2
    assert new.cached_prompt_tokens == 0, "usage counts the prompt's hits at the first admission"


def test_a_preempted_row_with_a_token_in_flight_waits_for_it() -> None:
    scheduler = Scheduler(config(max_batch_size=4, prefill_token_budget=100, num_blocks=3, block_size=4))
    a, b = seq("a", 3), seq("b", 3, first=20)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    batch = scheduler.schedule()  # both write position 3 of their only block
    for row in batch.rows:
        row.launched += 1  # launched, not seen yet
    batch = scheduler.schedule()  # position 4 needs a new block each: b gives way
    assert batch.preempted == [b] and b.in_flight
    assert scheduler.schedule().prefill == [], "b's in-flight token is not seen yet"


def test_a_shared_prefix_is_found_in_the_cache_and_shared_read_only() -> None:
    scheduler = Scheduler(config(max_batch_size=4, prefill_token_budget=100, num_blocks=64, block_size=4))
    first = seq("first", 10)
    scheduler.add(first)
    run_step(scheduler)
    second = Sequence("second", [*range(8), 99, 98], SamplingParams(), 0)
    scheduler.add(second)
    batch = run_step(scheduler)
    assert batch.prefill == [second]
    assert second.num_cached == 8 and second.cached_prompt_tokens == 8
    assert second.blocks[:2] == first.blocks[:2] and second.blocks[2] != first.blocks[2]
    assert [scheduler.pool.refs(b) for b in first.blocks[:2]] == [2, 2]
    assert (scheduler.prefix_queries, scheduler.prefix_hits) == (20, 8)


def test_at_least_one_token_is_prefilled_even_when_all_are_cached() -> None:
    scheduler = Scheduler(config(max_batch_size=4, prefill_token_budget=100, num_blocks=64, block_size=4))
    first, again = seq("first", 8), seq("again", 8)
    scheduler.add(first)
    run_step(scheduler)
    scheduler.add(again)
    run_step(scheduler)
    assert again.num_cached == 4, "the last block is prefilled again, for the last token's hidden state"


def test_blocks_of_a_failed_step_leave_the_prefix_cache() -> None:
    scheduler = Scheduler(config(max_batch_size=4, prefill_token_budget=100, num_blocks=64, block_size=4))
    broken = seq("broken", 8)
    scheduler.add(broken)
    scheduler.schedule()
    scheduler.forget(broken)
    broken.finish(Status.ERROR)
    after = seq("after", 9)
    scheduler.add(after)
    scheduler.schedule()
    assert after.num_cached == 0


def test_kv_usage_counts_blocks_rows_hold() -> None:
    scheduler = Scheduler(config(max_batch_size=4, prefill_token_budget=100, num_blocks=11, block_size=4))
    a = seq("a", 9)
    scheduler.add(a)
    run_step(scheduler)
    assert scheduler.kv_tokens == 12 and scheduler.kv_capacity == 40
    a.finish(Status.FINISHED_EOS)
    scheduler.schedule()
    assert scheduler.kv_tokens == 0


def test_a_prefill_step_reads_at_most_its_read_budget_of_positions() -> None:
    # Newcomers that find a long prefix cached prefill little but attend to all of it: two read 2 x 40
    # positions, within a read budget of 100; a third would read 120.
    scheduler = Scheduler(
        config(max_batch_size=8, prefill_token_budget=100, block_size=4, prefill_read_budget=100)
    )
    first = seq("first", 40)
    scheduler.add(first)
    run_step(scheduler)
    later = [seq(f"later{i}", 40) for i in range(3)]
    for s in later:
        scheduler.add(s)
    assert scheduler.schedule().prefill == later[:2]
    assert later[0].num_cached == 36
