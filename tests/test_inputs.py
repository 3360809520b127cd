"""The decode step's inputs stay on the device from step to step: rows that decode again in their row
advance there, and only the rows that changed are written from the host. After any mix of steps, what
that leaves equals a full rebuild from the rows."""

from __future__ import annotations

import torch

from trickle.generation.params import SamplingParams
from trickle.generation.runner.inputs import RowHistory, StepInputs
from trickle.generation.sequence import Sequence, Status


def row(name: str, prompt_len: int, **params: float) -> Sequence:
    seq = Sequence(name, list(range(3, 3 + prompt_len)), SamplingParams(**params), 7)
    seq.status = Status.RUNNING
    return seq


def as_rebuilt(inputs: StepInputs, rows: list[Sequence], decoded: int) -> None:
    """The incremental inputs of `rows` equal a full rebuild (the token column where the row's token is
    the host's; one in flight comes from the previous step's output on the device)."""
    fresh = StepInputs(
        inputs.rows.shape[0], inputs.longs.shape[0] - inputs.rows.shape[0], 64, torch.device("cpu")
    )
    fresh.load(rows, decoded)
    n = len(rows)
    got, want = inputs.longs[:n], fresh.longs[:n]
    assert torch.equal(got[:, StepInputs.POSITION :], want[:, StepInputs.POSITION :])
    own = want[:, StepInputs.SOURCE] < 0
    assert torch.equal(got[own, StepInputs.TOKEN], want[own, StepInputs.TOKEN])
    assert torch.equal(inputs.floats[:n], fresh.floats[:n])
    assert torch.equal(inputs.longs[n:], fresh.longs[n:]), "rows past the live ones are padding"


def test_rows_that_decode_again_advance_on_the_device_and_changed_rows_come_from_the_host() -> None:
    inputs = StepInputs(8, 0, 64, torch.device("cpu"))
    a = row("a", 5, temperature=0.0, min_new_tokens=3)
    b = row("b", 9, temperature=0.7, top_k=5, top_p=0.9)
    c = row("c", 2, repetition_penalty=1.2)
    d = row("d", 4, temperature=1.1)
    steps = [
        ([a, b, c], 0),  # three newcomers prefill
        ([a, b, c], 3),  # they decode: nothing changed
        ([a, b, c], 3),
        ([a, b, c, d], 3),  # a newcomer joins in row 3
        ([a, d, c], 3),  # b left: d moves from row 3 into its row, row 3 is freed
        ([a, d, c], 3),
        ([a, d], 2),  # c left from the last row
    ]
    written = []
    previous: list[Sequence] = []
    for rows, decoded in steps:
        inputs.load(rows, decoded)
        written.append(inputs.written)
        as_rebuilt(inputs, rows, decoded)
        # The engine: the step is launched, then the one before is collected.
        for index, seq in enumerate(rows):
            seq.launched += 1
            seq.row_index = index
        for seq in previous:
            if seq in rows:
                seq.output_ids.append(100 + len(seq.output_ids))
        previous = rows
    assert written == [3, 0, 0, 1, 2, 0, 1]


def test_rows_stepped_again_without_a_launch_are_written_again() -> None:
    """A profiler stepping the same rows over and over (nothing launched in between) gets the same
    inputs each time, not rows that run ahead."""
    inputs = StepInputs(4, 0, 64, torch.device("cpu"))
    rows = [row("a", 5), row("b", 6)]
    for seq in rows:
        seq.launched, seq.output_ids = 4, [1, 2, 3, 4]
    inputs.load(rows, 2)
    first = inputs.longs.clone()
    inputs.load(rows, 2)
    assert inputs.written == 2
    assert torch.equal(inputs.longs, first)


def test_mixed_newcomers_tokens_follow_the_rows_each_in_its_newcomers_table_and_leave_as_padding() -> None:
    """A step with a decoding row and two newcomers mixed into its forward: each newcomer's row feeds
    its last uncached token; its other uncached tokens follow the rows, at their positions, reading
    and writing its row's blocks. The next step, without newcomers, leaves those entries padding."""
    inputs = StepInputs(5, 8, 64, torch.device("cpu"))
    a, b, c = row("a", 3), row("b", 4), row("c", 6)
    for slot, seq in enumerate((a, b, c)):
        seq.slot = slot
    a.launched, a.output_ids, a.row_index = 1, [40], 0
    c.num_cached = 4  # two of its tokens to prefill past a cached block
    inputs.load([a, b, c], decoded=1, mixed=2)
    assert inputs.mixed == 3 + 1
    token, position, table = (
        inputs.longs[:, column] for column in (StepInputs.TOKEN, StepInputs.POSITION, StepInputs.TABLE)
    )
    assert position[:3].tolist() == [3, 3, 5] and table[:3].tolist() == [0, 1, 2]
    assert token[1:3].tolist() == [b.tokens[3], c.tokens[5]]
    assert token[3:7].tolist() == [*b.tokens[:3], c.tokens[4]]
    assert position[3:7].tolist() == [0, 1, 2, 4] and table[3:7].tolist() == [1, 1, 1, 2]
    assert (inputs.longs[3:7, StepInputs.SOURCE] == -1).all()
    # How many of its newcomer's tokens the step holds before each entry's, and the entry of the first.
    assert inputs.earlier[:7].tolist() == [0, 3, 1, 0, 1, 2, 0]
    assert inputs.first[1:7].tolist() == [3, 6, 3, 3, 3, 6]
    for index, seq in enumerate((a, b, c)):
        seq.launched += 1
        seq.row_index = index
    inputs.load([a, b, c], decoded=3)
    assert inputs.mixed == 0 and position[:3].tolist() == [4, 4, 6]
    assert inputs.earlier[:3].tolist() == [0, 0, 0], "the newcomers advanced on the device decode alone"
    padding = StepInputs(5, 8, 64, torch.device("cpu"))
    assert torch.equal(inputs.longs[3:], padding.longs[3:]), "the mixed tokens' entries are padding again"


def test_row_history_says_exactly_which_tokens_each_newcomer_holds_whatever_its_row_held_before() -> None:
    """`seen`: every token of the prompt and output; `counts`: how often each is in the output (a
    preempted row comes back with output already)."""
    seen = torch.zeros(6, 40, dtype=torch.bool)
    counts = torch.zeros(6, 40, dtype=torch.int32)
    history = RowHistory(seen, counts)
    seen[2, 30] = seen[4, 31] = seen[5, 32] = True  # left by rows that held these slots before
    counts[2, 30] = counts[4, 9] = counts[5, 32] = 3
    kept, kept_counts = seen[5].clone(), counts[5].clone()
    waves = [
        [("a", [3, 3, 7], [9, 9, 3], 2), ("b", [1], [], 4)],
        [("c", list(range(10, 39)), [0, 1], 1)],  # more tokens than the buffers held: they grow
        [("d", [5], [5, 6, 6, 6], 2), ("e", [8, 9], [], 0), ("f", [2], [4], 3)],
    ]
    for wave in waves:
        rows = []
        for name, prompt, output, slot in wave:
            seq = Sequence(name, prompt, SamplingParams(), 7)
            seq.output_ids, seq.slot = output, slot
            rows.append(seq)
        history.mark(rows)
        for seq in rows:
            want = torch.zeros(40, dtype=torch.bool)
            want[seq.tokens] = True
            assert torch.equal(seen[seq.slot], want), seq.request_id
            want_counts = torch.zeros(40, dtype=torch.int32)
            for token in seq.output_ids:
                want_counts[token] += 1
            assert torch.equal(counts[seq.slot], want_counts), seq.request_id
    assert torch.equal(counts[5], kept_counts)
    assert torch.equal(seen[5], kept), "a row no newcomer took is left alone"
