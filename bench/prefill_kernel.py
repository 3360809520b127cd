"""The paged prefill kernel's speed against SDPA over the same keys laid out contiguously, at the
shared-prefix workload's shape (rows of ~104 new tokens past a cached 1,456-token prefix), for several
launch settings:

    python bench/prefill_kernel.py --rows 8 --width 128 --cached 1456

with trickle importable. Prints one JSON line per (model shape, settings): milliseconds per layer and
the attention's useful TFLOP/s (the causal part only).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton.testing

from trickle.generation.kv.attention import PrefillTables, paged_prefill

SHAPES = {"falcon-7b": (71, 1, 64), "llama-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--cached", type=int, default=1456)
    args = parser.parse_args()
    block = 16
    for name, (heads, kv_heads, dim) in SHAPES.items():
        span = args.cached + args.width
        per_row = -(-span // block)
        keys = torch.randn(
            args.rows * per_row * block + block, kv_heads, dim, device="cuda", dtype=torch.bfloat16
        )
        values = torch.randn_like(keys)
        tables = (torch.randperm(args.rows * per_row, device="cuda") + 1).view(args.rows, per_row)
        starts = torch.full((args.rows,), args.cached, device="cuda")
        prefill = PrefillTables(tables, starts, starts + args.width, block)
        query = torch.randn(args.rows, heads, args.width, dim, device="cuda", dtype=torch.bfloat16)
        useful = 4 * args.rows * heads * dim * args.width * (args.cached + args.width / 2)

        def report(label: str, ms: float) -> None:
            line = {"shape": name, "kernel": label, "ms": round(ms, 4), "tflops": round(useful / ms / 1e9, 1)}
            print(json.dumps(line), flush=True)

        # SDPA over contiguous keys with the same causal offset (a boolean mask): what a gathered copy gets.
        slots = (
            tables[:, torch.arange(span, device="cuda") // block] * block
            + torch.arange(span, device="cuda") % block
        )
        k = keys[slots].transpose(1, 2)
        v = values[slots].transpose(1, 2)
        at = args.cached + torch.arange(args.width, device="cuda")
        mask = torch.arange(span, device="cuda")[None] <= at[:, None]
        report(
            "sdpa, gathered",
            triton.testing.do_bench(
                lambda: F.scaled_dot_product_attention(query, k, v, attn_mask=mask, enable_gqa=True)
            ),
        )
        for m, tile, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)):
            launch = {"M": m, "TILE": tile, "num_warps": warps, "num_stages": stages}
            try:
                ms = triton.testing.do_bench(
                    lambda: paged_prefill(query, keys, values, prefill, dim**-0.5, launch=launch)
                )
            except Exception as err:  # out of shared memory, say
                print(json.dumps({"shape": name, "launch": launch, "error": str(err)[:100]}), flush=True)
                continue
            report(json.dumps(launch), ms)


if __name__ == "__main__":
    main()
