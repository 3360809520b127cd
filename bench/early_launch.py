"""The one-row linear kernel launched early (`generation.linear.early_launch`: programmatic dependent
launch) against launched after the kernel before it ends, in the chain of kernels a decoder layer runs
at one row, with each program asking the first bytes of its weight rows into L2 before it waits.

A layer of the Falcon-7B shape: a layer norm, the fused query/key/value and MLP-up product (gelu on its
up slice), four small kernels standing in for rotary, KV store and attention, the attention output
product, the MLP-down product adding both residuals. Of the Llama-7B shape: RMS norm, query/key/value,
four small kernels, output projection adding the residual, RMS norm, the gated gate/up product, down
adding the residual. 32 layers of their own weights in one CUDA graph (nothing stays in L2).

    python bench/early_launch.py   # writes $OUT/early_launch.json and prints a table
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemm_shapes import save, timed

from trickle.generation.linear import skinny_linear

LAYERS = 32
SETTINGS = [(False, 0)] + [(True, size) for size in (0, 512, 1024, 2048, 4096, 8192)]


def falcon(early: bool, prefetch: int) -> tuple[Any, float]:
    torch.manual_seed(0)
    hidden, up = 4544, 18176
    qkv = 4672
    weights = [
        (
            torch.randn(qkv + up, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5,
            torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5,
            torch.randn(hidden, up, device="cuda", dtype=torch.bfloat16) / up**0.5,
        )
        for _ in range(LAYERS)
    ]
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    norm = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    small = torch.randn(qkv, device="cuda", dtype=torch.bfloat16)

    def layer(i: int) -> torch.Tensor:
        fused, dense, down = weights[i]
        h = F.layer_norm(x, (hidden,), norm, norm)
        both = skinny_linear(
            h, fused, None, act="gelu", act_columns=(qkv, qkv + up), early=early, prefetch_bytes=prefetch
        )
        s = small
        for _ in range(4):
            s = s * 1.001 + 0.5
        attn = skinny_linear(x, dense, None, early=early, prefetch_bytes=prefetch)
        return skinny_linear(
            both[:, qkv:], down, None, addends=(attn, x), early=early, prefetch_bytes=prefetch
        )

    return layer, sum(sum(w.numel() * 2 for w in ws) for ws in weights) / LAYERS


def llama(early: bool, prefetch: int) -> tuple[Any, float]:
    torch.manual_seed(0)
    hidden, inner = 4096, 11008
    weights = [
        (
            torch.randn(3 * hidden, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5,
            torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5,
            torch.randn(2 * inner, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5,
            torch.randn(hidden, inner, device="cuda", dtype=torch.bfloat16) / inner**0.5,
        )
        for _ in range(LAYERS)
    ]
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    norm = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    small = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)

    def layer(i: int) -> torch.Tensor:
        qkv, o, gate_up, down = weights[i]
        h = F.rms_norm(x, (hidden,), norm)
        skinny_linear(h, qkv, None, early=early, prefetch_bytes=prefetch)
        s = small
        for _ in range(4):
            s = s * 1.001 + 0.5
        r = skinny_linear(s[None], o, None, addends=(x,), early=early, prefetch_bytes=prefetch)
        h = F.rms_norm(r, (hidden,), norm)
        g = skinny_linear(
            h,
            gate_up,
            None,
            act="silu",
            act_columns=(0, inner),
            up_start=inner,
            early=early,
            prefetch_bytes=prefetch,
        )
        return skinny_linear(g, down, None, addends=(r,), early=early, prefetch_bytes=prefetch)

    return layer, sum(sum(w.numel() * 2 for w in ws) for ws in weights) / LAYERS


def main() -> None:
    torch.manual_seed(0)
    results = []
    for name, build in (("falcon-7b", falcon), ("llama-7b", llama)):
        reference = None
        for early, prefetch in SETTINGS:
            layer, layer_bytes = build(early, prefetch)
            out = layer(0)
            if reference is None:
                reference = out
            same = bool(torch.equal(out, reference))
            us = timed(layer, LAYERS) * 1e6
            row = {
                "model": name,
                "early": early,
                "prefetch_bytes": prefetch,
                "layer_us": us,
                "step_ms": us * LAYERS / 1e3,
                "gb_s": layer_bytes / us / 1e3,
                "same_output": same,
            }
            results.append(row)
            print(
                f"{name:10} early {early!s:5} prefetch {prefetch:5}: {us:6.2f} us a layer,"
                f" {row['step_ms']:.3f} ms for 32, {row['gb_s']:6.0f} GB/s, same output {same}",
                flush=True,
            )
            del layer
            torch.cuda.empty_cache()
    save("early_launch", results)


if __name__ == "__main__":
    main()
