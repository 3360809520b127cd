"""TOP_K's candidates on a GPU: each row's largest sampler ranking keys (`sampler.ranking_keys`), found
by Triton kernels that sort chunks of a row in one program each.

torch's `topk` over a whole row of 32,000-128,000 int64 keys runs eight passes of three kernels (0.07 ms
of a one-row Falcon-7B step on the H200), and over chunks of a row its one-block kernel selects 64-bit
keys two bits a pass. Here one program sorts each chunk of CHUNK keys and keeps its largest, pass after
pass, until at most FINAL_MOST keys are left in a row; one program a row sorts those and writes the ids
of its largest.

A ranking key holds its token id in its low 32 bits (as minus the id), so only keys are sorted and the
ids are read back from the winners. No two keys are equal, so the result is unique: it is what
`keys.topk(count).indices` gives, largest first, which is what `largest` runs where the kernels do not
apply (no Triton, not CUDA).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

# Keys a program of the first passes sorts, and most keys a row may have left for the last pass (one
# program). On the H200 (`bench/sampler_modes.py`, session 22), chunks of 256 and a last pass of at most
# 512 took 12-17 us for one row of 32,000-128,256 tokens and 55-190 us for 64 rows, where torch's top-k
# over whole rows took 74-98 and 113-313 us, and chunks of 1,024 (up to 4,096 last) 32-95 and 181-607.
CHUNK = 256
FINAL_MOST = 512
PAD = -(1 << 63)  # below every ranking key: padding never wins


def applies(keys: torch.Tensor, count: int) -> bool:
    """Whether the kernels run: each pass must at least halve what a row has left."""
    return triton is not None and keys.is_cuda and keys.dtype == torch.int64 and 0 < count <= CHUNK // 2


@torch.library.custom_op("trickle::largest_keys", mutates_args=())
def largest(keys: torch.Tensor, count: int) -> torch.Tensor:
    """The token ids of each row's `count` largest ranking keys, largest first.

    keys: [B, V] int64 from `ranking_keys` -> [B, count] int64
    """
    if not applies(keys, count):
        return keys.topk(count, dim=-1).indices
    rows, length = keys.shape
    keys = keys.contiguous()
    while length > FINAL_MOST:
        chunks = triton.cdiv(length, CHUNK)
        kept = torch.empty(rows, chunks * count, device=keys.device, dtype=torch.int64)
        _chunk_kernel[(rows, chunks)](
            keys, kept, length, keys.stride(0), PAD, CHUNK=CHUNK, COUNT=count, num_warps=4
        )
        keys, length = kept, chunks * count
    ids = torch.empty(rows, count, device=keys.device, dtype=torch.int64)
    size = max(16, triton.next_power_of_2(length))
    _final_kernel[(rows,)](
        keys, ids, length, keys.stride(0), PAD, SIZE=size, COUNT=count, num_warps=8 if size > 1024 else 4
    )
    return ids


@largest.register_fake
def _(keys: torch.Tensor, count: int) -> torch.Tensor:
    return keys.new_empty(keys.shape[0], count)


if triton is not None:

    @triton.jit
    def _chunk_kernel(  # type: ignore[no-untyped-def]
        keys_ptr, out_ptr, length, stride, pad, CHUNK: tl.constexpr, COUNT: tl.constexpr
    ):
        # This chunk's COUNT largest keys, largest first, at its place in the row's kept keys
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        at = chunk * CHUNK + tl.arange(0, CHUNK)
        keys = tl.load(keys_ptr + row * stride + at, mask=at < length, other=pad)
        ranked = tl.sort(keys, descending=True)
        place = tl.arange(0, CHUNK)
        tl.store(out_ptr + (row * tl.num_programs(1) + chunk) * COUNT + place, ranked, mask=place < COUNT)

    @triton.jit
    def _final_kernel(  # type: ignore[no-untyped-def]
        keys_ptr, ids_ptr, length, stride, pad, SIZE: tl.constexpr, COUNT: tl.constexpr
    ):
        # The row's COUNT largest keys, largest first, written as their token ids
        row = tl.program_id(0)
        at = tl.arange(0, SIZE)
        keys = tl.load(keys_ptr + row * stride + at, mask=at < length, other=pad)
        ranked = tl.sort(keys, descending=True)
        ids = -ranked.to(tl.int32).to(tl.int64)  # a key is (order << 32) - id: its low half is -id
        tl.store(ids_ptr + row * COUNT + at, ids, mask=at < COUNT)
