"""EngineConfig: the engine's limits and GPU options, one frozen object shared by its parts."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
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
    """The engine's settings: the server's settings of the same names, taken whole (`from_settings`),
    and the KV block size."""

    max_batch_size: int = 64
    """Most rows running at once (as many as the KV pool's blocks hold, up to this)."""
    max_seq_len: int = 2048
    """Most tokens one row holds: prompt plus generated."""
    prefill_token_budget: int = 1024
    """Most prompt tokens prefilled in one step, padding to the longest newcomer included. A longer
    prompt goes a chunk a step while rows decode (with the prefix cache on), else whole."""
    prefill_pacing: float = 0.0
    """While rows decode, a step prefills only the tokens that keep it within this many times a
    decode-only step's time (as measured); 0: every step up to the prefill token budget."""
    mixed_prefill_tokens: int = 512
    """While rows decode, newcomers' prompt tokens run in the decode rows' own forward, up to this many a
    step (then the step's prefill budget); 0: newcomers always prefill in a forward of their own."""
    kv_cache_tokens: int | None = None
    """Positions the KV pool holds, all rows together. None: on a GPU, what memory leaves after the
    weights and the largest step's activations; on the CPU, max_batch_size x max_seq_len up to a
    quarter of the memory available."""
    kv_block_size: int = 16
    """Positions one KV block holds."""
    prefix_cache: bool = True
    """Reuse the KV blocks of prompts' shared leading tokens instead of prefilling them again."""
    max_queue: int = 256
    """Requests that may wait for a row; past it new requests are refused."""
    resume_grace: float = 30.0
    """Seconds a resumable request is kept once its client left or it ended (generation/resume.py)."""
    request_timeout: float = 600.0
    """Seconds a request may take, queued and generating, unless it asks for less."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory (or of the process's cap) that weights, activations and KV may fill."""
    cuda_graphs: bool = True
    """Capture the decode step in CUDA graphs (GPU only)."""
    compile: bool = True
    """torch.compile the decoder layers (for paged decode steps) and the sampler, where the step runs in
    CUDA graphs: one compiled function serves every layer of a class. A part that fails to compile, or a
    compiled step that fails to capture, runs uncompiled."""

    @classmethod
    def from_settings(cls, settings: object, context: int | None) -> EngineConfig:
        """Every field the settings name, as they say it; `max_seq_len` None (the settings' default)
        is the model's context length (`context`), or DEFAULT_MAX_SEQ_LEN where it names none."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        values["max_seq_len"] = values.get("max_seq_len") or context or DEFAULT_MAX_SEQ_LEN
        return cls(**values)

    def within(self, context: int | None) -> EngineConfig:
        """This config with `max_seq_len` cut to the model's context length where it is longer."""
        if context is None or self.max_seq_len <= context:
            return self
        return replace(self, max_seq_len=context)
