"""The sampler's cost per step on a GPU, by mode, and two ways of finding TOP_K's candidates.

`sample_rows` compiled as the runner compiles it, in a CUDA graph, for vocabularies of 32,000
(Llama-7B), 65,024 (Falcon-7B) and 128,256 (Llama-3-8B) tokens at 1, 8 and 64 rows, in each mode
(`PLAIN`, `TOP_K`; `FULL` runs uncompiled, as in the server). Then the TOP_K candidates alone:
`ranking_keys(...).topk(64)` over whole rows against the chunk-sorting kernels (`top_keys.largest`) at
several chunk sizes: all must pick the same tokens in the same order.

    python bench/sampler_modes.py   # writes $OUT/sampler_modes.json and prints a table
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemm_shapes import save, timed

from trickle.generation import top_keys
from trickle.generation.sampler import (
    FULL,
    PLAIN,
    TOP_K,
    TOP_K_CANDIDATES,
    SamplingTensors,
    ranking_keys,
    sample_rows,
)

VOCABS = (32000, 65024, 128256)
ROWS = (1, 8, 64)
# top_keys' (CHUNK, FINAL_MOST): keys a program of the first passes sorts, keys the last pass may sort
DEFAULT = (top_keys.CHUNK, top_keys.FINAL_MOST)
SWEEP = [DEFAULT, (256, 1024), (512, 1024), (1024, 4096)]


def whole(keys: torch.Tensor) -> torch.Tensor:
    return keys.topk(TOP_K_CANDIDATES, dim=-1).indices


def params(rows: int, top_k: int) -> SamplingTensors:
    def full(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((rows,), value, device="cuda", dtype=dtype)

    return SamplingTensors(
        temperature=full(0.8),
        top_p=full(0.95),
        top_k=full(top_k, torch.long),
        penalty=full(1.0),
        frequency=full(0.0),
        presence=full(0.0),
        seeds=torch.arange(rows, device="cuda"),
        steps=full(3, torch.long),
        ban_eos=full(0, torch.bool),
    )


def main() -> None:
    torch.manual_seed(0)
    compiled = torch.compile(sample_rows, dynamic=True)
    results = []
    for vocab in VOCABS:
        token_ids = torch.arange(vocab, device="cuda")
        eos = torch.zeros(vocab, dtype=torch.bool, device="cuda")
        for rows in ROWS:
            logits = torch.randn(rows, vocab, device="cuda") * 3
            seen = torch.zeros(rows, vocab, dtype=torch.bool, device="cuda")
            counts = torch.zeros(rows, vocab, dtype=torch.int32, device="cuda")
            row = {"vocab": vocab, "rows": rows}
            for mode in (PLAIN, TOP_K, FULL):
                sampler = sample_rows if mode == FULL else compiled
                p = params(rows, 0 if mode == PLAIN else 50)

                def step(i: int, sampler=sampler, p=p, mode=mode) -> None:
                    sampler(logits, p, seen, counts, eos, mode, token_ids=token_ids)

                row[f"{mode}_us"] = timed(step, 1, repeats=50) * 1e6
            keys = ranking_keys(logits)
            want = whole(keys)
            row["topk_whole_us"] = timed(lambda i: whole(keys), 1, repeats=50) * 1e6
            for chunk, final in SWEEP:
                top_keys.CHUNK, top_keys.FINAL_MOST = chunk, final
                equal = torch.equal(top_keys.largest(keys, TOP_K_CANDIDATES), want)
                us = timed(lambda i: top_keys.largest(keys, TOP_K_CANDIDATES), 1, repeats=50) * 1e6
                row[f"kernels_{chunk}_{final}"] = {"us": us, "equal": equal}
            top_keys.CHUNK, top_keys.FINAL_MOST = DEFAULT
            results.append(row)
            sweep = ", ".join(
                f"{name[8:]} {v['us']:.1f}{'' if v['equal'] else ' (WRONG)'}"
                for name, v in row.items()
                if name.startswith("kernels_")
            )
            print(
                f"vocab {vocab:6} rows {rows:3}: plain {row['plain_us']:7.1f} us,"
                f" top_k {row['top_k_us']:7.1f}, full {row['full_us']:7.1f};"
                f" candidates: whole-row topk {row['topk_whole_us']:6.1f}, kernels (chunk_final) {sweep}",
                flush=True,
            )
    save("sampler_modes", results)


if __name__ == "__main__":
    main()
