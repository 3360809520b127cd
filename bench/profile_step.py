"""Where a decode step's time goes: the runner's forward, sampling, the host copy, and the engine's
per-row postprocessing, timed separately at several batch sizes, plus the top GPU kernels; and steps
with newcomers' prompts mixed into the decoding rows' forward (`--mixed`: what a burst of arrivals
costs while streams run).

    python bench/profile_step.py --model random:falcon-7b --batch 1,64
    python bench/profile_step.py --model random:llama-7b --batch "" --prefill "" --mixed 60+4,32+4

with trickle installed (`pip install -e .`). `--device cpu --model random:tiny-falcon` is a smoke run
of the script itself (no GPU figures).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch

from trickle.generation import AsyncEngine, EngineConfig, SamplingParams, load_model
from trickle.generation.sampler import FULL, PLAIN, TOP_K, sample, sample_rows
from trickle.generation.scheduler import ScheduledBatch
from trickle.generation.sequence import Sequence, Status


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def activities() -> list[torch.profiler.ProfilerActivity]:
    cuda = [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    return [*cuda, torch.profiler.ProfilerActivity.CPU]


def top_table(prof: torch.profiler.profile, rows: int) -> str:
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=rows))


def timed(fn, repeat: int = 20) -> float:  # type: ignore[no-untyped-def]
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat * 1000


# The Triton kernels of generation/kv/attention.py (paged attention).
PAGED = ("_decode_kernel", "_merge_kernel", "_prefill_kernel", "_store_kernel")
# Kernel families by name, first match wins: where a step's device time goes.
FAMILIES = (
    ("gemm", ("nvjet", "gemm", "splitKreduce", "cutlass", "sm90_xmma", "_matvec_kernel")),
    ("attention", (*PAGED, "sdpa", "flash", "fmha", "attention")),
    ("sort/topk", ("sort", "Sort", "topk", "radix", "Radix")),
    ("layernorm", ("layer_norm", "LayerNorm", "rms")),
    ("reduce", ("reduce_kernel", "softmax", "scan", "Scan", "argmax")),
    ("triton (compiled)", ("triton",)),
    ("copy/index", ("index", "Index", "copy", "Copy", "CatArray", "gather", "scatter", "Memcpy", "Memset")),
)


def kernel_breakdown(prof: torch.profiler.profile, steps: int) -> dict[str, object]:
    """Per step: device milliseconds and kernel count by family, and the 40 costliest kernels."""
    families: dict[str, list[float]] = {}
    kernels = []
    for event in prof.key_averages():
        ms = event.self_device_time_total / 1000 / steps
        if ms <= 0:
            continue
        family = next((f for f, keys in FAMILIES if any(k in event.key for k in keys)), "elementwise/other")
        total = families.setdefault(family, [0.0, 0.0])
        total[0] += ms
        total[1] += event.count / steps
        kernels.append((round(ms, 4), round(event.count / steps, 1), event.key[:110]))
    kernels.sort(reverse=True)
    return {
        "families_ms_count": {f: [round(v[0], 3), v[1]] for f, v in sorted(families.items())},
        "device_ms": round(sum(v[0] for v in families.values()), 3),
        "kernels": sum(v[1] for v in families.values()),
        "top": kernels[:40],
    }


@torch.inference_mode()
def modes_agree(runner) -> dict[str, bool]:  # type: ignore[no-untyped-def]
    """On the device, with the model's own bf16 logits: each sampling mode draws what the full sort
    draws for the rows it serves."""
    n = 512
    device = runner.device
    hidden = torch.randn(n, runner.hidden_size, device=device, dtype=runner.dtype)
    logits = runner.head(hidden).float()
    seeds = torch.arange(n, device=device) * 7919
    steps = torch.arange(n, device=device) % 7

    def draw(mode: str, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
        t = torch.full((n,), temperature, device=device)
        k = torch.full((n,), top_k, device=device, dtype=torch.long)
        p = torch.full((n,), top_p, device=device)
        return sample(logits, t, k, p, seeds, steps, mode)

    checks = {}
    for mode, (temperature, top_k, top_p) in (
        (PLAIN, (1.0, 0, 1.0)),
        (TOP_K, (0.8, 50, 0.95)),
        (TOP_K, (1.0, 64, 1.0)),
        (TOP_K, (0.5, 1, 1.0)),
    ):
        checks[f"{mode} k={top_k} p={top_p}"] = torch.equal(
            draw(mode, temperature, top_k, top_p), draw(FULL, temperature, top_k, top_p)
        )
    return checks


def advance_and_load(runner, rows: list[Sequence]) -> None:  # type: ignore[no-untyped-def]
    for seq in rows:
        seq.launched += 1
    runner._static.load(rows, len(rows))


def make_rows(  # type: ignore[no-untyped-def]
    tokenizer,
    params: SamplingParams,
    count: int,
    name: str,
    prompt: int = 128,
    generated: int = 0,
    first: int = 0,
) -> list[Sequence]:
    """`count` running sequences with random `prompt`-token prompts, in rows first..first+count-1, each
    with blocks of its own for 256 more tokens; `generated` > 0 gives each that many output tokens
    already (rows to decode)."""
    rows = []
    per_row = -(-(prompt + generated + 256) // 16)
    high = min(30000, tokenizer.get_vocab_size())  # ordinary tokens of a real vocabulary, or a tiny one's
    low = min(300, high // 2)
    for i in range(first, first + count):
        ids = [int(x) for x in torch.randint(low, high, (prompt,))]
        seq = Sequence(f"{name}{i}", ids, params, i)
        seq.slot, seq.status = i, Status.RUNNING
        seq.output_ids = [5] * generated
        seq.launched = generated
        seq.blocks = list(range(1 + i * per_row, 1 + (i + 1) * per_row))
        rows.append(seq)
    return rows


def profile_prefix(runner, tokenizer, params: SamplingParams, n: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """A prefill of `n` 104-token tails past a cached 1,456-token prefix (the shared-prefix workload's
    newcomers), against the same tails with no prefix and the whole prompts from position 0."""
    prefix, tail = 1456, 104
    entry: dict[str, object] = {}
    shapes = [("past_prefix", prefix + tail, prefix), ("tails_alone", tail, 0)]
    if n * (prefix + tail) <= runner.max_prefill_tokens:
        shapes.append(("whole", prefix + tail, 0))
    for name, prompt, cached in shapes:
        rows = make_rows(tokenizer, params, n, "x", prompt=prompt)
        for seq in rows:
            seq.num_cached = cached
        batch = ScheduledBatch(prefill=rows)
        with torch.inference_mode():
            entry[f"{name}_ms"] = round(timed(lambda: runner.step(batch), 5), 3)
            if name == "past_prefix":
                with torch.profiler.profile(activities=activities()) as prof:
                    runner.step(batch)
                    sync()
                entry["kernels"] = kernel_breakdown(prof, steps=1)
                entry["top"] = top_table(prof, 15)
    print(f"prefix {n}x104", json.dumps({k: v for k, v in entry.items() if k.endswith("_ms")}), flush=True)
    print(json.dumps(entry["kernels"], indent=1), entry["top"], flush=True)
    return entry


def profile_mixed(runner, tokenizer, params: SamplingParams, rows: int, newcomers: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """A step of `rows` decoding rows (228 positions each) with `newcomers` 128-token prompts mixed into
    their forward, as the scheduler sends one while streams run (the default `--mixed-prefill-tokens`
    takes four such prompts a step), against the same rows' step alone and the newcomers prefilled in a
    step of their own."""
    decoding = make_rows(tokenizer, params, rows, "d", generated=100)
    arriving = make_rows(tokenizer, params, newcomers, "n", first=rows)
    mixed = ScheduledBatch(decode=decoding, prefill=arriving, mixed=newcomers)
    runner._tables.update(mixed)
    entry: dict[str, object] = {}
    with torch.inference_mode():
        entry["mixed_step_ms"] = round(timed(lambda: runner.step(mixed), 5), 3)
        entry["decode_alone_ms"] = round(timed(lambda: runner.step(ScheduledBatch(decode=decoding)), 5), 3)
        apart = ScheduledBatch(prefill=make_rows(tokenizer, params, newcomers, "a", first=rows))
        runner._tables.update(apart)
        entry["prefill_apart_ms"] = round(timed(lambda: runner.step(apart), 5), 3)
        with torch.profiler.profile(activities=activities()) as prof:
            runner.step(mixed)
            sync()
        entry["kernels"] = kernel_breakdown(prof, steps=1)
        entry["top"] = top_table(prof, 15)
    print(f"mixed {rows}+{newcomers}x128", json.dumps({k: v for k, v in entry.items() if k.endswith("_ms")}))
    print(json.dumps(entry["kernels"], indent=1), entry["top"], flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:falcon-7b")
    parser.add_argument("--batch", default="1,8,64,128")
    parser.add_argument("--prefill", default="1,8,32", help="prefill steps of this many 128-token prompts")
    parser.add_argument(
        "--prefix",
        default="",
        help="prefill steps of this many 104-token tails past a cached 1,456-token prefix",
    )
    parser.add_argument(
        "--mixed",
        default="",
        help="steps of R decoding rows with N 128-token prompts mixed in, as R+N (comma-separated)",
    )
    parser.add_argument("--no-compile", action="store_true", help="as the server's --no-compile")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script, no GPU figures")
    args = parser.parse_args()
    loaded = load_model(args.model, dtype="bfloat16", device=args.device)
    # On a CPU the pool needs a size: every row's blocks (`make_rows`) for the largest batch.
    pool = None if args.device == "cuda" else 16 * (1 + 128 * 32)
    config = EngineConfig(
        max_batch_size=128, max_seq_len=args.max_seq_len, compile=not args.no_compile, kv_cache_tokens=pool
    )
    engine = AsyncEngine(loaded.model, loaded.tokenizer, config)
    runner = engine.engine.runner
    runner.warm_up()
    tokenizer = loaded.tokenizer.backend_tokenizer
    report: dict[str, object] = {"modes_agree": modes_agree(runner)}
    print("modes agree", report["modes_agree"], flush=True)
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=256)
    for b in [int(x) for x in args.batch.split(",") if x]:
        rows = make_rows(tokenizer, params, b, "s", generated=100)
        batch = ScheduledBatch(decode=rows)
        runner._tables.update(batch)
        with torch.inference_mode():
            saved = [seq.params for seq in rows]
            for seq in rows:
                seq.params = seq.params.model_copy(update={"temperature": 0.0})
            runner._static.load(rows)
            graphs = runner.use_graphs
            runner.use_graphs = False
            eager_tokens = runner._decode(rows).tolist()
            runner.use_graphs = graphs
            graph_tokens = runner._decode(rows).tolist()
            for seq, p in zip(rows, saved, strict=True):
                seq.params = p
            logits = runner.head(torch.randn(b, runner.hidden_size, device=runner.device, dtype=runner.dtype))
            runner._static.load(rows)
            sampling = runner._static.sampling(0, b)
            entry = {
                "graph_equals_eager": eager_tokens == graph_tokens,
                "full_step_ms": timed(lambda: runner.step(batch)),
                "decode_and_sample_ms": timed(lambda: runner._decode(rows)),
                "load_inputs_ms": timed(lambda: runner._static.load(rows)),
                # A steady step: every row decodes again, one token on, in its row (no row written).
                "load_inputs_steady_ms": timed(lambda: advance_and_load(runner, rows)),
                "eager_sample_ms": timed(
                    lambda: sample_rows(logits, sampling, runner.seen[:b], runner.counts[:b], runner.eos_mask)
                ),
            }
            by_mode = {}
            for name, update in (
                ("plain", {"top_k": 0, "top_p": 1.0}),
                ("top_k", {}),
                ("full", {"top_k": 0}),
            ):
                for seq, p in zip(rows, saved, strict=True):
                    seq.params = p.model_copy(update=update)
                by_mode[name] = round(timed(lambda: runner._decode(rows)), 3)
            for seq, p in zip(rows, saved, strict=True):
                seq.params = p
            entry["decode_ms_by_mode"] = by_mode
            print(b, "decode ms by sampling mode", by_mode, flush=True)
            with torch.profiler.profile(activities=activities()) as prof:
                for _ in range(3):
                    runner.step(batch)
                sync()
            entry["top"] = top_table(prof, 14)
            entry["kernels_per_step"] = kernel_breakdown(prof, steps=3)
        report[b] = entry
        print(b, json.dumps({k: round(v, 3) for k, v in entry.items() if isinstance(v, float)}), flush=True)
        print(json.dumps(entry["kernels_per_step"], indent=1), flush=True)
    for n in [int(x) for x in args.prefill.split(",") if x]:
        rows = make_rows(tokenizer, params, n, "p")
        batch = ScheduledBatch(prefill=rows)
        with torch.inference_mode():
            runner.step(batch)
            sync()
            with warnings.catch_warnings(record=True) as syncs:
                warnings.simplefilter("always")
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode("warn")
                runner.launch(batch)
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode("default")
            # torch warns once that the sync debug mode is a prototype: that notice is not a sync.
            sites = [str(w.message) for w in syncs if "prototype feature" not in str(w.message)]
            entry = {"prefill_ms": timed(lambda: runner.step(batch), 5), "host_syncs_in_launch": len(sites)}
            entry["sync_sites"] = sorted({site[:120] for site in sites})
            with torch.profiler.profile(activities=activities()) as prof:
                runner.step(batch)
                sync()
            entry["top"] = top_table(prof, 12)
        report[f"prefill_{n}x128"] = entry
        print(f"prefill {n}x128", json.dumps({k: v for k, v in entry.items() if k != "top"}), flush=True)
        print(entry["top"], flush=True)
    for n in [int(x) for x in args.prefix.split(",") if x]:
        report[f"prefix_{n}x104"] = profile_prefix(runner, tokenizer, params, n)
    for pair in [x for x in args.mixed.split(",") if x]:
        rows, newcomers = (int(n) for n in pair.split("+"))
        report[f"mixed_{rows}+{newcomers}x128"] = profile_mixed(runner, tokenizer, params, rows, newcomers)
    out = Path(os.environ.get("OUT", "."))
    (out / "profile.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
