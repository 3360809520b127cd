"""How many KV blocks the pool gets: what the settings say, or what the device's memory leaves after
the weights and the largest step's activations (measured with a trial prefill)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from trickle.generation.engine_config import EngineConfig
from trickle.generation.kv.cache import PassThroughCache

log = structlog.get_logger("generation.runner")

# On the CPU, by default, the KV pool takes at most this share of the memory available.
CPU_KV_SHARE = 0.25
# A prefill step's newcomers, times the longest one's positions (its cached prefix included), at most
# this many times the prefill token budget: what it reads of the cached blocks (and, where no kernel
# reads them in place, gathers) is bounded.
PREFILL_READ_FACTOR = 16

# A trial prefill of [rows, width] tokens from position 0 through a cache that keeps nothing.
Trial = Callable[[int, int, PassThroughCache], object]


@dataclass(frozen=True)
class StepLimits:
    """What one step may do, which the activations are sized for."""

    max_rows: int
    max_prefill_tokens: int
    """Prompt tokens one prefill step runs: the token budget, or one prompt of max_seq_len past it."""
    prefill_read_budget: int
    """Positions one prefill step reads: newcomers x the longest one's (cached ones included)."""
    vocab_size: int
    layers: int


def plan_blocks(
    config: EngineConfig,
    device: torch.device,
    limits: StepLimits,
    trial: Trial,
    gathers: Callable[[], bool],
) -> int:
    """Blocks in the KV pool (the null block included): as many as the settings say, or as the device's
    memory leaves room for; at least one request of max_seq_len must fit. `gathers` says, after
    the trial prefill, whether attention copies the keys it reads (no kernel reads the blocks)."""
    block_size = config.kv_block_size
    if config.kv_cache_tokens is not None:
        tokens, per_token = config.kv_cache_tokens, 0
    elif device.type == "cuda":
        per_token, activations = _profile(config, device, limits, trial, gathers)
        total = torch.cuda.get_device_properties(device).total_memory
        allowed = total * config.gpu_memory_utilization * _memory_cap(device)
        free = allowed - torch.cuda.memory_allocated(device) - activations
        tokens = max(0, int(free // per_token))
    else:
        cache = PassThroughCache()
        with torch.inference_mode():
            trial(1, 2, cache)
        per_token = cache.bytes_per_token
        tokens = limits.max_rows * config.max_seq_len
        available = _available_memory()
        if available is not None and per_token:
            tokens = min(tokens, int(available * CPU_KV_SHARE // per_token))
    blocks = tokens // block_size
    if blocks * block_size < config.max_seq_len:
        raise MemoryError(
            f"the KV cache holds {blocks * block_size} positions, fewer than one request of"
            f" max_seq_len ({config.max_seq_len}); lower max_seq_len"
            + (" or raise gpu_memory_utilization" if config.kv_cache_tokens is None else "")
        )
    log.info(
        "kv cache planned",
        tokens=blocks * block_size,
        blocks=blocks,
        block_size=block_size,
        gib=round(blocks * block_size * per_token / 2**30, 2) if per_token else None,
        rows_at_max_seq_len=blocks * block_size // config.max_seq_len,
    )
    return blocks + 1  # and the null block


@torch.inference_mode()
def _profile(
    config: EngineConfig,
    device: torch.device,
    limits: StepLimits,
    trial: Trial,
    gathers: Callable[[], bool],
) -> tuple[int, int]:
    """KV bytes per token, and the peak activation memory of the largest step."""
    # The step's most prompt tokens, in rows no longer than a request may be (a model's positions end
    # there: gpt2's table has 1,024).
    width = min(limits.max_prefill_tokens, config.max_seq_len)
    rows = -(-limits.max_prefill_tokens // width)
    cache = PassThroughCache()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trial(rows, width, cache)
    activations = torch.cuda.max_memory_allocated(device) - before
    # Sampling may sort the whole vocabulary for every row, with a few float32 and int64 tensors of
    # that size alive at once; leave room for that too. Where no kernel reads the blocks in place, a
    # prefill past a cached prefix and a decode step gather the keys and values they read, one layer at
    # a time.
    activations += 48 * limits.max_rows * limits.vocab_size
    # Each row's token history for the penalties (`seen`, a byte a token; `counts`, four), allocated
    # after this plan.
    activations += 5 * (limits.max_rows + 1) * limits.vocab_size
    if gathers():
        gathered = max(limits.prefill_read_budget, limits.max_rows * config.max_seq_len)
        activations += 2 * gathered * cache.bytes_per_token // limits.layers
    return cache.bytes_per_token, activations


def _memory_cap(device: torch.device) -> float:
    """The share of the device this process may use (torch.cuda.set_per_process_memory_fraction)."""
    return float(torch.cuda.get_per_process_memory_fraction(device))


def _available_memory() -> int | None:
    """Bytes of memory available to allocate on this machine (Linux), or None where it cannot tell."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
