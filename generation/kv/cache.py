"""PagedKVCache: the KV storage, one pool of blocks per layer, and where each forward writes and reads.

Each layer's keys (and values) are one tensor of [num_blocks * block_size, kv_heads, head_dim]: row
`block * block_size + offset` holds one position. The runner's block tables ([rows, blocks per row],
a fixed-address device tensor) say which blocks hold each batch row's positions, in order; a position
past a row's blocks reads the null block (0), which masks hide.

Before each forward the runner says which batch rows run, at which positions (`for_forward`): the new
keys are written there, and attention reads either the new keys alone (a prefill from position 0:
plain causal attention is exact) or every row's positions 0..read_len-1, gathered from its blocks in
position order, so the masks see the layout they would see in one contiguous cache; or, on a GPU, the
paged kernels read the pools through the block tables (`generation.kv.attention`): in a decode step
`decode_layer` stores the new keys, and past cached positions a prefill stores them here and
`prefill_layer` reads each row's blocks up to its length. A block several rows share was written by
an earlier step: the scheduler makes a newcomer's blocks findable only once the step that writes them
is queued.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from trickle.generation.kv.attention import DecodeTables, PrefillTables, context

# A layer's key pool, value pool, and the pool rows this forward's tokens write ([B * T], row-major).
KVTarget = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# A layer's key/value heads, head size, dtype and device.
LayerShape = tuple[int, int, torch.dtype, torch.device]


def store(target: KVTarget, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """Write new keys and values [B, kv_heads, T, head_dim] where `target` says. Tensor-only, so a
    compiled layer can fuse the write into the kernel that makes the keys."""
    keys, values, slots = target
    keys[slots] = key_states.transpose(1, 2).flatten(0, 1)
    values[slots] = value_states.transpose(1, 2).flatten(0, 1)


class PagedKVCache(Cache):
    """Per-layer pools of `num_blocks` blocks of `block_size` positions, allocated at each layer's first
    write (when the model's head shape is known), and the batch rows' block tables."""

    def __init__(
        self, num_blocks: int, block_size: int, table_rows: int, table_width: int, device: torch.device
    ) -> None:
        super().__init__(layers=[])
        self.num_blocks = num_blocks
        self.block_size = block_size
        # One row per batch row (and spare ones, all null, for padding rows), in blocks.
        self.tables = torch.zeros(table_rows, table_width, dtype=torch.long, device=device)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._slots = torch.zeros(0, dtype=torch.long, device=device)
        self._read: torch.Tensor | None = None
        self._read_len = 0
        self._paged = False
        self._prefix = False

    def slots_of(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pool rows of `positions` ([B, T]) of table rows `rows` ([B]); positions past the table read
        its last entry (never a real one: masks hide them)."""
        index = (positions // self.block_size).clamp(max=self.tables.shape[1] - 1)
        return self.tables[rows[:, None], index] * self.block_size + positions % self.block_size

    def for_forward(
        self,
        rows: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
        read_len: int | None = None,
        kernel: bool = False,
        fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """The next forward runs table rows `rows` ([B]) at `positions` ([B, T]); where `valid` ([B, T])
        is False (padding), its keys go to the null block. `read_len` None: attention reads the new keys
        alone (a prefill from position 0); else positions 0..read_len-1 of every row, gathered. Where
        `kernel` says the model's attention takes the paged kernels, a decode step hands them the pools
        and block tables instead (`DecodeTables`, with `fresh` its rows' counts of earlier positions the
        step adds and where they are: see there), and so does a prefill past cached positions
        (`PrefillTables`; each row reads up to its own length, whatever `read_len` says)."""
        slots = self.slots_of(rows, positions)
        if valid is not None:
            slots = torch.where(valid, slots, torch.zeros_like(slots))
        self._slots = slots.flatten()
        self._read_len = read_len or 0
        self._read, self._paged, self._prefix = None, False, False
        context.decode = context.prefill = None
        if kernel and positions.shape[1] == 1 and read_len is not None:
            # A decode step: the kernel reads each row's blocks up to its own position.
            self._paged = True
            tables = self.tables.index_select(0, rows)
            earlier, first = fresh or (None, None)
            context.decode = DecodeTables(
                tables,
                positions[:, 0] + 1,
                self.block_size,
                read_len,
                self._slots,
                fresh=earlier,
                fresh_from=first,
                keys=self._keys,
                values=self._values,
            )
            return
        if kernel:
            # A prefill past cached positions: the new keys are stored (`update`), then the kernel reads
            # each row's blocks up to its length.
            self._prefix = True
            new = valid.sum(1) if valid is not None else positions.shape[1]
            tables = self.tables.index_select(0, rows)
            context.prefill = PrefillTables(
                tables, positions[:, 0], positions[:, 0] + new, self.block_size, self._keys, self._values
            )
            return
        if read_len is None:
            return
        keys = torch.arange(read_len, device=positions.device)
        self._read = self.slots_of(rows, keys[None].expand(rows.shape[0], -1))

    @property
    def plain_causal(self) -> bool:
        """Rows start at position 0 and are right-padded, so causal attention over the new keys alone is
        exact for every real token (what a prefill is; attention may skip the mask)."""
        return self._read is None and not self._paged and not self._prefix

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, kv_heads, T, head_dim]
        if self._paged:
            # decode_layer stores them, beside its attention (the pools are allocated: `allocate`):
            # handed over as [B, kv_heads, head_dim], a rank that tells attention which step this is.
            # Nothing here reads `layer_idx`, or a compiled layer would compile for each value.
            return key_states[:, :, 0], value_states[:, :, 0]
        store(self.target(layer_idx, key_states), key_states, value_states)
        return self.visible(layer_idx, key_states, value_states)

    def allocate(self, layers: dict[int, LayerShape]) -> None:
        """Allocate the pools of layers not written yet, shaped as a trial forward found them."""
        for layer_idx in range(len(self._keys), len(layers)):
            self._allocate(*layers[layer_idx])

    def _allocate(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (self.num_blocks * self.block_size, kv_heads, head_dim)
        self._keys.append(torch.zeros(shape, dtype=dtype, device=device))
        self._values.append(torch.zeros(shape, dtype=dtype, device=device))

    def target(self, layer_idx: int, like: torch.Tensor) -> KVTarget:
        """Where this forward's new keys and values go in layer `layer_idx` (its pools are allocated at
        the first write, shaped for `like`: [B, kv_heads, T, head_dim])."""
        if layer_idx == len(self._keys):
            self._allocate(like.shape[1], like.shape[3], like.dtype, like.device)
        return self._keys[layer_idx], self._values[layer_idx], self._slots

    def visible(
        self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads after `store`: the new keys (plain causal), or each row's positions
        0..read_len-1, [B, kv_heads, read_len, head_dim]."""
        if self._read is None:
            return key_states, value_states
        keys, values = self._keys[layer_idx][self._read], self._values[layer_idx][self._read]
        return keys.transpose(1, 2), values.transpose(1, 2)

    def pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s key and value pools, [num_blocks * block_size, kv_heads, head_dim]."""
        return self._keys[layer_idx], self._values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._read_len


class PassThroughCache(Cache):
    """A cache that stores nothing: prefill from position 0 needs no past. It measures the model's KV
    bytes per token and each layer's shape, so the pools can be sized and allocated."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.shapes: dict[int, LayerShape] = {}  # each layer's, for `PagedKVCache.allocate`

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, heads, _, dim = key_states.shape
        self.shapes[layer_idx] = (heads, dim, key_states.dtype, key_states.device)
        return key_states, value_states

    @property
    def bytes_per_token(self) -> int:
        """A position's keys and values in every layer."""
        return sum(2 * heads * dim * dtype.itemsize for heads, dim, dtype, _ in self.shapes.values())

    plain_causal = True  # a prefill from position 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
