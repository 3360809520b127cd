"""A model of the engine process's two threads, to see what the engine thread pays for waking the event
loop. The "engine" thread waits 5 ms with the interpreter lock released (the device's step), works
1.5 ms in Python (collect, launch), then hands its report to the event loop with
`call_soon_threadsafe`; the event loop's callback works `--loop-ms` in Python (routing the report to the
HTTP workers, the metrics). Without contention a step would take 6.5 ms plus the sleep's overshoot.

    python bench/gil_handoff.py --loop-ms 1.5 --switch-ms 5
    python bench/gil_handoff.py --loop-ms 1.5 --switch-ms 0.2

It prints the engine's median step and the median time `call_soon_threadsafe` took: the self-pipe write
inside it releases the lock, the woken loop takes it, and the engine thread may wait out the callback.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

DEVICE_S, ENGINE_S, STEPS = 0.005, 0.0015, 300


def work(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        for i in range(50):
            x += i


async def main(loop_s: float) -> None:
    loop = asyncio.get_running_loop()
    steps: list[float] = []
    handoffs: list[float] = []

    def engine() -> None:
        last = time.perf_counter()
        for _ in range(STEPS):
            time.sleep(DEVICE_S)
            work(ENGINE_S)
            started = time.perf_counter()
            loop.call_soon_threadsafe(work, loop_s)
            now = time.perf_counter()
            handoffs.append(now - started)
            steps.append(now - last)
            last = now

    await asyncio.to_thread(engine)
    print(
        f"loop {loop_s * 1e3:.1f} ms, switch interval {sys.getswitchinterval() * 1e3:.1f} ms: "
        f"step p50 {statistics.median(steps) * 1e3:.2f} ms, "
        f"call_soon_threadsafe p50 {statistics.median(handoffs) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--loop-ms", type=float, default=1.5)
    parser.add_argument("--switch-ms", type=float, default=5.0)
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_ms / 1e3)
    asyncio.run(main(args.loop_ms / 1e3))
