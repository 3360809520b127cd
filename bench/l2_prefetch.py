"""Whether a layer matrix read into L2 on a side stream, while the small kernels before its product run
(rotary, KV store, decode attention: some 8-11 us a layer at one row that read almost nothing), makes
the one-row product that follows faster than the kernels' time it hides under.

Each case is a CUDA graph of 32 layers, each layer its own copy of the matrix (nothing stays in L2 from
one layer to the next): `gap` (a few small kernels standing in for attention) then the product, with
the first MB of the matrix prefetched on a side stream that forks before the gap and joins at the end
of the graph. Prefetched by `cp.async.bulk.prefetch.L2` (Hopper; one instruction a chunk), by
`prefetch.global.L2::evict_last` (one a 128-byte line), or by loads that keep nothing. Also, the product
right after its matrix was prefetched and waited for: how fast it reads from L2 at all.

    python bench/l2_prefetch.py   # writes $OUT/l2_prefetch.json and prints a table
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemm_shapes import replayed, save

from trickle.generation.linear import skinny_linear

LAYERS = 32
MB = 1 << 20
CHUNK = 64 * 1024  # bytes a bulk prefetch instruction asks for


@triton.jit
def _bulk_kernel(base, stop, CHUNK_BYTES: tl.constexpr, PER: tl.constexpr):  # type: ignore[no-untyped-def]
    offsets = (tl.program_id(0) * PER + tl.arange(0, PER)).to(tl.int64) * CHUNK_BYTES
    size = tl.minimum(stop - offsets, CHUNK_BYTES).to(tl.int32)
    addr = tl.where(size > 0, base + offsets, base)
    size = tl.where(size > 0, size, 16)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
        "=r,l,r",
        [addr, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _line_kernel(base, stop, PER: tl.constexpr):  # type: ignore[no-untyped-def]
    offsets = (tl.program_id(0) * PER + tl.arange(0, PER)).to(tl.int64) * 128
    addr = tl.where(offsets < stop, base + offsets, base)
    tl.inline_asm_elementwise(
        "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;",
        "=r,l",
        [addr],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _load_kernel(w_ptr, n, never, out_ptr, BLOCK: tl.constexpr, PER: tl.constexpr):  # type: ignore[no-untyped-def]
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(PER):
        offsets = (tl.program_id(0) * PER + j) * BLOCK + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + offsets, mask=offsets < n, other=0.0, eviction_policy="evict_last")
        acc += w.to(tl.float32)
    total = tl.sum(acc)
    if total == never:  # a NaN: never equal, but the loads must stay
        tl.store(out_ptr, total)


def prefetch(method: str, weight: torch.Tensor, nbytes: int, sink: torch.Tensor) -> None:
    nbytes = min(nbytes, weight.numel() * weight.element_size())
    if method == "bulk":
        per = 8
        chunks = triton.cdiv(nbytes, CHUNK)
        grid = (triton.cdiv(chunks, per),)
        _bulk_kernel[grid](weight.data_ptr(), nbytes, CHUNK_BYTES=CHUNK, PER=per, num_warps=1)
    elif method == "line":
        per = 1024
        _line_kernel[(triton.cdiv(nbytes // 128, per),)](weight.data_ptr(), nbytes, PER=per, num_warps=4)
    else:
        block, per = 2048, 8
        n = nbytes // weight.element_size()
        grid = (triton.cdiv(n, block * per),)
        _load_kernel[grid](weight, n, float("nan"), sink, BLOCK=block, PER=per, num_warps=8)


def graph_us(body: Callable[[int, torch.cuda.Stream], None], repeats: int = 30) -> float:
    """Microseconds a layer takes, from a CUDA graph of LAYERS calls of `body` replayed."""
    side = torch.cuda.Stream()
    main = torch.cuda.current_stream()
    warm = torch.cuda.Stream()
    warm.wait_stream(main)
    with torch.cuda.stream(warm):
        for i in range(LAYERS):
            body(i, side)
        torch.cuda.current_stream().wait_stream(side)
    main.wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        side.wait_stream(torch.cuda.current_stream())  # the side stream joins the capture, used or not
        for i in range(LAYERS):
            body(i, side)
        torch.cuda.current_stream().wait_stream(side)
    return replayed(graph, repeats) * 1e6 / LAYERS


SHAPES = (  # name, out, in, small kernels before it
    ("falcon-7b dense", 4544, 4544, 6),
    ("llama-7b o_proj", 4096, 4096, 6),
    ("falcon-7b qkv+up", 22848, 4544, 2),
    ("llama-7b gate+up", 22016, 4096, 2),
)


def main() -> None:
    torch.manual_seed(0)
    sink = torch.zeros(1, device="cuda")
    results: list[dict[str, Any]] = []
    for name, n, k, small in SHAPES:
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(LAYERS)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        scratch = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        size = n * k * 2

        def gap(kernels: int = small) -> None:
            y = scratch
            for _ in range(kernels):
                y = y * 1.001 + 0.5

        def plain(i: int, side: torch.cuda.Stream) -> None:
            skinny_linear(x, weights[i], None)

        def gapped(i: int, side: torch.cuda.Stream) -> None:
            gap()
            skinny_linear(x, weights[i], None)

        row: dict[str, Any] = {"case": name, "mb": size / MB, "gap_kernels": small}
        row["product_us"] = graph_us(plain)
        row["gap_us"] = graph_us(lambda i, side: gap())
        row["gap_then_product_us"] = graph_us(gapped)
        print(
            f"{name:18} {size / MB:6.1f} MB: product {row['product_us']:6.2f} us, gap {row['gap_us']:5.2f},"
            f" gap then product {row['gap_then_product_us']:6.2f}",
            flush=True,
        )
        row["variants"] = []
        for method in ("bulk", "line", "load"):
            for mb in (8, 16, 24, 32, 40, 48):
                nbytes = min(mb * MB, size)

                def overlapped(i: int, side: Any, method: str = method, nbytes: int = nbytes) -> None:
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        prefetch(method, weights[i], nbytes, sink)
                    gap()
                    skinny_linear(x, weights[i], None)

                def joined(i: int, side: Any, method: str = method, nbytes: int = nbytes) -> None:
                    prefetch(method, weights[i], nbytes, sink)
                    skinny_linear(x, weights[i], None)

                def alone(i: int, side: Any, method: str = method, nbytes: int = nbytes) -> None:
                    prefetch(method, weights[i], nbytes, sink)

                variant = {
                    "method": method,
                    "mb": nbytes / MB,
                    "overlapped_us": graph_us(overlapped),
                    "prefetch_then_product_us": graph_us(joined),
                    "prefetch_us": graph_us(alone),
                }
                row["variants"].append(variant)
                print(
                    f"  {method:5} {nbytes / MB:5.1f} MB: gap|prefetch then product"
                    f" {variant['overlapped_us']:6.2f} us"
                    f" (saves {row['gap_then_product_us'] - variant['overlapped_us']:5.2f}),"
                    f" prefetch alone {variant['prefetch_us']:6.2f}, prefetch then product"
                    f" {variant['prefetch_then_product_us']:6.2f}",
                    flush=True,
                )
                if nbytes == size:
                    break
        results.append(row)
        weights.clear()
        torch.cuda.empty_cache()
    save("l2_prefetch", results)


if __name__ == "__main__":
    main()
