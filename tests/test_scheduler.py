"""The scheduler on the CPU with hand-made sequences: no model, no tensors."""

from __future__ import annotations

from generation.params import SamplingParams
from generation.scheduler import Scheduler, SchedulerConfig
from generation.sequence import Sequence, Status


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
