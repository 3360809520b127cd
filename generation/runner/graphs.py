"""CUDA graphs of the step's parts, captured once per padded shape and replayed: the shape buckets, and
the registry that captures a part on first use (all graphs share one memory pool)."""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable
from typing import Any

import structlog
import torch

log = structlog.get_logger("generation.runner")

# Attention reads the cache up to one of these lengths (capped at max_seq_len), so the decode step
# has few distinct shapes: one CUDA graph per (batch bucket, length bucket).
KV_LEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192)
# A step's newcomers are prefilled as [rows, width], padded up to these buckets: one CUDA graph for each
# pair whose padded size fits the step's prefill token limit, an eager forward past it.
PREFILL_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_WIDTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Decode forwards are padded up to these (their rows, and the newcomers' tokens mixed in past them).
BATCH_BUCKETS = (
    *(1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512),
    *(640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192),
)


def bucket(value: int, buckets: tuple[int, ...], cap: int) -> int:
    """The smallest bucket that holds `value`, at most `cap` (`cap` past the last bucket)."""
    index = bisect.bisect_left(buckets, value)
    return min(buckets[index] if index < len(buckets) else cap, cap)


def buckets_up_to(buckets: tuple[int, ...], cap: int) -> list[int]:
    return sorted({bucket(b, buckets, cap) for b in buckets})


class Part(enum.Enum):
    """The parts of a step captured apart: their shapes are (batch, KV length), (batch, sampling mode
    index) for a decode's sampling without and with the rows' grammar masks (`MASKED`: a step where
    rows follow grammars), and (rows, width), for a prefill from position 0 and one past cached
    positions (`PREFIX`: where the model's attention takes the paged kernels, which read each row's
    blocks in place)."""

    DECODE = "decode"
    SAMPLE = "sample"
    MASKED = "masked sample"
    PREFILL = "prefill"
    PREFIX = "prefix"


Graph = tuple[torch.cuda.CUDAGraph, torch.Tensor]  # and the tensor its last kernel writes


class StepGraphs:
    """The captured graphs, by part and shape; `run` is how a part runs from its static inputs."""

    def __init__(self, device: torch.device, run: Callable[[Part, tuple[int, ...]], torch.Tensor]) -> None:
        self.device = device
        self._run = run
        self._graphs: dict[tuple[Part, tuple[int, ...]], Graph] = {}
        self._pool: Any = None  # one memory pool shared by every captured graph

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, part: Part) -> bool:
        return any(key[0] is part for key in self._graphs)

    def clear(self) -> None:
        self._graphs.clear()

    def get(self, part: Part, *shape: int) -> Graph:
        """The graph of `part` at `shape`, captured now if it was not yet."""
        key = (part, shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(part, shape)
        return self._graphs[key]

    def _capture(self, part: Part, shape: tuple[int, ...]) -> Graph:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up kernels, workspaces and autotuning off the graph
                self._run(part, shape)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._run(part, shape)
        self._pool = graph.pool()
        log.debug("graph captured", part=part.value, shape=shape)
        return graph, out
