"""The KV pool's bookkeeping (free, held, cached blocks; prefix keys; eviction) and the paged cache's
writes and reads, against a contiguous cache."""

from __future__ import annotations

import pytest
import torch

from trickle.generation.kv.blocks import NULL_BLOCK, BlockPool, block_keys
from trickle.generation.kv.cache import PagedKVCache


def test_keys_name_the_whole_prefix_not_just_the_block() -> None:
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = block_keys([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2, "only full blocks get keys"
    assert a[0] != b[0] and a[1] != b[1], "same tokens after a different prefix: a different key"
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, known=a[:1]) == a


def test_blocks_are_handed_out_once_and_never_the_null_block() -> None:
    pool = BlockPool(5, 4)
    taken = pool.allocate(4)
    assert sorted(taken) == [1, 2, 3, 4] and NULL_BLOCK not in taken
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.release(taken)
    assert pool.num_available == 4 and pool.num_held == 0


def test_cached_blocks_stay_findable_until_the_pool_needs_them_oldest_first() -> None:
    pool = BlockPool(4, 2)  # three usable blocks
    first = pool.allocate(2)
    keys = block_keys([1, 2, 3, 4], 2)
    pool.register(first, keys)
    pool.release(first)  # released last block first: the tail is the older of the two
    assert pool.num_available == 3
    found = pool.match(keys, limit=2)
    assert found == first and [pool.refs(b) for b in found] == [1, 1]
    pool.release(found)
    # Two new blocks: the free one, then the cached one released longest ago (the tail).
    pool.allocate(2)
    assert pool.match(keys, limit=2) == first[:1], "the prefix's head survives its tail"


def test_a_key_already_cached_keeps_its_block() -> None:
    pool = BlockPool(8, 2)
    keys = block_keys([1, 2], 2)
    one, two = pool.allocate(1), pool.allocate(1)
    pool.register(one, keys)
    pool.register(two, keys)
    pool.release(two)
    assert pool.num_available == 6 and pool.match(keys, limit=1) == one


def test_without_prefix_caching_nothing_is_found() -> None:
    pool = BlockPool(8, 2, prefix_caching=False)
    keys = block_keys([1, 2], 2)
    blocks = pool.allocate(1)
    pool.register(blocks, keys)
    pool.release(blocks)
    assert pool.match(keys, limit=1) == []


def test_paged_reads_give_each_row_its_positions_in_order() -> None:
    """Rows whose blocks are scattered over the pool read back exactly what a contiguous cache holds."""
    torch.manual_seed(0)
    size, heads, dim = 4, 2, 3
    cache = PagedKVCache(
        num_blocks=12, block_size=size, table_rows=3, table_width=4, device=torch.device("cpu")
    )
    cache.tables[0, :3] = torch.tensor([7, 2, 9])
    cache.tables[1, :2] = torch.tensor([5, 11])
    lengths = torch.tensor([10, 6])
    rows = torch.tensor([0, 1])
    # A prefill of both rows from position 0 (row 1 padded past 6: its padding goes to the null block).
    keys, values = torch.randn(2, heads, 10, dim), torch.randn(2, heads, 10, dim)
    positions = torch.arange(10)[None].expand(2, -1)
    cache.for_forward(rows, positions, positions < lengths[:, None])
    assert cache.plain_causal
    out = cache.update(keys, values, 0)
    assert out[0] is keys
    # A decode step: each row writes one position and reads 0..11.
    new_k, new_v = torch.randn(2, heads, 1, dim), torch.randn(2, heads, 1, dim)
    cache.for_forward(rows, lengths[:, None], None, read_len=12)
    read_k, read_v = cache.update(new_k, new_v, 0)
    assert read_k.shape == (2, heads, 12, dim)
    for row, length in enumerate(lengths.tolist()):
        expected_k = torch.cat([keys[row, :, :length], new_k[row]], dim=1)
        expected_v = torch.cat([values[row, :, :length], new_v[row]], dim=1)
        assert torch.equal(read_k[row, :, : length + 1], expected_k)
        assert torch.equal(read_v[row, :, : length + 1], expected_v)
    assert torch.count_nonzero(cache.pools(0)[0][size * 2 : size * 3]) > 0, "row 0's second block was written"
