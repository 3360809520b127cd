"""What a Falcon-7B forward's matrix multiplies cost at a given number of tokens: the 32 layers' four
weight matrices (random bf16, one set per layer so nothing stays in L2) and the output head, captured
in one CUDA graph per token count. It shows how many prompt tokens can ride along with a decode step
before the step stops being bound by reading the weights.

    python bench/gemm_tokens.py   # writes $OUT/gemm_tokens.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, MLP, QKV, VOCAB, LAYERS = 4544, 18176, 4672, 65024, 32
TOKENS = (1, 64, 128, 192, 256, 320, 448, 576, 1024, 1088)


def weights(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)


def main() -> None:
    torch.manual_seed(0)
    layers = [
        (weights(QKV, HIDDEN), weights(HIDDEN, HIDDEN), weights(MLP, HIDDEN), weights(HIDDEN, MLP))
        for _ in range(LAYERS)
    ]
    head = weights(VOCAB, HIDDEN)
    result = {}
    for tokens in TOKENS:
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)

        def forward(x: torch.Tensor = x) -> torch.Tensor:
            h = x
            for qkv, dense, up, down in layers:
                F.linear(h, qkv)
                h = F.linear(F.gelu(F.linear(h, up)), down) + F.linear(h, dense)
            return F.linear(h[-64:], head)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        result[tokens] = round(start.elapsed_time(end) / 20, 3)
        print(tokens, "tokens:", result[tokens], "ms", flush=True)
        del graph
    out = Path(os.environ.get("OUT", "."))
    (out / "gemm_tokens.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "ms": result}))


if __name__ == "__main__":
    main()
