"""Would torch.compile pay for the decode step? Compile time, and the captured step's time, against the
plain captured step, at a few batch sizes.

    python bench/compile_probe.py --batch 1,64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generation import AsyncEngine, EngineConfig, SamplingParams, load_model
from generation.detokenizer import IncrementalDetokenizer
from generation.sequence import Sequence, Status


def replay_ms(graph: torch.cuda.CUDAGraph, repeat: int = 50) -> float:
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1000


def capture(fn, *args):  # type: ignore[no-untyped-def]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--mode", default="default")
    parser.add_argument("--dynamic", action="store_true")
    args = parser.parse_args()
    loaded = load_model("random:falcon-7b", dtype="bfloat16", device="cuda")
    engine = AsyncEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=64, max_seq_len=2048))
    runner = engine.engine.runner
    tokenizer = loaded.tokenizer.backend_tokenizer
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=256)
    compiled_logits = torch.compile(runner._decode_logits, mode=args.mode, dynamic=args.dynamic)

    def compiled(b: int, kv_len: int) -> torch.Tensor:
        static = runner._static
        return runner._sample(compiled_logits(b, kv_len), static.sampling(0, b), static.rows[:b])

    report = {}
    for b in [int(x) for x in args.batch.split(",")]:
        rows = []
        for i in range(b):
            ids = [int(x) for x in torch.randint(300, 60000, (128,))]
            seq = Sequence(f"s{i}", ids, params, i, IncrementalDetokenizer(tokenizer, ids, []))
            seq.slot, seq.status, seq.output_ids = i, Status.RUNNING, [5] * 100
            rows.append(seq)
        with torch.inference_mode():
            runner._static.load(rows)
            plain = replay_ms(capture(runner._decode_static, b, 256))
            start = time.perf_counter()
            compiled(b, 256)
            compiled(b, 512)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            fast = replay_ms(capture(compiled, b, 256))
            same = torch.equal(runner._decode_static(b, 256), compiled(b, 256))
        report[b] = {
            "captured_ms": round(plain, 3),
            "compiled_captured_ms": round(fast, 3),
            "compile_s": round(compile_s, 1),
            "greedy_equal": same,
        }
        print(b, report[b], flush=True)
    Path(os.environ.get("OUT", "."), "compile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
