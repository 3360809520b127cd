"""A first look on the GPU machine: versions, the eager engine's speed, and what breaks a CUDA graph capture."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time
import traceback

import torch

from generation import AsyncEngine, EngineConfig, SamplingParams, load_model


async def run_engine(engine: AsyncEngine, concurrency: int, prompt_ids: list[int], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.8, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    async def one(i: int) -> int:
        count = 0
        async for out in engine.generate(f"r{concurrency}-{i}", prompt_ids, params):
            count = out.usage.get("completion_tokens", count)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - start)


async def main() -> None:
    report: dict[str, object] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0),
        "python": sys.version,
        "matplotlib": importlib.util.find_spec("matplotlib") is not None,
        "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
    }
    import transformers

    report["transformers"] = transformers.__version__
    start = time.perf_counter()
    loaded = load_model("random:falcon-7b", dtype="bfloat16", device="cuda")
    report["load_s"] = time.perf_counter() - start
    engine = AsyncEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=64, max_seq_len=2048))
    await engine.start()
    prompt = [int(i) for i in torch.randint(300, 60000, (128,))]
    await run_engine(engine, 2, prompt, 8)
    for concurrency in (1, 64):
        report[f"eager_tok_s_c{concurrency}"] = await run_engine(engine, concurrency, prompt, 256 if concurrency == 1 else 128)
        print(report, flush=True)
    await engine.stop()
    report["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    runner = engine.engine.runner
    ids = torch.zeros(8, 1, dtype=torch.long, device="cuda")
    pos = torch.full((8, 1), 200, dtype=torch.long, device="cuda")
    mask = torch.zeros(8, 1, 1, 256, dtype=torch.bfloat16, device="cuda")
    runner.cache.for_decode(pos[:, 0], 256)
    try:
        with torch.inference_mode():
            runner._forward(ids, pos, mask)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                runner._forward(ids, pos, mask)
            graph.replay()
            torch.cuda.synchronize()
        report["capture"] = "ok"
    except Exception:
        report["capture"] = traceback.format_exc()[-6000:]
    print(json.dumps(report, indent=1, default=str))
    with open(os.path.join(os.environ.get("OUT", "."), "probe.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    asyncio.run(main())
