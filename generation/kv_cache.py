"""SlotKVCache: fixed KV storage where each running row owns one slot, so decode shapes stay fixed."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

# A layer's key buffer, value buffer, the slots written, and the positions written: None for positions
# 0..T-1 of each slot (a prefill), else one (slot, position) pair per new token (decode, packed steps).
KVTarget = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def store(target: KVTarget, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """Write new keys and values [B, kv_heads, T, head_dim] where `target` says. Tensor-only, so a
    compiled layer can fuse the write into the kernel that makes the keys."""
    keys, values, rows, positions = target
    if positions is None:
        length = key_states.shape[2]
        keys[rows, :, :length] = key_states
        values[rows, :, :length] = value_states
    else:
        # One pair per token, in token order: [B, kv_heads, T, D] -> [B * T, kv_heads, D]
        keys[rows, :, positions] = key_states.transpose(1, 2).flatten(0, 1)
        values[rows, :, positions] = value_states.transpose(1, 2).flatten(0, 1)


class SlotKVCache(Cache):
    """Per-layer key/value buffers of shape [num_slots, kv_heads, max_len, head_dim].

    Rows join by prefilling into a free slot and leave by having the last row moved into their slot
    (`move`), so running rows always hold slots 0..n-1 and a decode step reads `buffer[:n]` in place.
    Every row keeps its own position; the runner passes position ids and a 4D mask that hides each
    row's unused tail. Buffers are allocated at the first write, when the model's head shape is known.

    Before each forward the runner says where the new keys go: `for_prefill` (some slots, positions
    0..P-1) or `for_decode` (rows 0..B-1, one new position each).
    """

    def __init__(self, num_slots: int, max_len: int) -> None:
        super().__init__(layers=[])
        self.num_slots = num_slots
        self.max_len = max_len
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._rows = torch.zeros(0, dtype=torch.long)
        self._positions: torch.Tensor | None = None
        self._kv_len = 0

    def for_prefill(self, slots: torch.Tensor) -> None:
        # slots: [N]; row n of the forward writes positions 0..P-1 of slot slots[n]
        self._rows, self._positions = slots, None

    @property
    def plain_causal(self) -> bool:
        """Rows start at position 0 and are right-padded, so causal attention over the new keys alone is
        exact for every real token (what a prefill is; attention may skip the mask)."""
        return self._positions is None

    def for_decode(self, rows: torch.Tensor, positions: torch.Tensor, kv_len: int) -> None:
        # rows = 0..B-1, positions: [B]; row b writes at positions[b] and reads 0..kv_len-1
        self._rows, self._positions, self._kv_len = rows, positions, kv_len

    def for_tokens(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        # slots, positions: [T]; token t of a packed [1, T] forward writes slot slots[t] at positions[t]
        # (the caller attends itself: `visible` does not apply)
        self._rows, self._positions = slots, positions

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, kv_heads, T, head_dim]
        target = self.target(layer_idx, key_states)
        store(target, key_states, value_states)
        return self.visible(layer_idx, key_states, value_states)

    def target(self, layer_idx: int, like: torch.Tensor) -> KVTarget:
        """Where this forward's new keys and values go in layer `layer_idx` (its buffers are allocated
        at the first write, shaped for `like`: [B, kv_heads, T, head_dim])."""
        if layer_idx == len(self._keys):
            shape = (self.num_slots, like.shape[1], self.max_len, like.shape[3])
            self._keys.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
            self._values.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
        return self._keys[layer_idx], self._values[layer_idx], self._rows, self._positions

    def visible(
        self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads after `store`: a prefill attends over its own new keys, a decode step
        over its rows' cached ones."""
        if self._positions is None:
            return key_states, value_states
        return self.cached(layer_idx, key_states.shape[0], self._kv_len)

    def cached(self, layer_idx: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots 0..rows-1, positions 0..length-1, in place."""
        return self._keys[layer_idx][:rows, :, :length], self._values[layer_idx][:rows, :, :length]

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` in every layer (a row changing slots)."""
        for buffer in (*self._keys, *self._values):
            buffer[dst].copy_(buffer[src])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len


class PassThroughCache(Cache):
    """A cache that stores nothing: prefill from position 0 needs no past. It measures the model's KV
    bytes per token, so the slot cache can be sized before it is allocated."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.bytes_per_token = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for states in (key_states, value_states):
            self.bytes_per_token += states.shape[1] * states.shape[3] * states.element_size()
        return key_states, value_states

    plain_causal = True  # a prefill from position 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
