"""BlockPool: which KV blocks are free, who holds each one, and which hold a known run of tokens (the
prefix cache). Bookkeeping only: no tensors; the cache's storage is `generation.kv.cache`.

A block holds the keys and values of `block_size` consecutive positions of one row. A full block of
known tokens is keyed by a digest of its tokens chained with its predecessor's key, so a key names the
whole prefix up to the block's end: a request whose leading blocks have cached keys reuses those blocks
(shared, read-only) and prefills only the rest. Blocks nobody holds stay cached until the pool needs
them, least recently released first.

Block 0 is never handed out: writes that must land somewhere harmless (padding rows and positions) go
there, and table entries past a row's blocks point there.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

NULL_BLOCK = 0
_ROOT = b""  # the key before a sequence's first block


def block_keys(tokens: Sequence[int], block_size: int, known: list[bytes] | None = None) -> list[bytes]:
    """The chained keys of every full block of `tokens`; `known` (the keys of a leading part, as returned
    before) is extended, not recomputed."""
    keys = list(known or [])
    for start in range(len(keys) * block_size, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(keys[-1] if keys else _ROOT, digest_size=16)
        digest.update(array("q", tokens[start : start + block_size]).tobytes())
        keys.append(digest.digest())
    return keys


class BlockPool:
    """Blocks 1..num_blocks-1, each free, held (by one row or, shared, by several), or cached (held by
    nobody, its tokens known, reusable until evicted)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("a KV pool needs at least two blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # popped from the end: 1 first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # block -> its key, for blocks in the cache
        self._cached: dict[bytes, int] = {}  # key -> block
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_available(self) -> int:
        """Blocks a row could take now: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def num_held(self) -> int:
        return self.num_usable - self.num_available

    def refs(self, block: int) -> int:
        return self._refs[block]

    def match(self, keys: list[bytes], limit: int) -> list[int]:
        """The cached blocks of the longest run of leading `keys` (at most `limit` blocks), taken: each
        gains a holder."""
        found: list[int] = []
        if self.prefix_caching:
            for key in keys[:limit]:
                block = self._cached.get(key)
                if block is None:
                    break
                found.append(block)
        self.take(found)
        return found

    def can_allocate(self, count: int, reserve: int = 0) -> bool:
        return count + reserve <= self.num_available

    def take(self, blocks: list[int]) -> None:
        """One more holder for each of `blocks` (cached ones found by `match`)."""
        for block in blocks:
            if self._refs[block] == 0:
                self._idle.pop(block, None)
            self._refs[block] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for one holder: free ones first, then the cached ones released longest ago
        (they leave the cache). MemoryError if there are not that many."""
        if count > self.num_available:
            raise MemoryError(f"{count} KV blocks asked for, {self.num_available} available")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._cached[self._key_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """One holder fewer for each of `blocks` (a row's, in its order). Blocks left with none stay in
        the cache if they hold known tokens, else become free; a row's last blocks are released first,
        so they are evicted before the prefix they continue."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    def register(self, blocks: list[int], keys: list[bytes]) -> None:
        """Record that `blocks[i]` holds the tokens keyed `keys[i]` (all of them written, or queued to be
        written before any later step reads them). A key already cached keeps its block."""
        if not self.prefix_caching:
            return
        for block, key in zip(blocks, keys, strict=False):
            if key in self._cached or block in self._key_of:
                continue
            self._cached[key] = block
            self._key_of[block] = key

    def forget(self, blocks: list[int]) -> None:
        """Take `blocks` out of the prefix cache (their contents were never written)."""
        for block in blocks:
            key = self._key_of.pop(block, None)
            if key is not None:
                del self._cached[key]
