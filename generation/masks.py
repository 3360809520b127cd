"""Attention masks as each model defines them, for rows that sit at their own positions.

The engine batches rows of different lengths, each at its own position in its own KV slot, so it hands the
model ready-made 4D masks (transformers passes a 4D mask through unchanged). What a mask lets a query see
is the model's definition, not ours: transformers' own mask functions (causal, and causal within a
sliding window of the model's size), evaluated at each row's real positions, one mask for each kind of
attention layer the model has:

- a config with `layer_types` (Gemma 2/3, Qwen 2/3 with sliding layers, ...) gets a mask for each type,
  which those models take as a mapping from layer type to mask;
- a config with a `sliding_window` and no layer types (Mistral, Mixtral, Phi-3, Starcoder2) slides in
  every layer;
- the rest are plainly causal.

Alibi models (Bloom, Falcon-RW) build their position biases from a 2D padding mask; `alibi_from_4d`
lets them build it from the 4D mask instead (the keys the last query sees are the row's keys).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

FULL, SLIDING = "full_attention", "sliding_attention"
Mask = torch.Tensor | dict[str, torch.Tensor]


class UnsupportedModelError(ValueError):
    """The model has a kind of attention layer the engine cannot mask."""


def _windows(config: PretrainedConfig) -> dict[str, int | None]:
    """Each kind of attention layer the model has, and its sliding window (None: it sees everything)."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None) or None
    if layer_types is None:
        return {SLIDING if window else FULL: window}
    unknown = set(layer_types) - {FULL, SLIDING}
    if unknown:
        raise UnsupportedModelError(f"attention layers of kind {sorted(unknown)} are not supported")
    return {kind: window if kind == SLIDING else None for kind in set(layer_types)}


class AttentionMasks:
    """Builds the masks of one forward: `for_queries` for the positions each row's queries sit at."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        self.windows = _windows(config)
        self.by_layer_type = getattr(config, "layer_types", None) is not None
        self.dtype = dtype
        self._functions: dict[str, Callable[..., Any]] = {
            kind: causal_mask_function if window is None else sliding_window_causal_mask_function(window)
            for kind, window in self.windows.items()
        }

    def for_queries(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> Mask:
        """queries: [B, Q] positions; keys: [K] positions 0..K-1; lengths: [B] keys each row holds
        (keys at or past it are padding). Returns additive masks [B, 1, Q, K], one per layer kind."""
        present = keys[None, None, :] < lengths[:, None, None]
        masks = {
            kind: self._additive(present & function(None, None, queries[:, :, None], keys[None, None, :]))
            for kind, function in self._functions.items()
        }
        return masks if self.by_layer_type else next(iter(masks.values()))

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        return mask.masked_fill(~visible, torch.finfo(self.dtype).min)[:, None]


def alibi_from_4d(module: ModuleType) -> None:
    """Let `module.build_alibi_tensor(attention_mask, num_heads, dtype)` take the engine's 4D additive mask
    as well as a 2D padding mask: the keys the last query of a row may see are the row's keys. A 2D mask
    is passed through unchanged, so the model's own callers behave as before."""
    build = getattr(module, "build_alibi_tensor")  # noqa: B009 (a module's function, found by name)
    if getattr(build, "takes_4d", False):
        return

    @functools.wraps(build)
    def build_alibi_tensor(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
        if attention_mask.dim() == 4:
            attention_mask = (attention_mask[:, 0, -1, :] == 0).long()
        return build(attention_mask, num_heads, dtype)

    build_alibi_tensor.takes_4d = True  # type: ignore[attr-defined]
    setattr(module, "build_alibi_tensor", build_alibi_tensor)  # noqa: B010
