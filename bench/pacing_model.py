"""A toy model of prefill pacing in a closed loop (not the engine): each step decodes every running row
(decode_ms(rows)) and prefills the newcomers it admits (a fixed F ms for the forward plus C ms a prompt
token); clients send their next request when one ends. It reproduced the H200's figures within ~10%
(bench/results/h200-session17/NOTES.md), and shows the trade pacing makes without chunked prefill.

    python bench/pacing_model.py
"""

from __future__ import annotations

import statistics

F, C = 3.7, 0.020  # ms a prefill forward costs whatever its size; ms a prompt token


def decode_ms(rows: int) -> float:
    return 4.85 + 0.0134 * rows  # the H200's Falcon-7B decode step: 4.88 ms at 1 row, 8.26 at 256


def run(clients: int, budget_of, new_tokens: int = 256, prompt: int = 128, steps: int = 6000):
    """(tok/s, p50 and p99 gap between a stream's tokens in ms, TTFT p50 ms)."""
    now, waiting, running, last, since = 0.0, list(range(clients)), {}, {}, dict.fromkeys(range(clients), 0.0)
    gaps, ttfts, tokens = [], [], 0
    for _ in range(steps):
        decode = decode_ms(len(running)) if running else 0.0
        fits = max(1, int(budget_of(decode, len(running)) // prompt))
        admitted, waiting = waiting[:fits], waiting[fits:]
        now += decode + (F + C * prompt * len(admitted) if admitted else 0.0)
        for row in list(running):
            gaps.append(now - last[row])
            last[row], running[row], tokens = now, running[row] - 1, tokens + 1
            if not running[row]:
                del running[row]
                waiting.append(row)
                since[row] = now
        for row in admitted:
            running[row], last[row], tokens = new_tokens - 1, now, tokens + 1
            ttfts.append(now - since[row])
    gaps.sort()
    return tokens / now * 1000, gaps[len(gaps) // 2], gaps[int(len(gaps) * 0.99)], statistics.median(ttfts)


def paced(stall: float, fixed: bool):
    """The budget a stall allows, charging the fixed part to each token (the first model) or not."""

    def budget(decode: float, rows: int) -> float:
        if not rows:
            return 1024
        if fixed:
            return ((stall - 1) * decode - F) / C
        return (stall - 1) * decode / ((F + C * 128) / 128)

    return budget


if __name__ == "__main__":
    policies = {
        "unpaced (1,024-token budget)": lambda decode, rows: 1024,
        "paced 2.5, fixed part per token": paced(2.5, fixed=False),
        "paced 2.5, fixed part apart": paced(2.5, fixed=True),
        "paced 3.0, fixed part apart": paced(3.0, fixed=True),
        **{f"fixed budget {b}": (lambda b: lambda decode, rows: b)(b) for b in (256, 384, 512, 768)},
    }
    for clients in (64, 256):
        for name, budget in policies.items():
            tok_s, p50, p99, ttft = run(clients, budget)
            step = decode_ms(clients)
            print(
                f"{clients:4d} {name:34s} {tok_s:8.0f} tok/s  gap p50 {p50:5.2f}  p99 {p99:5.2f} ms"
                f" ({p99 / step:.2f}x the step)  TTFT p50 {ttft:5.1f} ms"
            )
