"""Load test for trickle's POST /stream, measuring what a streaming client feels: time to first token,
the gaps between tokens and the time per output token, each as its own locust statistic (all in ms),
plus an SLO gate that sets the exit code.

    locust -f bench/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000 --only-summary
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import requests
from locust import User, constant, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner

STREAM_PATH = "/stream"
SSE = "SSE"
# Connect, then read: the read limit is per socket read, and the server's pings keep an idle stream under it.
TIMEOUT_S = (10.0, 120.0)
WORDS = (
    "the", "river", "baker", "carried", "bread", "across", "a", "quiet", "town", "where", "lanterns",
    "hung", "over", "narrow", "streets", "children", "counted", "boats", "drifting", "toward", "harbour",
)  # fmt: skip


class StreamFailure(Exception):
    """A stream that did not end in a clean `end` event; its message becomes the locust failure."""


@dataclass
class SseEvent:
    name: str
    data: str


@dataclass
class StreamTimings:
    """Seconds since the request was sent."""

    token_times: list[float]
    end_time: float
    completion_tokens: int


@events.init_command_line_parser.add_listener
def add_options(parser: LocustArgumentParser) -> None:
    # A comma-separated list is a request mix: each request picks one of the values at random.
    parser.add_argument("--prompt-words", default="32", help="Words per prompt (e.g. 16,128,512: a mix).")
    parser.add_argument("--max-new-tokens", default="64", help="max_new_tokens of each request (or a mix).")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="min_new_tokens of each request.")
    parser.add_argument("--api-key", default="", is_secret=True, help="Sent as 'Authorization: Bearer'.")
    parser.add_argument(
        "--slo-ttft-p95-ms", type=float, default=2000.0, help="Exit 1 when the p95 of ttft exceeds this."
    )
    parser.add_argument(
        "--slo-max-failure-ratio",
        type=float,
        default=0.0,
        help=f"Exit 1 when more than this fraction of {STREAM_PATH} requests fail.",
    )


def sse_events(lines: Iterable[bytes]) -> Iterator[SseEvent]:
    """Parse SSE lines into events, each yielded as soon as its closing blank line arrives."""
    name = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.decode()
        if not line:
            if data:
                yield SseEvent(name, "\n".join(data))
            name, data = "message", []
        elif not line.startswith(":"):  # a leading colon marks a comment, such as the server's pings
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


def read_stream(events_in: Iterable[SseEvent], started: float) -> StreamTimings:
    token_times: list[float] = []
    for event in events_in:
        payload = json.loads(event.data)
        if event.name == "message":
            token_times.append(time.perf_counter() - started)
        elif event.name == "error":
            raise StreamFailure(f"error event: {payload.get('message')}")
        elif event.name == "end":
            if payload.get("finish_reason") == "error":
                raise StreamFailure("finish_reason error")
            completion_tokens = int(payload["usage"]["completion_tokens"])
            return StreamTimings(token_times, time.perf_counter() - started, completion_tokens)
    raise StreamFailure("stream closed without an end event")


def pick(mix: str) -> int:
    """One value of a comma-separated mix such as "16,64,256", chosen at random."""
    return int(random.choice(mix.split(",")))


def check_status(response: requests.Response) -> None:
    if response.status_code != 200:
        raise StreamFailure(f"HTTP {response.status_code}: {response.text[:200]}")
    content_type = response.headers.get("Content-Type", "")
    if not content_type.startswith("text/event-stream"):
        raise StreamFailure(f"unexpected Content-Type {content_type!r}")


class StreamingUser(User):
    """One client sending requests back to back, so -u is the number of concurrent streams."""

    wait_time = constant(0)

    def on_start(self) -> None:
        # A User, not an HttpUser: HttpSession reports a streamed request when its headers arrive, and we
        # want the whole stream as one entry, timed to its end event.
        self.session = requests.Session()
        if self.environment.parsed_options.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.environment.parsed_options.api_key}"

    def on_stop(self) -> None:
        self.session.close()

    @task
    def stream(self) -> None:
        started = time.perf_counter()
        try:
            timings = self.run_stream(started)
        except (requests.RequestException, StreamFailure, ValueError, KeyError) as err:
            # ValueError covers a data line that is not JSON; KeyError an end event without usage.
            self.record("POST", STREAM_PATH, (time.perf_counter() - started) * 1000, err)
            return
        self.record("POST", STREAM_PATH, timings.end_time * 1000)
        self.record_tokens(timings)

    def run_stream(self, started: float) -> StreamTimings:
        options = self.environment.parsed_options
        max_new_tokens = pick(options.max_new_tokens)
        body = {
            "prompt": " ".join(random.choices(WORDS, k=pick(options.prompt_words))),
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min(options.min_new_tokens, max_new_tokens),
        }
        url = f"{self.host}{STREAM_PATH}"
        with self.session.post(url, json=body, stream=True, timeout=TIMEOUT_S) as response:
            check_status(response)
            # chunk_size=1 hands each byte over as it arrives, so a token is timed when it lands rather
            # than when a read buffer fills.
            return read_stream(sse_events(response.iter_lines(chunk_size=1)), started)

    def record_tokens(self, timings: StreamTimings) -> None:
        if not timings.token_times:
            return
        first = timings.token_times[0]
        self.record(SSE, "ttft", first * 1000)
        for earlier, later in pairwise(timings.token_times):
            self.record(SSE, "inter_token", (later - earlier) * 1000)
        decode_s = timings.end_time - first
        if timings.completion_tokens > 1 and decode_s > 0:
            # Milliseconds, like every other row: locust's Aggregated row averages them all together.
            self.record(SSE, "ms_per_token", decode_s * 1000 / (timings.completion_tokens - 1))

    def record(self, kind: str, name: str, value: float, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=value,
            response_length=0,
            exception=exception,
            context={},
        )


@events.quitting.add_listener
def check_slo(environment: Environment, **_kwargs: Any) -> None:
    # Workers only hold their share of the samples; the master, or a lone process, judges the whole run.
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    assert options is not None  # the locust command always parses them
    ttft = environment.stats.get("ttft", SSE)
    percentiles = {p: ttft.get_response_time_percentile(p / 100) for p in (50, 95, 99)}
    for p, value in percentiles.items():
        print(f"TTFT p{p}: {value} ms")
    failure_ratio = environment.stats.get(STREAM_PATH, "POST").fail_ratio
    problems: list[str] = []
    if ttft.num_requests == 0:
        problems.append("no first token was received")
    elif percentiles[95] > options.slo_ttft_p95_ms:
        problems.append(f"TTFT p95 {percentiles[95]} ms > {options.slo_ttft_p95_ms} ms")
    if failure_ratio > options.slo_max_failure_ratio:
        problems.append(f"failure ratio {failure_ratio:.3f} > {options.slo_max_failure_ratio}")
    # We set the exit code either way, which would otherwise hide a crash inside this file.
    if environment.runner is not None and environment.runner.exceptions:
        problems.append("the locustfile raised (see the exceptions report)")
    print(f"SLO verdict: {'FAIL: ' + '; '.join(problems) if problems else 'PASS'}")
    environment.process_exit_code = 1 if problems else 0
