"""EngineConfig: the engine's limits and GPU options, one frozen object shared by its parts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

DEFAULT_MAX_SEQ_LEN = 2048  # where neither the settings nor the model's config name one
# Where a model's config keeps the longest sequence it was made for, under each family's naming.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


def context_length(model_config: Any) -> int | None:
    """The longest sequence the model's config says it handles (a learned position table ends there; a
    rotary model was trained to it), or None where it names none (alibi models)."""
    for name in CONTEXT_FIELDS:
        value = getattr(model_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64
    """Most rows running at once; the KV cache holds this many slots, or fewer where memory is short."""
    max_seq_len: int = 2048
    """Most tokens one row holds: prompt plus generated."""
    prefill_token_budget: int = 1024
    """Most prompt tokens prefilled in one step, padding to the longest newcomer included (the first
    admission of a step always goes through)."""
    packed_prefill_tokens: int = 0
    """Newcomers of up to this many prompt tokens in all (padded) join the running rows' decode step and
    are prefilled in its forward, which reads the weights once for both (Falcon multi-query models): a
    short prompt then costs the running streams a fraction of a step, not a prefill step of its own,
    but waits for a step with room for it. 0 (the default) keeps prefill in steps of its own."""
    max_queue: int = 256
    """Requests that may wait for a row; past it new requests are refused."""
    request_timeout: float = 600.0
    """Seconds a request may take, queued and generating, unless it asks for less."""
    memory_utilization: float = 0.9
    """Share of the GPU's memory (or of the process's cap) that weights, activations and KV may fill."""
    cuda_graphs: bool = True
    """Capture the decode step in CUDA graphs (GPU only)."""
    compile: bool = False
    """torch.compile the model and the sampler (CUDA graphs only): fused kernels. Falcon multi-query
    layers compile once for all layers (about a minute on Falcon-7B); other models compile the whole
    decode forward (minutes). A part that fails to compile, or a compiled step that fails to capture,
    runs uncompiled."""

    def within(self, context: int | None) -> EngineConfig:
        """This config with `max_seq_len` cut to the model's context length where it is longer."""
        if context is None or self.max_seq_len <= context:
            return self
        return replace(self, max_seq_len=context)
