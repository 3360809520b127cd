"""The GPU benchmark harness: the real server over HTTP/SSE, the engine alone, and the classic recipe,
measured in one run on one machine. Writes results.json, results.md and results.png under --out.

Each row has the share of the bandwidth limit its throughput reaches (`bw_util`); engine rows also the
medians over the steps that decoded every stream: the interval between steps (`step_ms`), the decode
forward and sampling on the GPU (`decode_device_ms`), and the engine thread's own work (`host_ms`).

    python bench/harness.py --model random:falcon-7b --out bench/results/h100

Not part of the test suite: it needs a GPU and minutes of time, and trickle installed (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import torch

from trickle.generation import AsyncEngine, EngineConfig, LoadedModel, SamplingParams, load_model
from trickle.generation.messages import StepReport

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RequestTiming:
    ttft: float
    gaps: list[float]
    total: float
    tokens: int
    start: float = 0.0  # perf_counter at the request; after `drive`, seconds from the run's start
    client: int = 0
    round: int = 0


@dataclass
class Result:
    path: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Per request, in ms from the run's start: [client, round, start, time to first token, end to end]
    detail: list[list[float]] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

        return {
            "path": self.path,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tok_s": round(self.tok_s, 1),
            "ttft_p50_ms": pct(self.ttft_ms, 0.5),
            "ttft_p99_ms": pct(self.ttft_ms, 0.99),
            "itl_p50_ms": pct(self.itl_ms, 0.5),
            "itl_p99_ms": pct(self.itl_ms, 0.99),
            "e2e_p50_ms": pct(self.e2e_ms, 0.5),
            "peak_gib": self.peak_gib,
            **self.extra,
        }


def collect(path: str, concurrency: int, timings: list[RequestTiming], seconds: float) -> Result:
    return Result(
        path=path,
        concurrency=concurrency,
        requests=len(timings),
        tokens=sum(t.tokens for t in timings),
        seconds=seconds,
        ttft_ms=[t.ttft * 1000 for t in timings],
        itl_ms=[g * 1000 for t in timings for g in t.gaps],
        e2e_ms=[t.total * 1000 for t in timings],
        detail=[
            [t.client, t.round, round(t.start * 1000, 1), round(t.ttft * 1000, 1), round(t.total * 1000, 1)]
            for t in timings
        ],
    )


def prompt_text(rng: random.Random, words: int = 600) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(words))


# ---------------------------------------------------------------- load generators


async def drive(
    concurrency: int, rounds: int, prepare: Callable[[int], Any], send: Callable[[int, Any], Any]
) -> tuple[list[RequestTiming], float]:
    """`concurrency` clients, each sending `rounds` requests back to back (a closed loop).

    Every request's input is made (`prepare(i)`: a random prompt, maybe tokenized) before the clock
    starts: made on the way, it would hold each client back by the load generator's own work, a few
    milliseconds a request on the one event loop, and the run would measure that too."""
    inputs = [prepare(i) for i in range(concurrency * rounds)]

    async def client(i: int) -> list[RequestTiming]:
        timings = []
        for r in range(rounds):
            timing = await send(i * rounds + r, inputs[i * rounds + r])
            timing.client, timing.round, timing.start = i, r, timing.start - start
            timings.append(timing)
        return timings

    start = time.perf_counter()
    per_client = await asyncio.gather(*(client(i) for i in range(concurrency)))
    return [t for ts in per_client for t in ts], time.perf_counter() - start


async def sse_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> RequestTiming:
    start = time.perf_counter()
    marks: list[float] = []
    tokens = 0
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        event = "message"
        while line := await response.content.readline():
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                event = text[7:]
            elif text.startswith("data: "):
                if event == "message":
                    marks.append(time.perf_counter())
                elif event == "end":
                    tokens = json.loads(text[6:])["usage"]["completion_tokens"]
                event = "message"
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    return RequestTiming(marks[0] - start, gaps, end - start, tokens, start)


async def engine_request(
    engine: AsyncEngine, request_id: str, ids: list[int], params: SamplingParams
) -> RequestTiming:
    start = time.perf_counter()
    marks: list[float] = []
    tokens = 0
    async for out in engine.generate(ids, params, label=request_id):
        if out.text:
            marks.append(time.perf_counter())
        if out.finished:
            tokens = out.usage["completion_tokens"]
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    return RequestTiming(marks[0] - start, gaps, end - start, tokens, start)


# ---------------------------------------------------------------- the three paths


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[str]:
    command = [
        sys.executable, str(ROOT / "server.py"), "--model", args.model, "--port", str(port),
        "--max-batch-size", str(max(args.concurrency)), "--max-seq-len", str(args.max_seq_len),
        "--prefill-token-budget", str(args.prefill_token_budget),
        "--prefill-pacing", str(args.prefill_pacing),
        "--mixed-prefill-tokens", str(args.mixed_prefill_tokens),
        "--log-format", "json", *(["--no-compile"] if args.no_compile else []),
        *(["--workers", args.workers] if args.workers is not None else []),
    ]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if '"ready"' in line:
            break
    if process.poll() is not None:
        raise RuntimeError("the server did not start:\n" + "".join(seen[-30:]))
    args.server_ready_s = round(time.perf_counter() - started, 1)  # from the command to "ready"
    # Keep the server's log (warnings such as a torch.compile fallback show there), and the pipe drained.
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "server.log").open("w")
    log_file.writelines(seen)
    threading.Thread(target=_copy_lines, args=(process.stderr, log_file), daemon=True).start()
    return process


def _copy_lines(source: Any, target: Any) -> None:
    with target:
        for line in source:
            # Per-request access lines would make the file huge; keep the rest.
            if '"http request"' not in line and '"request finished"' not in line:
                target.write(line)


def features(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields of `--logprobs` and `--response-format`, on every request of the server and
    engine stages (issue 18's costs: log-probabilities, a grammar on every row)."""
    extra: dict[str, Any] = {}
    if args.logprobs is not None:
        extra["logprobs"] = args.logprobs
    if args.response_format == "json_object":
        extra["response_format"] = {"type": "json_object"}
    elif args.response_format == "json_schema":
        extra["response_format"] = {"type": "json_schema", "schema": BENCH_SCHEMA}
    return extra


# An extraction-shaped schema: nested objects, an array, an enum, required fields, free text.
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "kind": {"enum": ["report", "letter", "story"]},
        "people": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name"],
            },
        },
        "summary": {"type": "string"},
    },
    "required": ["title", "kind", "people", "summary"],
}


async def bench_server(args: argparse.Namespace) -> list[Result]:
    port = 8765
    process = start_server(args, port)
    url = f"http://127.0.0.1:{port}/stream"
    rng = random.Random(1)
    results = []
    body = lambda i: {  # noqa: E731
        "prompt": prompt_text(rng), "cutoff_len": args.prompt_tokens,
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "seed": i,
        **features(args),
    }  # fmt: skip
    try:
        warming = time.perf_counter()
        async with _session() as session:
            await sse_request(session, url, {**body(0), "max_new_tokens": 8, "min_new_tokens": 8})
        print(f"warm-up request: {time.perf_counter() - warming:.1f} s", file=sys.stderr, flush=True)
        for c in args.concurrency:
            before = await engine_sums(f"http://127.0.0.1:{port}/metrics")
            procs = min(args.client_procs, c)
            profiled = c == max(args.concurrency)
            profiler: list[subprocess.Popen[bytes] | None] = [None]
            phases = {"called": time.perf_counter()}

            def started(
                c: int = c, profiled: bool = profiled, profiler: list[Any] = profiler, phases: Any = phases
            ) -> None:
                phases["started"] = time.perf_counter()
                if profiled:  # from the moment the clients start, not while they import
                    profiler[0] = _profile(args, process.pid, c)

            if procs > 1:
                timings, seconds = await asyncio.to_thread(
                    drive_in_processes, procs, c, args.rounds, body, url, started
                )
            else:
                started()
                async with _session() as session:
                    timings, seconds = await drive(
                        c, args.rounds, body, lambda i, request: sse_request(session, url, request)
                    )
            if profiler[0] is not None:
                profiler[0].wait()
            results.append(collect("server (HTTP/SSE)", c, timings, seconds))
            results[-1].extra["client_procs"] = procs
            # Where a run's wall time goes besides the run: starting the client processes, and after.
            results[-1].extra["clients_start_s"] = round(phases["started"] - phases["called"], 1)
            results[-1].extra["after_run_s"] = round(time.perf_counter() - phases["started"] - seconds, 1)
            after = await engine_sums(f"http://127.0.0.1:{port}/metrics")
            results[-1].extra.update(engine_means(before, after))
            print(json.dumps(results[-1].summary()), flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return results


# The server's histograms of its decoding steps (`/metrics`): the interval between steps, the engine
# thread's own work in it, of that the hand-over to the event loop, and the device's decode part.
STEP_HISTOGRAMS = {
    "step_ms_mean": "engine_step_seconds",
    "host_ms_mean": "engine_step_host_seconds",
    "handoff_ms_mean": "engine_handoff_seconds",
    "decode_device_ms_mean": "engine_decode_device_seconds",
}


async def engine_sums(url: str) -> dict[str, float]:
    """The `_sum` and `_count` of each of STEP_HISTOGRAMS, as the server's /metrics has them now."""
    async with _session() as session, session.get(url) as response:
        text = await response.text()
    wanted = {f"trickle:{name}{part}" for name in STEP_HISTOGRAMS.values() for part in ("_sum", "_count")}
    sums = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            sums[name] = float(value)
    return sums


def engine_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Each histogram's mean over the steps between two `engine_sums`, in ms."""
    means = {}
    for key, name in STEP_HISTOGRAMS.items():
        total, count = (
            after.get(f"trickle:{name}{p}", 0.0) - before.get(f"trickle:{name}{p}", 0.0)
            for p in ("_sum", "_count")
        )
        if count:
            means[key] = round(1000 * total / count, 3)
    return means


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    )


def _profile(args: argparse.Namespace, pid: int, concurrency: int) -> subprocess.Popen[bytes] | None:
    """py-spy, sampling the server's process tree for `--profile-server` seconds from the run's start
    (raw collapsed stacks of every thread, idle ones too: in a container py-spy may not tell which
    threads run; bench/profile_summary.py reads them)."""
    if not args.profile_server:
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    command = [
        "py-spy", "record", "--pid", str(pid), "--subprocesses", "--threads", "--idle",
        "--rate", "100", "--duration", str(args.profile_server), "--format", "raw",
        "--output", str(args.out / f"profile-c{concurrency}.txt"),
    ]  # fmt: skip
    log = (args.out / f"profile-c{concurrency}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def drive_in_processes(
    procs: int,
    concurrency: int,
    rounds: int,
    body: Callable[[int], Any],
    url: str,
    started: Callable[[], None] = lambda: None,
) -> tuple[list[RequestTiming], float]:
    """`drive` over `procs` client processes (one Python process cannot read 256 streams' events as
    fast as a server may send them): each runs its share of the clients, all start together."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    shares = [list(range(p, concurrency, procs)) for p in range(procs)]
    inputs = [[[body(i * rounds + r) for r in range(rounds)] for i in share] for share in shares]
    start_together = context.Barrier(procs + 1)  # the children and this thread, which calls `started`
    results = context.Queue()
    children = [
        context.Process(target=_client_process, args=(url, share, bodies, start_together, results))
        for share, bodies in zip(shares, inputs, strict=True)
    ]
    for child in children:
        child.start()
    start_together.wait()
    started()
    per_process = [results.get() for _ in children]
    for child in children:
        child.join()
    timings = [t for ts in per_process for t in ts]
    start = min(t.start for t in timings)
    end = max(t.start + t.total for t in timings)
    for t in timings:
        t.start -= start
    return timings, end - start


def _client_process(url: str, clients: list[int], bodies: list[list[Any]], barrier: Any, out: Any) -> None:
    barrier.wait()

    async def run() -> list[RequestTiming]:
        async with _session() as session:

            async def client(i: int, requests: list[Any]) -> list[RequestTiming]:
                timings = []
                for r, request in enumerate(requests):
                    timing = await sse_request(session, url, request)
                    timing.client, timing.round = i, r
                    timings.append(timing)
                return timings

            done = await asyncio.gather(*(client(i, b) for i, b in zip(clients, bodies, strict=True)))
            return [t for ts in done for t in ts]

    out.put(asyncio.run(run()))


async def bench_engine(args: argparse.Namespace, loaded: LoadedModel) -> tuple[list[Result], dict[str, Any]]:
    engine = AsyncEngine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            max_batch_size=max(args.concurrency),
            max_seq_len=args.max_seq_len,
            prefill_token_budget=args.prefill_token_budget,
            prefill_pacing=args.prefill_pacing,
            mixed_prefill_tokens=args.mixed_prefill_tokens,
            compile=not args.no_compile,
        ),
    )
    reports: list[StepReport] = []
    deliver = engine.engine.report

    def recording(report: StepReport) -> None:  # the engine thread's hand-over of each step
        reports.append(report)
        deliver(report)

    engine.engine.report = recording
    started = time.perf_counter()
    await engine.start()
    runner = engine.engine.runner
    info = {"warm_up_s": round(time.perf_counter() - started, 2), "kv_blocks": runner.num_blocks}
    rng = random.Random(2)
    params = SamplingParams(
        temperature=0.8,
        top_p=0.95,
        top_k=50,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        **features(args),
    )

    def prompt(i: int) -> list[int]:
        return engine.prompts.truncated(prompt_text(rng), args.prompt_tokens, params.max_new_tokens)

    def one(i: int, ids: list[int]) -> Any:
        return engine_request(engine, f"e{i}", ids, params)

    await one(-1, prompt(-1))
    results = []
    for c in args.concurrency:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        preempted = engine.engine.scheduler.preemptions
        reports.clear()
        timings, seconds = await drive(c, args.rounds, prompt, one)
        result = collect("engine alone", c, timings, seconds)
        result.extra["preemptions"] = engine.engine.scheduler.preemptions - preempted
        result.extra.update(step_profile(reports, c))
        if torch.cuda.is_available():
            result.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results.append(result)
        print(json.dumps(result.summary()), flush=True)
    await engine.stop()
    return results, info


def step_profile(reports: list[StepReport], rows: int) -> dict[str, Any]:
    """Medians over the steps that decoded all `rows` rows: the interval between steps, the decode
    forward and sampling on the GPU, and the engine thread's own work (the interval less its wait)."""
    full = [r for r in reports if r.decoded_rows == rows]
    if not full:
        return {}

    def median_ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 3)

    return {
        "full_steps": len(full),
        "step_ms": median_ms([r.step_seconds for r in full]),
        "decode_device_ms": median_ms([r.decode_device_seconds for r in full]),
        "host_ms": median_ms([r.step_seconds - r.wait_seconds for r in full]),
    }


async def bench_prefix(args: argparse.Namespace, loaded: LoadedModel) -> list[Result]:
    """A shared system prompt (~1,460 tokens) before every request's own ~100-token turn, 64 streams of
    128 new tokens, with the prefix cache on and off."""
    results = []
    for cache in (True, False):
        engine = AsyncEngine(
            loaded.model,
            loaded.tokenizer,
            EngineConfig(
                max_batch_size=64,
                max_seq_len=args.max_seq_len,
                prefill_token_budget=args.prefill_token_budget,
                # Sized as 64 rows of max_seq_len: earlier stages' engines may still hold GPU memory.
                kv_cache_tokens=64 * args.max_seq_len,
                prefix_cache=cache,
            ),
        )
        await engine.start()
        rng = random.Random(6)
        system = engine.prompts.truncated(prompt_text(rng, 2000), 1460, 128)
        params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=128, min_new_tokens=128)

        def prompt(i: int, system: list[int] = system, engine: AsyncEngine = engine) -> list[int]:
            return system + engine.prompts.truncated(prompt_text(rng, 200), 100, 128)

        def one(i: int, ids: list[int], engine: AsyncEngine = engine) -> Any:
            return engine_request(engine, f"p{i}", ids, params)

        scheduler = engine.engine.scheduler
        before = (scheduler.prefix_queries, scheduler.prefix_hits)
        timings, seconds = await drive(64, args.rounds, prompt, one)
        result = collect(f"engine, shared prefix, cache {'on' if cache else 'off'}", 64, timings, seconds)
        result.extra.update(
            {
                "prefix_queries": scheduler.prefix_queries - before[0],
                "prefix_hits": scheduler.prefix_hits - before[1],
                "preemptions": scheduler.preemptions,
            }
        )
        results.append(result)
        print(json.dumps(result.summary()), flush=True)
        await engine.stop()
    return results


def bench_classic(args: argparse.Namespace, loaded: LoadedModel) -> list[Result]:
    """generate() in a thread + TextIteratorStreamer, one request at a time: the recipe we grew from."""
    from transformers import TextIteratorStreamer

    lock = threading.Lock()
    rng = random.Random(3)

    def one(new_tokens: int) -> RequestTiming:
        start = time.perf_counter()
        with lock:
            ids = loaded.tokenizer(prompt_text(rng), return_tensors="pt").input_ids[:, -args.prompt_tokens :]
            # skip_prompt=True spares the recipe its prompt echo, so its first text is generated text.
            streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True)
            kwargs = {
                "input_ids": ids.to(loaded.device), "streamer": streamer, "max_new_tokens": new_tokens,
                "min_new_tokens": new_tokens, "do_sample": True,
                "temperature": 0.8, "top_p": 0.95, "top_k": 50,
            }  # fmt: skip
            thread = threading.Thread(target=loaded.model.generate, kwargs=kwargs)
            thread.start()
            marks = [time.perf_counter() for text in streamer if text]
            thread.join()
        end = time.perf_counter()
        return RequestTiming(
            marks[0] - start, [b - a for a, b in itertools.pairwise(marks)], end - start, new_tokens
        )

    def client(out: list[RequestTiming], new_tokens: int, rounds: int) -> None:
        for _ in range(rounds):
            out.append(one(new_tokens))

    results = []
    # (clients, tokens each, requests each client sends back to back)
    for c, new_tokens, rounds in ((1, args.new_tokens, 2), (4, 64, 1)):
        one(8)
        with_threads: list[RequestTiming] = []
        start = time.perf_counter()
        workers = [threading.Thread(target=client, args=(with_threads, new_tokens, rounds)) for _ in range(c)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        result = collect("classic recipe", c, with_threads, time.perf_counter() - start)
        result.extra["new_tokens"] = new_tokens
        results.append(result)
        print(json.dumps(result.summary()), flush=True)
    return results


async def bench_fit(args: argparse.Namespace) -> Result:
    """The reference GPU's 24 GB: a Llama-3-8B shape (8 KV heads, 8,192 positions) in bf16, with 48
    concurrent conversations of 1,000 tokens (744 in, 256 out)."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(24 * 2**30 / total)
    loaded = load_model(args.fit_model, dtype="bfloat16", device="cuda")
    config = EngineConfig(max_batch_size=64, max_seq_len=8192, prefill_token_budget=args.prefill_token_budget)
    engine = AsyncEngine(loaded.model, loaded.tokenizer, config)
    await engine.start()
    scheduler = engine.engine.scheduler
    params = SamplingParams(temperature=0.8, max_new_tokens=256, min_new_tokens=256)
    rng = random.Random(4)

    def prompt(i: int) -> list[int]:
        return engine.prompts.truncated(prompt_text(rng, 3000), 744, params.max_new_tokens)

    def one(i: int, ids: list[int]) -> Any:
        return engine_request(engine, f"fit{i}", ids, params)

    torch.cuda.reset_peak_memory_stats()
    timings, seconds = await drive(48, 1, prompt, one)
    result = collect(f"engine, 24 GB cap, {args.fit_model}, 48 x 1,000 tokens", 48, timings, seconds)
    result.peak_gib = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    result.extra.update(
        {
            "kv_cache_tokens": scheduler.kv_capacity,
            "preemptions": scheduler.preemptions,
            "cap_gib": 24,
            "all_completed": all(t.tokens == 256 for t in timings),
        }
    )
    await engine.stop()
    torch.cuda.set_per_process_memory_fraction(1.0)
    print(json.dumps(result.summary()), flush=True)
    return result


async def bench_quantized(args: argparse.Namespace) -> list[Result]:
    """8-bit and 4-bit bitsandbytes: a random Falcon-7B saved to disk, then loaded quantized."""
    directory = Path("/tmp/trickle-random-falcon")
    if not (directory / "config.json").exists():
        loaded = load_model(args.model, dtype="bfloat16", device="cuda")
        loaded.model.save_pretrained(directory)
        loaded.tokenizer.save_pretrained(directory)
        del loaded
        torch.cuda.empty_cache()
    results = []
    for quantize in ("8bit", "4bit"):
        results += await bench_one_quantized(args, directory, quantize)
        torch.cuda.empty_cache()
    return results


async def bench_one_quantized(args: argparse.Namespace, directory: Path, quantize: str) -> list[Result]:
    loaded = load_model(str(directory), dtype="bfloat16", device="cuda", quantize=quantize)
    engine = AsyncEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=64, max_seq_len=2048))
    await engine.start()
    new_tokens = 64
    params = SamplingParams(temperature=0.8, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    rng = random.Random(5)

    def prompt(i: int) -> list[int]:
        return engine.prompts.truncated(prompt_text(rng), args.prompt_tokens, params.max_new_tokens)

    def one(i: int, ids: list[int]) -> Any:
        return engine_request(engine, f"q{i}", ids, params)

    results = []
    for c in (1, 64):
        torch.cuda.reset_peak_memory_stats()
        timings, seconds = await drive(c, 1, prompt, one)
        result = collect(f"engine alone, bnb {quantize}", c, timings, seconds)
        result.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result.extra["new_tokens"] = new_tokens
        results.append(result)
        print(json.dumps(result.summary()), flush=True)
    await engine.stop()
    return results


# ---------------------------------------------------------------- hardware


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * 10 * src.numel() / (start.elapsed_time(end) / 1000)


def bandwidth_utilisation(
    result: Result, weight_bytes: int, kv_bytes_per_token: int, args: argparse.Namespace, bandwidth: float
) -> float:
    # Bytes one decode step must read: all weights, plus each row's KV (average length over its life).
    rows = result.concurrency
    kv = rows * kv_bytes_per_token * (args.prompt_tokens + args.new_tokens / 2)
    steps_per_s = result.tok_s / rows
    return round((weight_bytes + kv) * steps_per_s / bandwidth, 3)


def versions() -> dict[str, str]:
    import aiohttp as aio
    import transformers

    return {
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "aiohttp": aio.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------- report


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    columns = [
        "path",
        "concurrency",
        "tok_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "e2e_p50_ms",
        "peak_gib",
        "bw_util",
        "step_ms",
        "decode_device_ms",
        "host_ms",
    ]
    lines = [f"# {report['title']}", "", "```", json.dumps(report["setup"], indent=1), "```", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in report["results"]:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out / "results.png", report["results"])


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted({r["path"] for r in rows}):
        mine = sorted((r for r in rows if r["path"] == name), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        left.plot(xs, [r["tok_s"] for r in mine], marker="o", label=name)
        right.plot(xs, [r["ttft_p50_ms"] for r in mine], marker="o", label=name)
    for ax, label in ((left, "output tokens/s"), (right, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="random:falcon-7b")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64, 128]
    )
    parser.add_argument("--prefill-token-budget", type=int, default=EngineConfig.prefill_token_budget)
    parser.add_argument("--prefill-pacing", type=float, default=EngineConfig.prefill_pacing)
    parser.add_argument("--mixed-prefill-tokens", type=int, default=EngineConfig.mixed_prefill_tokens)
    parser.add_argument(
        "--logprobs", type=int, default=None, help="every request asks this many alternatives"
    )
    parser.add_argument(
        "--response-format",
        choices=("none", "json_object", "json_schema"),
        default="none",
        help="a grammar on every request",
    )
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back")
    parser.add_argument("--fit-model", default="random:llama-3-8b", help="the model of the `fit` stage")
    parser.add_argument("--stages", default="server,engine,classic")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--client-procs", type=int, default=4, help="processes the SSE clients are spread over"
    )
    parser.add_argument(
        "--profile-server", type=int, default=0, help="py-spy the server for this many seconds"
    )
    parser.add_argument("--workers", default=None, help="the server's --workers (its default if unset)")
    parser.add_argument("--no-compile", action="store_true", help="serve and run the engine uncompiled")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results/latest")))
    args = parser.parse_args()
    stages = set(args.stages.split(","))

    report: dict[str, Any] = {
        "title": f"trickle on {versions()['device']}",
        "setup": {**vars(args), **versions()},
    }
    report["setup"]["out"] = str(args.out)
    bandwidth = copy_bandwidth() if torch.cuda.is_available() else float("nan")
    report["setup"]["copy_bandwidth_gbs"] = round(bandwidth / 1e9, 1)
    results: list[Result] = []
    if "server" in stages:
        results += asyncio.run(bench_server(args))
        report["setup"]["server_ready_s"] = args.server_ready_s
    if "fit" in stages:
        results.append(asyncio.run(bench_fit(args)))
    if "quantized" in stages:
        results += asyncio.run(bench_quantized(args))
    loaded = load_model(args.model, dtype=args.dtype, device="auto")
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    report["setup"]["weight_gb"] = round(weight_bytes / 1e9, 2)
    if "engine" in stages:
        engine_results, info = asyncio.run(bench_engine(args, loaded))
        results += engine_results
        report["setup"].update(info)
    if "prefix" in stages:
        results += asyncio.run(bench_prefix(args, loaded))
    if "classic" in stages:
        # A fresh copy: the recipe runs stock transformers code, without the engine's adaptations.
        results += bench_classic(args, load_model(args.model, dtype=args.dtype, device="auto"))
    kv_per_token = 2 * loaded.model.config.num_hidden_layers * _kv_width(loaded.model.config) * 2
    rows = []
    for r in results:
        summary = r.summary()
        # Utilisation is defined for the bf16 model at the run's prompt and output lengths only.
        if r.path in ("server (HTTP/SSE)", "engine alone"):
            summary["bw_util"] = bandwidth_utilisation(r, weight_bytes, kv_per_token, args, bandwidth)
        rows.append(summary)
    report["results"] = rows
    write_report(args.out, report)
    detail = {f"{r.path} @{r.concurrency}": r.detail for r in results if r.detail}
    (args.out / "requests.json").write_text(json.dumps(detail))
    print((args.out / "results.md").read_text())


def _kv_width(config: Any) -> int:
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        heads = 1
    head_dim = config.hidden_size // config.num_attention_heads
    return int(heads or config.num_attention_heads) * head_dim


if __name__ == "__main__":
    main()
