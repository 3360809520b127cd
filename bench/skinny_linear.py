"""The launch settings of `generation.linear`'s kernel, swept on the decode step's layer shapes
(`bench/gemm_shapes.py`) at 1 to 64 rows, against cuBLAS: each setting's time on each case, the best,
and what `launch_config` picks. Matrices are copied past the L2's size as in `gemm_shapes`.

    python bench/skinny_linear.py   # writes $OUT/skinny_linear.json and prints a table
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from gemm_shapes import BANDWIDTH, SHAPES, timed

from trickle.generation.linear import launch_config, skinny_linear

ROWS = (1, 2, 8, 16, 32, 64)
ONE_ROW = [(n, k, w, s) for n in (2, 4, 8) for k in (256, 512, 1024) for w in (4, 8) for s in (1, 4)]
SEVERAL = [(n, k, w, s) for n in (32, 64, 128) for k in (128, 256, 512) for w in (4, 8) for s in (2, 4)]


def main() -> None:
    torch.manual_seed(0)
    results = []
    for model, name, n, k in SHAPES:
        size = n * k * 2
        copies = max(4, math.ceil(512e6 / size))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            case = {"model": model, "name": name, "n": n, "k": k, "rows": rows, "mb": size / 1e6}
            case["cublas_us"] = timed(lambda i, x=x: F.linear(x, ws[i]), copies) * 1e6
            times = {}
            for config in ONE_ROW if rows == 1 else SEVERAL:
                run = lambda i, x=x, c=config: skinny_linear(x, ws[i], None, c)  # noqa: E731
                with contextlib.suppress(triton.runtime.errors.OutOfResources):
                    times[str(config)] = timed(run, copies, 3) * 1e6
            best = min(times, key=times.__getitem__)
            picked = launch_config(rows, n, k)
            case["picked"] = str(picked)
            case["picked_us"] = timed(lambda i, x=x: skinny_linear(x, ws[i], None), copies) * 1e6
            case["picked_err"] = (skinny_linear(x, ws[0], None).float() - ref).abs().max().item()
            case["cublas_err"] = (F.linear(x, ws[0]).float() - ref).abs().max().item()
            case["best"], case["best_us"], case["times"] = best, times[best], times
            for what in ("cublas", "picked", "best"):
                case[f"{what}_bw"] = size / (case[f"{what}_us"] / 1e6) / BANDWIDTH
            results.append(case)
            print(json.dumps({key: v for key, v in case.items() if key != "times"}), flush=True)
        ws.clear()
        torch.cuda.empty_cache()
    folder = Path(os.environ.get("OUT", "."))
    (folder / "skinny_linear.json").write_text(json.dumps(results, indent=1))
    print("\n| model | matrix | rows | cuBLAS | picked | best (setting) |\n|---|---|---|---|---|---|")
    for c in results:
        print(
            f"| {c['model']} | {c['name']} | {c['rows']} | {c['cublas_us']:.1f} us ({c['cublas_bw']:.2f}) | "
            f"{c['picked_us']:.1f} ({c['picked_bw']:.2f}) | "
            f"{c['best_us']:.1f} ({c['best_bw']:.2f}) {c['best']} |"
        )


if __name__ == "__main__":
    main()
