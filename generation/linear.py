"""The decoder layers' linear layers in a decode step of one row, on a GPU: a Triton matrix-vector
kernel. On the H200 it reads the Falcon-7B and Llama-7B layer matrices at 73-93% of the memory
bandwidth, where cuBLAS's kernels for one row read them at 59-87% (`bench/skinny_linear.py`,
`bench/results/h200-session20/`).

Each program of the kernel takes two whole rows of the weight (output features) and walks them along the
input features, multiplying by the input element by element into a float32 tile it sums once at the
end. Steps of several rows keep cuBLAS: a variant of the kernel for 2 to 64 rows (in the benchmark),
with one setting for every shape, tied it at 2-16 rows and lost at 32-64.

`linear` is one opaque operator (`torch.ops.trickle.linear`) that runs the kernel where it applies (CUDA,
one row, a contiguous weight of a float type) and `F.linear` everywhere else, deciding by the shapes it
is called with: a compiled layer traced once for every batch size takes it with no guard on the rows,
and a CUDA graph captures whichever it chose. `use_in_compiled(module)` has a module's linear layers
call it in compiled code (decode steps) and `F.linear` in eager code.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

# (BLOCK_N, BLOCK_K, warps, stages): within 5% of each shape's best setting in the sweep, 1.6% on average
CONFIG = (2, 1024, 4, 4)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel runs for input `x` and `weight` ([out, in])."""
    return (
        triton is not None
        and x.is_cuda
        and x.numel() == x.shape[-1]
        and x.dtype == weight.dtype
        and x.dtype in _FLOATS
        and weight.dim() == 2
        and weight.is_contiguous()
    )


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: tuple[int, int, int, int] = CONFIG,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for one row `x` ([..., in], one row in all), by the kernel."""
    out_features, in_features = weight.shape
    row = x.reshape(in_features)
    if row.stride(0) != 1:
        row = row.contiguous()
    out = torch.empty(out_features, device=x.device, dtype=x.dtype)
    block_n, block_k, warps, stages = config
    _kernel[(triton.cdiv(out_features, block_n),)](
        row,
        weight,
        bias if bias is not None else weight,
        out,
        out_features,
        in_features,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out.view(*x.shape[:-1], out_features)


@torch.library.custom_op("trickle::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if applies(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.trickle.linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


def use_in_compiled(module: torch.nn.Module) -> None:
    """Every plain `nn.Linear` in `module` calls `linear` when traced by torch.compile, `F.linear` when
    run eagerly (same arithmetic as before). Quantized layers (other classes) are left alone."""
    for child in module.modules():
        if type(child) is torch.nn.Linear:
            child.forward = types.MethodType(_forward, child)  # type: ignore[method-assign]


def restore(module: torch.nn.Module) -> None:
    """Undo `use_in_compiled`."""
    for child in module.modules():
        if type(child) is torch.nn.Linear:
            child.__dict__.pop("forward", None)


if triton is not None:

    @triton.jit
    def _kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        N,
        K,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # y[n] = sum_k x[k] w[n, k] (+ b[n]) for this program's BLOCK_N output features n
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
        wide = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & (k < K)[None, :], other=0.0)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
            wide += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(wide, axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)
