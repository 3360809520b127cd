"""A one-row step's norms as inductor compiles them: its default, a looped reduction for rows of more
than 1,024 values (one program walking the row twice: 3.0 us a layer for Falcon-7B's layer norm in the
session-22 step profile), against a persistent one, the whole row in one program's registers, chosen
by the `InductorChoices` handler the server compiles its layers with
(`generation.runner.compiled.one_row_persistent`).

Falcon-7B's layer norm (4,544 values), Llama-7B's RMS norm (4,096, as transformers writes it) and the
residual addition fused with it, each over 32 layers' own weights in one CUDA graph, against eager.

    python bench/one_row_norms.py   # writes $OUT/one_row_norms.json and prints a table
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch._inductor.virtualized import V

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemm_shapes import save, timed

from trickle.generation.runner.compiled import one_row_persistent

LAYERS = 32


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = x + residual
    return h, rms_norm(h, weight)


CASES: dict[str, tuple[Callable[..., Any], int, tuple[str, ...]]] = {
    # name: (function, row width, what it takes after the row: another row or a vector of weights)
    "falcon-7b layer norm": (layer_norm, 4544, ("vector", "vector")),
    "llama-7b rms norm": (rms_norm, 4096, ("vector",)),
    "llama-7b add + rms norm": (add_rms_norm, 4096, ("row", "vector")),
}


def main() -> None:
    torch.manual_seed(0)
    torch._inductor.config.force_disable_caches = True  # each variant compiles, none is read back
    results = []
    for name, (function, width, extra) in CASES.items():
        shapes = [(1, 1, width)] + [(1, 1, width) if kind == "row" else (width,) for kind in extra]
        new = lambda shape: torch.randn(shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        layers = [[new(shape) for shape in shapes] for _ in range(LAYERS)]
        want = function(*layers[0])
        eager_us = timed(lambda i: function(*layers[i]), LAYERS) * 1e6
        row: dict[str, Any] = {"case": name, "width": width, "eager_us": eager_us}
        for variant, handler in (("default", None), ("persistent", one_row_persistent())):
            torch._dynamo.reset()
            compiled = torch.compile(function, fullgraph=True)
            if handler is None:
                got, code = run_and_get_code(compiled, *layers[0])
            else:
                with V.set_choices_handler(handler):
                    got, code = run_and_get_code(compiled, *layers[0])
            source = "\n".join(code)
            kinds = sorted({kind for kind in ("triton_per_", "triton_red_") if kind in source})
            got, expected = (g if isinstance(g, tuple) else (g,) for g in (got, want))
            pairs = zip(got, expected, strict=True)
            error = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
            us = timed(lambda i, compiled=compiled: compiled(*layers[i]), LAYERS) * 1e6
            row[variant] = {"us": us, "kernels": kinds, "max_error": error}
        results.append(row)
        print(
            f"{name:24} eager {eager_us:5.2f} us, compiled {row['default']['us']:5.2f}"
            f" {row['default']['kernels']}, persistent {row['persistent']['us']:5.2f}"
            f" {row['persistent']['kernels']} (errors {row['default']['max_error']:.3g},"
            f" {row['persistent']['max_error']:.3g})",
            flush=True,
        )
    save("one_row_norms", results)


if __name__ == "__main__":
    main()
