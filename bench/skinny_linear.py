"""Launch settings for `generation.linear`'s one-row kernel, and a variant of it for 2 to 64 rows,
swept on the decode step's layer shapes (`bench/gemm_shapes.py`) against cuBLAS: each setting's time
on each case, the best, and, for one row, `generation.linear.CONFIG` (what the server runs). Matrices
are copied past the L2's size as in `gemm_shapes`.

The variant for several rows (a matrix product with the rows padded to 16 or more, each program taking
BLOCK_N whole rows of the weight) lives only here: with one setting for every shape it tied cuBLAS at
2-16 rows and lost at 32-64 (`bench/results/h200-session20/`), so the server keeps cuBLAS there.

    python bench/skinny_linear.py   # writes $OUT/skinny_linear.json and prints a table
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemm_shapes import BANDWIDTH, cases, save, timed

from trickle.generation.linear import CONFIG, skinny_linear

ROWS = (1, 2, 8, 16, 32, 64)
# (BLOCK_N, BLOCK_K, warps, stages)
ONE_ROW = [(n, k, w, s) for n in (2, 4, 8) for k in (256, 512, 1024) for w in (4, 8) for s in (1, 4)]
SEVERAL = [(n, k, w, s) for n in (32, 64, 128) for k in (128, 256, 512) for w in (4, 8) for s in (2, 4)]


@triton.jit
def _rows_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        w = tl.load(
            w_ptr + cols.to(tl.int64)[:, None] * K + k[None, :], mask=(cols < N)[:, None] & (k < K)[None, :]
        )
        x = tl.load(
            x_ptr + rows[:, None] * K + k[None, :], mask=(rows < M)[:, None] & (k < K)[None, :], other=0.0
        )
        acc = tl.dot(x, tl.trans(w), acc)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def rows_linear(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int]) -> torch.Tensor:
    (m, k), n = x.shape, w.shape[0]
    block_n, block_k, warps, stages = config
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, block_n),)
    rows = max(16, triton.next_power_of_2(m))
    _rows_kernel[grid](x, w, y, m, n, k, rows, block_n, block_k, num_warps=warps, num_stages=stages)
    return y


def main() -> None:
    results = []
    for case, ws, x in cases(ROWS):
        size, copies, rows = case["mb"] * 1e6, len(ws), case["rows"]
        ref = F.linear(x.float(), ws[0].float())
        case["cublas_us"] = timed(lambda i, x=x: F.linear(x, ws[i]), copies) * 1e6
        case["cublas_err"] = (F.linear(x, ws[0]).float() - ref).abs().max().item()
        kernel = rows_linear if rows > 1 else lambda x, w, c: skinny_linear(x, w, None, c)
        times = {}
        for config in ONE_ROW if rows == 1 else SEVERAL:
            run = lambda i, x=x, c=config: kernel(x, ws[i], c)  # noqa: E731
            with contextlib.suppress(triton.runtime.errors.OutOfResources):
                times[str(config)] = timed(run, copies, 3) * 1e6
        best = min(times, key=times.__getitem__)
        case["best"], case["best_us"], case["times"] = best, times[best], times
        if rows == 1:
            case["server_us"] = timed(lambda i, x=x: skinny_linear(x, ws[i], None), copies) * 1e6
            case["server_err"] = (skinny_linear(x, ws[0], None).float() - ref).abs().max().item()
        for what in ("cublas", "server", "best"):
            if f"{what}_us" in case:
                case[f"{what}_bw"] = size / (case[f"{what}_us"] / 1e6) / BANDWIDTH
        results.append(case)
        print(json.dumps({key: v for key, v in case.items() if key != "times"}), flush=True)
    save("skinny_linear", results)
    print(f"\none row, the server's setting: {CONFIG}")
    print("\n| model | matrix | rows | cuBLAS | the server's setting | best (setting) |")
    print("|---|---|---|---|---|---|")
    for c in results:
        server = f"{c['server_us']:.1f} ({c['server_bw']:.2f})" if "server_us" in c else ""
        print(
            f"| {c['model']} | {c['name']} | {c['rows']} | {c['cublas_us']:.1f} us ({c['cublas_bw']:.2f}) | "
            f"{server} | {c['best_us']:.1f} ({c['best_bw']:.2f}) {c['best']} |"
        )


if __name__ == "__main__":
    main()
