"""How close each weight matrix multiply of a decode step comes to the memory-bandwidth limit: the
layer shapes of Falcon-7B, Llama-7B and Llama-3-8B, alone and with the projections that read the same
input fused into one matrix (Falcon's query/key/value with its MLP's up projection, which its parallel
attention feeds the same normed input; Llama's query, key and value; its gate and up projections),
under cuBLAS (`F.linear`) and, for one row, a Triton kernel written for a matrix-vector product.

Each case runs enough copies of its matrix (distinct tensors, over 512 MB together) in one CUDA graph that
nothing stays in the 50 MB L2, as in a step over 32 layers.

    python bench/gemm_shapes.py   # writes $OUT/gemm_shapes.json and prints a table
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# (model, name, out features, in features)
SHAPES = [
    ("falcon-7b", "qkv", 4672, 4544),
    ("falcon-7b", "dense", 4544, 4544),
    ("falcon-7b", "up", 18176, 4544),
    ("falcon-7b", "down", 4544, 18176),
    ("falcon-7b", "qkv+up (fused)", 4672 + 18176, 4544),
    ("falcon-7b", "dense+down (fused along K)", 4544, 4544 + 18176),
    ("falcon-7b", "head", 65024, 4544),
    ("llama-7b", "q", 4096, 4096),
    ("llama-7b", "qkv (fused)", 3 * 4096, 4096),
    ("llama-7b", "gate", 11008, 4096),
    ("llama-7b", "gate+up (fused)", 2 * 11008, 4096),
    ("llama-7b", "down", 4096, 11008),
    ("llama-3-8b", "k", 1024, 4096),
    ("llama-3-8b", "qkv (fused)", 6144, 4096),
    ("llama-3-8b", "gate+up (fused)", 2 * 14336, 4096),
    ("llama-3-8b", "down", 4096, 14336),
]
ROWS = (1, 8, 64, 256)
BANDWIDTH = 4.26e12  # ../shared/GPU.md: measured read bandwidth, bytes/s


# (BLOCK_N, BLOCK_K, warps, stages), each timed on each shape in a graph like the others
CONFIGS = [
    (n, k, w, s)
    for n in (2, 4, 8, 16)
    for k in (256, 512, 1024)
    for w in (4, 8)
    for s in (1, 4)
    if n * k <= 8192
]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[n] = sum_k x[k] w[n, k]: each program takes BLOCK_N rows of w, whole.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K))
        x = tl.load(x_ptr + cols, mask=cols < K)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < N)


def gemv(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int]) -> torch.Tensor:
    n, k = w.shape
    block_n, block_k, warps, stages = config
    y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, n, k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages
    )
    return y


def timed(run, copies: int, repeats: int = 20) -> float:
    """Seconds one call takes, from a CUDA graph of `copies` calls replayed `repeats` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(copies):
            run(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            run(i)
    return replayed(graph, repeats) / copies


def replayed(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    """Seconds a replay of `graph` takes, over `repeats` replays after a first one."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def save(name: str, results: list[dict[str, object]]) -> None:
    """The results as $OUT/NAME.json."""
    (Path(os.environ.get("OUT", ".")) / f"{name}.json").write_text(json.dumps(results, indent=1))


def cases(row_counts: Iterable[int]) -> Iterator[tuple[dict[str, Any], list[torch.Tensor], torch.Tensor]]:
    """Each shape at each row count: the case's description, its matrix's copies (distinct tensors,
    over 512 MB together, so nothing stays in L2) and a random input. A shape's copies are freed once
    its row counts are done."""
    torch.manual_seed(0)
    for model, name, n, k in SHAPES:
        size = n * k * 2
        copies = max(4, math.ceil(512e6 / size))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        for rows in row_counts:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            yield {"model": model, "name": name, "n": n, "k": k, "rows": rows, "mb": size / 1e6}, ws, x
        ws.clear()
        torch.cuda.empty_cache()


def main() -> None:
    results = []
    for out, ws, x in cases(ROWS):
        size, copies, rows = out["mb"] * 1e6, len(ws), out["rows"]
        seconds = timed(lambda i, x=x: F.linear(x, ws[i]), copies)
        out["cublas_us"] = seconds * 1e6
        out["cublas_bw"] = size / seconds / BANDWIDTH
        if rows == 1:
            ref = F.linear(x.float(), ws[0].float())
            best = None
            for config in CONFIGS:
                err = (gemv(x, ws[0], config).float() - ref).abs().max().item()
                seconds = timed(lambda i, x=x, c=config: gemv(x, ws[i], c), copies, repeats=5)
                if best is None or seconds < best[0]:
                    best = (seconds, config, err)
            seconds, config, err = best
            seconds = timed(lambda i, x=x, c=config: gemv(x, ws[i], c), copies)
            out["triton_us"] = seconds * 1e6
            out["triton_bw"] = size / seconds / BANDWIDTH
            out["triton_err"] = err
            out["triton_config"] = config
        results.append(out)
        print(json.dumps(out), flush=True)
    save("gemm_shapes", results)
    print(f"\n| model | matrix | MB | rows | cuBLAS us | share of BW | Triton us | share |\n|{'---|' * 8}")
    for r in results:
        tri = f"{r['triton_us']:.1f} | {r['triton_bw']:.2f}" if "triton_us" in r else "|"
        print(
            f"| {r['model']} | {r['name']} | {r['mb']:.0f} | {r['rows']} | {r['cublas_us']:.1f} | "
            f"{r['cublas_bw']:.2f} | {tri} |"
        )


if __name__ == "__main__":
    main()
