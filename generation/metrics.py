"""Prometheus metrics of the engine, named after vLLM's under this project's prefix (`trickle:`), and the
few that load-aware gateways read under vLLM's own names (`GATEWAY_NAMES`)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from trickle.generation.messages import StepReport, TokenOutput

PREFIX = "trickle:"
# Bucket bounds in seconds, spread for LLM latencies: tokens every few milliseconds, requests of minutes.
# fmt: off
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
               2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0)
STEP_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
# The parts of a step: the host's share is a fraction of a millisecond when all goes well.
PART_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.05, 0.1, 0.5)
# fmt: on


class WeightedHistogram(Collector):
    """A histogram that records one value for many events at once.

    Every row decoded in a step waited the same interval for its token: one `observe(interval, rows)`
    per step keeps the per-token distribution without per-token work.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


# What the Gateway API Inference Extension's endpoint picker (llm-d's among them) reads to route by load,
# as vLLM names it: queued requests and KV-cache use (the name vLLM uses now and the one it used before
# 0.10), and running requests. Ours: theirs.
GATEWAY_NAMES = {
    "num_requests_waiting": ("vllm:num_requests_waiting",),
    "num_requests_running": ("vllm:num_requests_running",),
    "kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}


class GatewayNames(Collector):
    """The gauges of `GATEWAY_NAMES` again under the gateways' names, read from the same gauges when
    scraped (one value, two names)."""

    def __init__(self, gauges: dict[str, Gauge]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for ours, gauge in self.gauges.items():
            value = next(iter(gauge.collect())).samples[0].value
            for name in GATEWAY_NAMES[ours]:
                yield GaugeMetricFamily(name, f"{PREFIX}{ours}, as load-aware gateways read it.", value=value)


class EngineMetrics:
    """The engine's metrics in their own registry, fed from the engine's reports on the event loop."""

    def __init__(self, kv_capacity_tokens: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.kv_capacity_tokens = kv_capacity_tokens
        r = self.registry
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "Arrival to last token.", buckets=E2E_BUCKETS, registry=r
        )
        self.queue = Histogram(
            f"{PREFIX}request_queue_time_seconds",
            "Arrival to admission into the batch.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            f"{PREFIX}engine_step_seconds",
            "Interval between engine steps that decoded rows.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_host = Histogram(
            f"{PREFIX}engine_step_host_seconds",
            "Of a decoding step's interval, the engine thread's own work (not waiting for the device).",
            buckets=PART_BUCKETS,
            registry=r,
        )
        self.handoff = Histogram(
            f"{PREFIX}engine_handoff_seconds",
            "Of a decoding step's host work, the hand-over of the previous step's outputs to the event loop.",
            buckets=PART_BUCKETS,
            registry=r,
        )
        self.decode_device = Histogram(
            f"{PREFIX}engine_decode_device_seconds",
            "A decoding step's forward and sampling on the GPU.",
            buckets=PART_BUCKETS,
            registry=r,
        )
        self.itl = WeightedHistogram(
            f"{PREFIX}inter_token_latency_seconds", "Time between a request's tokens.", ITL_BUCKETS
        )
        r.register(self.itl)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter(
            f"{PREFIX}request_success", "Requests finished, by reason.", ["finished_reason"], registry=r
        )
        self.running = Gauge(f"{PREFIX}num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(f"{PREFIX}num_requests_waiting", "Requests waiting to be admitted.", registry=r)
        self.kv_usage = Gauge(
            f"{PREFIX}kv_cache_usage_perc", "Share of KV cache token capacity in use (0-1).", registry=r
        )
        gauges = {"num_requests_waiting": self.waiting, "num_requests_running": self.running}
        r.register(GatewayNames({**gauges, "kv_cache_usage_perc": self.kv_usage}))
        self.prefix_queries = Counter(
            f"{PREFIX}prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_hits = Counter(
            f"{PREFIX}prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r
        )
        self.preemptions = Counter(
            f"{PREFIX}num_preemptions", "Requests preempted for lack of KV cache blocks.", registry=r
        )
        self._totals = (0, 0, 0)  # the running totals of the last report

    def record_step(self, report: StepReport) -> None:
        self.running.set(report.num_running)
        self.waiting.set(report.num_waiting)
        self.kv_usage.set(report.kv_tokens / self.kv_capacity_tokens)
        totals = (report.prefix_queries, report.prefix_hits, report.preemptions)
        for counter, now, before in zip(
            (self.prefix_queries, self.prefix_hits, self.preemptions), totals, self._totals, strict=True
        ):
            counter.inc(now - before)
        self._totals = totals
        if report.decoded_rows:
            self.step.observe(report.step_seconds)
            self.step_host.observe(max(0.0, report.step_seconds - report.wait_seconds))
            self.handoff.observe(report.handoff_seconds)
            if report.decode_device_seconds:
                self.decode_device.observe(report.decode_device_seconds)
            self.itl.observe(report.step_seconds, report.decoded_rows)

    def record_finished(self, output: TokenOutput) -> None:
        self.finished.labels(finished_reason=output.finish_reason).inc()
        self.prompt_tokens.inc(output.usage.get("prompt_tokens", 0))
        self.generation_tokens.inc(output.usage.get("completion_tokens", 0))
        for histogram, key in ((self.ttft, "ttft_ms"), (self.queue, "queue_ms"), (self.e2e, "total_ms")):
            value = output.timings.get(key)
            if value is not None:
                histogram.observe(value / 1000.0)
