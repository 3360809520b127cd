"""Where a decode step's time goes: the runner's forward, sampling, the host copy, and the engine's
per-row postprocessing, timed separately at several batch sizes, plus the top GPU kernels.

    python bench/profile_step.py --model random:falcon-7b --batch 1,64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generation import AsyncEngine, EngineConfig, SamplingParams, load_model
from generation.detokenizer import IncrementalDetokenizer
from generation.sampler import sample_rows
from generation.scheduler import ScheduledBatch
from generation.sequence import Sequence, Status


def timed(fn, repeat: int = 20) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:falcon-7b")
    parser.add_argument("--batch", default="1,8,64,128")
    parser.add_argument("--prefill", default="1,8,32", help="prefill steps of this many 128-token prompts")
    args = parser.parse_args()
    loaded = load_model(args.model, dtype="bfloat16", device="cuda")
    engine = AsyncEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=128, max_seq_len=2048))
    runner = engine.engine.runner
    runner.warm_up()
    tokenizer = loaded.tokenizer.backend_tokenizer
    report = {}
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=256)
    for b in [int(x) for x in args.batch.split(",")]:
        rows = []
        for i in range(b):
            ids = [int(x) for x in torch.randint(300, 60000, (128,))]
            seq = Sequence(f"s{i}", ids, params, i, IncrementalDetokenizer(tokenizer, ids, []))
            seq.slot, seq.status = i, Status.RUNNING
            seq.output_ids = [5] * 100
            rows.append(seq)
        batch = ScheduledBatch(decode=rows)
        with torch.inference_mode():
            greedy = [seq.params for seq in rows]
            for seq in rows:
                seq.params = seq.params.model_copy(update={"temperature": 0.0})
            runner._static.load(rows)
            runner.use_graphs = False
            eager_tokens = runner._decode(rows).tolist()
            runner.use_graphs = True
            graph_tokens = runner._decode(rows).tolist()
            for seq, p in zip(rows, greedy, strict=True):
                seq.params = p
            logits = runner.lm_head(
                torch.randn(b, runner.lm_head.weight.shape[1], device="cuda", dtype=runner.dtype)
            )
            runner._static.load(rows)
            sampling = runner._static.sampling(0, b)
            entry = {
                "graph_equals_eager": eager_tokens == graph_tokens,
                "full_step_ms": timed(lambda: runner.step(batch)),
                "decode_and_sample_ms": timed(lambda: runner._decode(rows)),
                "load_inputs_ms": timed(lambda: runner._static.load(rows)),
                "eager_sample_ms": timed(
                    lambda: sample_rows(logits, sampling, runner.seen[:b], runner.eos_mask)
                ),
                "detokenize_ms": timed(
                    lambda: [seq.detokenizer.step(1000 + j) for j, seq in enumerate(rows)], 5
                ),
            }
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
            ) as prof:
                for _ in range(3):
                    runner.step(batch)
                torch.cuda.synchronize()
            entry["top"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
        report[b] = entry
        print(b, json.dumps({k: round(v, 3) for k, v in entry.items() if k != "top"}), flush=True)
        print(entry["top"], flush=True)
    for n in [int(x) for x in args.prefill.split(",") if x]:
        rows = []
        for i in range(n):
            ids = [int(x) for x in torch.randint(300, 60000, (128,))]
            seq = Sequence(f"p{i}", ids, params, i, IncrementalDetokenizer(tokenizer, ids, []))
            seq.slot, seq.status = i, Status.RUNNING
            rows.append(seq)
        batch = ScheduledBatch(prefill=rows)
        with torch.inference_mode():
            runner.step(batch)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as syncs:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                runner.launch(batch)
                torch.cuda.set_sync_debug_mode("default")
            entry = {"prefill_ms": timed(lambda: runner.step(batch), 5), "host_syncs_in_launch": len(syncs)}
            entry["sync_sites"] = sorted({str(w.message)[:120] for w in syncs})
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                runner.step(batch)
                torch.cuda.synchronize()
            entry["top"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
        report[f"prefill_{n}x128"] = entry
        print(f"prefill {n}x128", json.dumps({k: v for k, v in entry.items() if k != "top"}), flush=True)
        print(entry["top"], flush=True)
    out = Path(os.environ.get("OUT", "."))
    (out / "profile.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
