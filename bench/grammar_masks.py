"""What a step's grammar masks cost the engine thread: 64 rows following `json_object` on the Falcon-7B
shape's vocabulary (a synthetic byte-level tokenizer of 65,024 tokens), each taking a random allowed
token a step, with the masks computed by llguidance's thread pool (`LLExecutor`, its default or N
threads) or one row after another on the calling thread. `--busy N` starts N processes that spin, and
a Python thread in this process wakes every half millisecond (as the engine process's event loop
does): the host of a loaded server, where HTTP workers and clients share the cores.

    python bench/grammar_masks.py --busy 2   # prints a line per way: mean, p50, p90 ms a step
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
import time

import llguidance
import numpy as np
import torch

from trickle.generation.params import ResponseFormat
from trickle.generation.random_models import synthetic_tokenizer
from trickle.generation.structured import Grammars

VOCAB, ROWS, STEPS = 65024, 64, 200
WAYS = ("pool", "pool-1", "pool-2", "engine thread")


def _spin() -> None:
    while True:
        pass


def _wake(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(2000):
            x += i
        time.sleep(0.0005)


def run(way: str, grammars: Grammars) -> np.ndarray:
    spec = ResponseFormat(type="json_object")
    executor = llguidance.LLExecutor(int(way.split("-")[1]) if "-" in way else None)
    matchers = [grammars.matcher(spec) for _ in range(ROWS)]
    words = -(-VOCAB // 32)
    host = torch.zeros(ROWS, words, dtype=torch.int32)
    shifts = torch.arange(32, dtype=torch.int32)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(STEPS):
        host.fill_(-1)
        started = time.perf_counter()
        if way == "engine thread":
            for row, matcher in enumerate(matchers):
                matcher.unsafe_compute_mask_ptr(host.data_ptr() + row * 4 * words, 4 * words)
        else:
            rows = list(zip(matchers, range(ROWS), strict=True))
            executor.unsafe_compute_mask_ptr(rows, host.data_ptr(), 4 * words, ROWS)
        times.append(time.perf_counter() - started)
        allowed = ((host[:, :, None] >> shifts) & 1).view(ROWS, -1)[:, :VOCAB].bool()
        for row, matcher in enumerate(matchers):
            if matcher.is_stopped():  # the object closed: a new request takes the row
                matchers[row] = grammars.matcher(spec)
                continue
            choices = allowed[row].nonzero().flatten()
            matcher.consume_token(int(choices[rng.integers(len(choices))]))
    return np.array(times) * 1e3


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--busy", type=int, default=0, help="spinning processes to start")
    args = parser.parse_args()
    grammars = Grammars(synthetic_tokenizer(VOCAB), VOCAB, [0])
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    stop = threading.Event()
    for process in spinners:
        process.start()
    if args.busy:
        threading.Thread(target=_wake, args=(stop,), daemon=True).start()
    try:
        for way in WAYS:
            ms = run(way, grammars)
            print(
                f"{way:14} busy={args.busy}  mean {ms.mean():.2f}  p50 {np.median(ms):.2f}"
                f"  p90 {np.percentile(ms, 90):.2f} ms a step of {ROWS} rows"
            )
    finally:
        stop.set()
        for process in spinners:
            process.kill()


if __name__ == "__main__":
    main()
