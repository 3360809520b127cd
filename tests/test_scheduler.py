"""The scheduler on the CPU with hand-made sequences: no model, no tensors."""

from __future__ import annotations

from collections.abc import Callable

from trickle.generation.params import SamplingParams
from trickle.generation.scheduler import Scheduler, SchedulerConfig
from trickle.generation.sequence import Sequence, Status


class NoText:
    stopped = False


def seq(name: str, prompt_len: int = 4) -> Sequence:
    return Sequence(name, list(range(prompt_len)), SamplingParams(), 0, NoText())  # type: ignore[arg-type]


def test_admits_in_arrival_order_up_to_the_row_limit() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=2, prefill_token_budget=100))
    a, b, c = seq("a"), seq("b"), seq("c")
    for s in (a, b, c):
        scheduler.add(s)
    batch = scheduler.schedule()
    assert batch.prefill == [a, b] and batch.decode == []
    assert [a.slot, b.slot] == [0, 1]
    assert list(scheduler.waiting) == [c]
    assert scheduler.schedule().decode == [a, b]


def test_prefill_budget_spreads_long_prompts_over_steps() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, prefill_token_budget=16))
    first, second, third, fourth = seq("first", 10), seq("second", 6), seq("third", 2), seq("fourth", 3)
    for s in (first, second, third, fourth):
        scheduler.add(s)
    assert scheduler.schedule().prefill == [first]
    batch = scheduler.schedule()
    # Newcomers are padded to the longest: 2 x 6 fits in 16, and 3 x 6 does not.
    assert batch.decode == [first] and batch.prefill == [second, third]
    assert scheduler.schedule().prefill == [fourth]


def test_a_prompt_over_the_budget_still_runs_alone() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, prefill_token_budget=4))
    big = seq("big", 50)
    scheduler.add(big)
    assert scheduler.schedule().prefill == [big]


def test_finished_rows_leave_and_the_last_rows_fill_their_slots() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, prefill_token_budget=100))
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
    scheduler = Scheduler(SchedulerConfig(max_batch_size=1, prefill_token_budget=100))
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


def packs_up_to(tokens: int) -> Callable[[int, int], bool]:
    return lambda rows, longest: rows * longest <= tokens


def decoding(scheduler: Scheduler) -> Sequence:
    running = seq("running")
    scheduler.add(running)
    assert scheduler.schedule().prefill == [running]  # nothing decodes yet: a prefill step of its own
    return running


def test_while_rows_decode_newcomers_that_fit_join_in_a_packed_step() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, prefill_token_budget=64, packable=packs_up_to(8)))
    running = decoding(scheduler)
    a, b = seq("a"), seq("b")
    scheduler.add(a)
    scheduler.add(b)
    batch = scheduler.schedule()
    assert batch.decode == [running] and batch.prefill == [a, b]
    c, d = seq("c", 3), seq("d", 6)
    scheduler.add(c)
    scheduler.add(d)
    # 2 x 6 does not pack: they could pack one at a time, but take one prefill step together instead.
    assert scheduler.schedule().prefill == [c, d]


def test_newcomers_that_do_not_fit_one_packed_step_take_full_prefill_steps() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, prefill_token_budget=16, packable=packs_up_to(8)))
    decoding(scheduler)
    burst = [seq(f"b{i}") for i in range(5)]
    for s in burst:
        scheduler.add(s)
    assert scheduler.schedule().prefill == burst[:4]  # the budget: 4 x 4
    assert scheduler.schedule().prefill == burst[4:]


def test_only_newcomers_with_a_free_row_count_for_packing() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=3, prefill_token_budget=4, packable=packs_up_to(8)))
    decoding(scheduler)
    queue = [seq(f"q{i}") for i in range(5)]  # 20 tokens wait, but only two rows are free: 8 tokens
    for s in queue:
        scheduler.add(s)
    assert scheduler.schedule().prefill == queue[:2]  # packed: the budget alone would take one


def test_a_prompt_too_long_to_pack_takes_a_full_prefill_step() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=8, prefill_token_budget=32, packable=packs_up_to(8)))
    decoding(scheduler)
    long, short = seq("long", 12), seq("short", 4)
    scheduler.add(long)
    scheduler.add(short)
    assert scheduler.schedule().prefill == [long, short]  # 2 x 12 within the budget


def test_with_no_free_row_nobody_joins() -> None:
    scheduler = Scheduler(SchedulerConfig(max_batch_size=1, prefill_token_budget=16, packable=packs_up_to(8)))
    running = decoding(scheduler)
    scheduler.add(seq("waiting"))
    batch = scheduler.schedule()
    assert batch.decode == [running] and batch.prefill == []
