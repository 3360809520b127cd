"""Attention that reads the paged KV cache in place, on a GPU: Triton kernels that walk each row's block
table up to the row's own length (no gathered copy, no padding to a length bucket), for a decode step
(`decode_layer`) and for a prefill past cached positions (`prefill_layer`).

Models that call attention through transformers' attention interface get them by name (`PAGED`): the
engine switches their implementation to `attention` below, which runs `decode_layer` for a decode step
the cache marks as paged, `prefill_layer` for a prefill past cached positions, and hands every other
call (a prefill from position 0, a CPU) to the implementation the model had. Families with attention of
their own (Falcon) call them themselves. Where Triton or a GPU is missing, or a model's attention never
comes through here, the cache gathers each row's positions and attention runs as the model defines it
(the reference path the CPU tests check; the kernels' plain-torch references are checked there too).

`decode_layer` is one opaque operator (`torch.ops.trickle.decode_layer`) that stores a layer's new keys
and values and attends: torch.compile sees a layer's attention as one call that names no layer, so one
compiled layer serves every layer (`generation.runner.compiled`), and it never traces the pools or the
kernel launch. What tells a compiled layer it runs a paged decode step is the rank of the keys the
cache hands it (3: one new position a row), never the thread-local `context`, which only eager code
reads (prefills run uncompiled).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

PAGED = "trickle_paged"
TILE = 64  # positions one loop iteration of the kernels reads
# A decode step of few programs walks its keys in tiles of WIDE_TILE positions: fewer dependent trips to
# memory each; past WIDE_PROGRAMS programs the GPU is busy enough and TILE's smaller tiles are faster
# (bench/decode_attention.py, bench/results/h200-session21).
WIDE_TILE = 128
WIDE_PROGRAMS = 320
# A decode program takes at most this many query heads of a key/value head's group where a layer reads
# at most CHUNK_KEYS keys (rows x key/value heads x the step's KV length): a large group (multi-query
# attention: Falcon-7B's 71 heads share one) is then spread over several programs, each reading the
# same keys (from the L2 cache after the first), where one would take them all alone. Past that the
# GPU has programs enough, and the repeated reads cost more.
HEAD_CHUNK = 16
CHUNK_KEYS = 32768
# Few rows leave most of the GPU idle, each walking its keys alone: their keys are then split over up
# to this many programs in all (at most one split per tile of the longest row), merged by a second
# kernel.
SPLIT_PROGRAMS = 128
PREFILL_M = 64  # (query position, head) pairs one program of the prefill kernel takes


@dataclass
class DecodeTables:
    """What the kernel reads besides the pools: each row's block table [B, W] and length [B] (keys
    0..length-1 are visible)."""

    tables: torch.Tensor
    lengths: torch.Tensor
    block_size: int
    max_len: int
    """No row is longer (the step's KV-length bucket): it bounds how finely keys are split."""
    slots: torch.Tensor | None = None
    """The pool rows the step's new keys go to, [B] (for `decode_layer`)."""
    fresh: torch.Tensor | None = None
    fresh_from: torch.Tensor | None = None
    """Where a step carries several positions of one sequence (a newcomer's prompt tokens mixed in), each
    row's count of earlier positions of its sequence that the step adds, [B], and the step's row that
    holds the first of them, [B] (the others follow it in order): `decode_layer` reads those from the
    step's keys, not the pools, as it does the row's own. None: every row adds its newest position alone."""
    keys: Sequence[torch.Tensor] = ()
    values: Sequence[torch.Tensor] = ()
    """Every layer's key and value pools, [N * block_size, KV, D] (for `decode_layer`)."""
    next_layer: int = 0
    """The layer whose attention `decode_layer` runs next: layers call it in their order."""


@dataclass
class PrefillTables:
    """A prefill past cached positions, for `prefill_layer`: each row's block table [B, W], its first
    new position [B] (how many it found cached) and its length once the new tokens are in [B]; the
    query at position p sees keys 0..p."""

    tables: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    block_size: int
    keys: Sequence[torch.Tensor] = ()
    values: Sequence[torch.Tensor] = ()
    """Every layer's key and value pools (the new keys are stored before attention reads them)."""
    next_layer: int = 0
    """The layer whose attention `prefill_layer` runs next (layers call it in their order)."""


class _Context(threading.local):
    """The decode step (or prefill past cached positions) the engine thread is running now (None
    outside one), and, while the engine probes a model (`probe` a list), the layer index of each other
    call that came through `attention`, in order: whether every layer's attention comes through, one
    after another. Only eager code reads it: a prefill never runs compiled layers."""

    decode: DecodeTables | None = None
    prefill: PrefillTables | None = None
    probe: list[int | None] | None = None

    def saw(self, layer: int | None) -> None:
        """An attention call outside a paged decode step, by layer `layer`."""
        if self.probe is not None:
            self.probe.append(layer)


context = _Context()


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def paged_decode(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    decode: DecodeTables,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    launch: dict[str, int] | None = None,
    new: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """query [B, H, 1, D]; pools [N * block_size, KV, D] -> [B, 1, H, D]. The Triton kernel on a GPU,
    else `reference_decode`. `launch` overrides HEAD_CHUNK ("chunk"), CHUNK_KEYS ("chunk_keys"),
    SPLIT_PROGRAMS ("programs"), the tile ("tile") and the kernel's num_warps and num_stages (to
    measure).

    `new`: the step's keys and values ([B, KV, D], each row's newest position), for the pools' rows
    `decode.slots`: the kernel reads them from there, not the pools, and writes them to the pools as it
    goes (`store_new` and the decode in one launch, not one after the other); so are the earlier
    positions the step adds (`decode.fresh`), which other programs of the launch store."""
    kernel = triton is not None and query.is_cuda
    if new is not None and not (kernel and all(t.stride(-1) == 1 for t in new)):
        store_new(key_pool, value_pool, *new, decode.slots)  # type: ignore[arg-type]
        new = None
    if not kernel:
        return reference_decode(query, key_pool, value_pool, decode, scale, window, softcap)
    settings = {
        "chunk": HEAD_CHUNK,
        "chunk_keys": CHUNK_KEYS,
        "programs": SPLIT_PROGRAMS,
        **(launch or {}),
    }
    kernel_launch = {name: settings[name] for name in ("num_warps", "num_stages") if name in settings}
    batch, heads, _, dim = query.shape
    kv_heads = key_pool.shape[1]
    group = heads // kv_heads
    q = query.reshape(batch, heads, dim)
    out = torch.empty_like(q)
    # A program's query heads: the group's, or a chunk of them (padded to 16 at least, for tl.dot).
    group_pad = max(16, triton.next_power_of_2(group))
    if batch * kv_heads * decode.max_len <= settings["chunk_keys"]:
        group_pad = max(16, min(group_pad, settings["chunk"]))
    chunks = -(-group // group_pad)
    dim_pad = max(16, triton.next_power_of_2(dim))
    programs = batch * kv_heads * chunks
    # (Wide tiles of 256-wide heads would outgrow the shared memory a program may take.)
    wide = programs <= WIDE_PROGRAMS and dim_pad <= 128
    tile = settings.get("tile") or (WIDE_TILE if wide else TILE)
    splits = max(1, min(settings["programs"] // programs, -(-decode.max_len // tile)))
    if splits > 1:
        best = torch.empty(batch, kv_heads * chunks, splits, group_pad, device=q.device, dtype=torch.float32)
        total = torch.empty_like(best)
        partial = torch.empty(*best.shape, dim_pad, device=q.device, dtype=torch.float32)
    else:
        best = total = partial = out  # unused
    key, value = new if new is not None else (q, q)  # (unread without `new`)
    fresh, fresh_from = decode.lengths, decode.lengths  # (unread without `new` and `decode.fresh`)
    mixed = False
    if new is not None and decode.fresh is not None and decode.fresh_from is not None:
        fresh, fresh_from, mixed = decode.fresh, decode.fresh_from, True
    _decode_kernel[(batch, kv_heads * chunks, splits)](
        q,
        key_pool,
        value_pool,
        out,
        best,
        total,
        partial,
        decode.tables,
        decode.lengths,
        key,
        value,
        decode.slots if new is not None else decode.lengths,
        fresh,
        fresh_from,
        q.stride(0),
        q.stride(1),
        key_pool.stride(0),
        key_pool.stride(1),
        out.stride(0),
        out.stride(1),
        decode.tables.stride(0),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        fresh.stride(0),
        fresh_from.stride(0),
        scale,
        float(softcap or 0.0),
        int(window or 0),
        splits,
        GROUP=group,
        GROUP_PAD=group_pad,
        CHUNKS=chunks,
        DIM=dim,
        DIM_PAD=dim_pad,
        BLOCK=decode.block_size,
        TILE=tile,
        HAS_WINDOW=bool(window),
        HAS_SOFTCAP=bool(softcap),
        IEEE=q.dtype == torch.float32,
        SPLIT=splits > 1,
        STORE=new is not None,
        MIXED=mixed,
        **kernel_launch,
    )
    if splits > 1:
        _merge_kernel[(batch, kv_heads * chunks)](
            best,
            total,
            partial,
            out,
            out.stride(0),
            out.stride(1),
            splits,
            GROUP=group,
            GROUP_PAD=group_pad,
            CHUNKS=chunks,
            DIM=dim,
            DIM_PAD=dim_pad,
        )
    return out[:, None]


def store_new(
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write a decode step's new keys and values (key, value [B, KV, D]) to the pools' rows `slots`
    ([B]): one kernel on a GPU for both, else indexed assignment."""
    if triton is None or not key.is_cuda or key.stride(-1) != 1 or value.stride(-1) != 1:
        key_pool[slots] = key
        value_pool[slots] = value
        return
    batch, kv_heads, dim = key.shape
    _store_kernel[(batch,)](
        key,
        value,
        key_pool,
        value_pool,
        slots,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_pool.stride(0),
        key_pool.stride(1),
        KV_HEADS=kv_heads,
        KV_PAD=triton.next_power_of_2(kv_heads),
        DIM=dim,
        DIM_PAD=triton.next_power_of_2(dim),
    )


def reference_decode(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    decode: DecodeTables,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """What the kernel computes, in plain torch (float32 scores): each row's positions gathered from its
    blocks up to `decode.max_len`, those at or past its length (or behind its window) hidden."""
    batch, heads, _, dim = query.shape
    kv_heads = key_pool.shape[1]
    positions = torch.arange(decode.max_len, device=query.device)
    index = (positions // decode.block_size).clamp(max=decode.tables.shape[1] - 1)
    slots = decode.tables[:, index] * decode.block_size + positions % decode.block_size  # [B, L]
    keys = key_pool[slots].permute(0, 2, 3, 1).float()  # [B, KV, D, L]
    values = value_pool[slots].transpose(1, 2).float()  # [B, KV, L, D]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = (q @ keys) * scale  # [B, KV, group, L]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    lengths = decode.lengths[:, None]
    visible = positions[None] < lengths
    if window:
        visible = visible & (positions[None] >= lengths - window)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values  # [B, KV, group, D]
    return out.reshape(batch, 1, heads, dim).to(query.dtype)


def paged_prefill(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    prefill: PrefillTables,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    launch: dict[str, int] | None = None,
) -> torch.Tensor:
    """query [B, H, T, D] at positions starts..starts+T-1; pools [N * block_size, KV, D] holding each
    row's positions 0..length-1 -> [B, T, H, D], causal. The Triton kernel on a GPU, else
    `reference_prefill`. Queries past a row's length (padding) see its keys too; nothing reads them.
    `launch` overrides the kernel's tile sizes (M, TILE) and num_warps / num_stages (to measure)."""
    if triton is None or not query.is_cuda:
        return reference_prefill(query, key_pool, value_pool, prefill, scale, window, softcap)
    batch, heads, length, dim = query.shape
    kv_heads = key_pool.shape[1]
    group = heads // kv_heads
    if query.stride(-1) != 1:  # the kernel steps through a head's dimensions one element at a time
        query = query.contiguous()
    out = query.new_empty(batch, length, heads, dim)
    dim_pad = max(16, triton.next_power_of_2(dim))
    settings = {"M": PREFILL_M, "TILE": TILE, "num_warps": 8 if dim_pad > 128 else 4, **(launch or {})}
    # A program takes PREFILL_M (query position, head of the group) pairs: several positions of one head
    # under multi-head attention, one position's many heads under multi-query.
    grid = (batch, kv_heads, triton.cdiv(length * group, settings["M"]))
    _prefill_kernel[grid](
        query,
        key_pool,
        value_pool,
        out,
        prefill.tables,
        prefill.starts,
        prefill.lengths,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        key_pool.stride(0),
        key_pool.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        prefill.tables.stride(0),
        length,
        scale,
        float(softcap or 0.0),
        int(window or 0),
        GROUP=group,
        DIM=dim,
        DIM_PAD=dim_pad,
        BLOCK=prefill.block_size,
        HAS_WINDOW=bool(window),
        HAS_SOFTCAP=bool(softcap),
        IEEE=query.dtype == torch.float32,
        **settings,
    )
    return out


def reference_prefill(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    prefill: PrefillTables,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """What the prefill kernel computes, in plain torch (float32 scores)."""
    batch, heads, length, dim = query.shape
    kv_heads = key_pool.shape[1]
    span = prefill.tables.shape[1] * prefill.block_size
    keys_at = torch.arange(span, device=query.device)
    slots = (
        prefill.tables[:, keys_at // prefill.block_size] * prefill.block_size + keys_at % prefill.block_size
    )
    keys = key_pool[slots].permute(0, 2, 3, 1).float()  # [B, KV, D, L]
    values = value_pool[slots].transpose(1, 2).float()  # [B, KV, L, D]
    q = query.reshape(batch, kv_heads, heads // kv_heads, length, dim).float()
    scores = (q @ keys[:, :, None]) * scale  # [B, KV, group, T, L]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    at = prefill.starts[:, None] + torch.arange(length, device=query.device)  # [B, T]
    visible = (keys_at[None, None] <= at[..., None]) & (keys_at[None, None] < prefill.lengths[:, None, None])
    if window:
        visible = visible & (at[..., None] - keys_at[None, None] < window)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a padding query may see no key
    out = weights @ values[:, :, None]  # [B, KV, group, T, D]
    return out.reshape(batch, heads, length, dim).transpose(1, 2).to(query.dtype)


def prefill_layer(
    query: torch.Tensor, scale: float, window: int | None = None, softcap: float | None = None
) -> torch.Tensor:
    """A prefill past cached positions, in its next layer (layers call it in the order of their index,
    which the engine's probe checks; the cache has stored the layer's new keys and values): query
    [B, H, T, D] attends to each row's blocks -> [B, T, H, D]."""
    prefill = context.prefill
    if prefill is None:
        raise RuntimeError("prefill_layer runs inside a paged prefill only")
    layer = prefill.next_layer
    prefill.next_layer += 1
    keys, values = prefill.keys[layer], prefill.values[layer]
    return paged_prefill(query, keys, values, prefill, scale, window, softcap)


@torch.library.custom_op("trickle::decode_layer", mutates_args=())
def _decode_layer(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, window: int, softcap: float
) -> torch.Tensor:
    decode = context.decode
    if decode is None or decode.slots is None:
        raise RuntimeError("decode_layer runs inside a paged decode step only")
    layer = decode.next_layer
    decode.next_layer += 1
    keys, values = decode.keys[layer], decode.values[layer]
    # the step's keys and values [B, KV, D] read as the newest positions and written to the pools' rows
    return paged_decode(query, keys, values, decode, scale, window or None, softcap or None, new=(key, value))


@_decode_layer.register_fake
def _(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, window: int, softcap: float
) -> torch.Tensor:
    batch, heads, _, dim = query.shape
    return query.new_empty(batch, 1, heads, dim)


def decode_layer(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """A paged decode step's attention in its next layer (layers call it in the order of their index,
    which the engine's probe checks): the new keys and values (key, value [B, KV, D], as the cache's
    `update` hands them over) are stored at the step's slots, then query [B, H, 1, D] attends to each
    row's positions -> [B, 1, H, D]. It takes no layer index, so torch.compile has none to compile each
    layer apart for."""
    return _decode_layer(query, key, value, scale, int(window or 0), float(softcap or 0.0))


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: `decode_layer` for a paged decode step (the cache
    then stores nothing itself and hands over the new keys and values), else the model's own
    implementation."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if key.dim() == 3:  # a paged decode step's new keys (see `PagedKVCache.update`)
        return decode_layer(query, key, value, scale, window, kwargs.get("softcap")), None
    if context.prefill is not None:  # a prefill past cached positions (eager code only)
        return prefill_layer(query, scale, window, kwargs.get("softcap")), None
    context.saw(getattr(module, "layer_idx", None))
    original = getattr(module, "_trickle_attention", None) or _original(module)
    return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _original(module: torch.nn.Module) -> Callable[..., Any]:
    """The attention function the model was loaded with (its own eager one where it had no other)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module.config, "_trickle_attention", "eager")
    found = ALL_ATTENTION_FUNCTIONS.get(name) if name != "eager" else None
    if found is None:
        found = inspect.getmodule(type(module)).eager_attention_forward  # type: ignore[union-attr]
    module._trickle_attention = found
    return found


def _mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """The mask the model's own implementation makes, where transformers makes it: a forward the engine
    does not run (the engine hands every forward its own masks). Without a mask function under the
    switched name transformers would make none, and a sliding window would be lost."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = getattr(config, "_trickle_attention", "eager")
    made = ALL_MASK_ATTENTION_FUNCTIONS.get(name) or ALL_MASK_ATTENTION_FUNCTIONS["eager"]
    return made(*args, config=config, **kwargs)


def install(model: torch.nn.Module) -> bool:
    """Route the model's attention through `attention` (its own implementation stays for all but paged
    decode steps). False where the model cannot switch implementations."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not getattr(model, "_supports_attention_backend", False):
        return False
    AttentionInterface.register(PAGED, attention)
    AttentionMaskInterface.register(PAGED, _mask)
    config = model.config
    before = getattr(config, "_attn_implementation", None) or "eager"
    if before == PAGED:
        return True
    try:
        model.set_attn_implementation(PAGED)  # type: ignore[operator]
    except Exception:
        return False
    for sub in (config, *(getattr(config, name) for name in getattr(config, "sub_configs", {}) or {})):
        if sub is not None:
            sub._trickle_attention = before
    return True


if triton is not None:

    @triton.jit
    def _attend(  # type: ignore[no-untyped-def]
        q, k, v, visible, acc, best, total, scale, softcap, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr
    ):
        # One tile of keys and values [TILE, D] into a program's running softmax over its query heads:
        # the accumulated values, the best score and the sum of weights, each rescaled to the new best.
        if IEEE:  # float32 models: full-precision products, not TF32
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        if HAS_SOFTCAP:
            scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_best[:, None])
        rescale = tl.exp(best - new_best)
        total = total * rescale + tl.sum(weights, axis=1)
        if IEEE:
            acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v).to(tl.float32)
        return acc, new_best, total

    @triton.jit
    def _decode_kernel(  # type: ignore[no-untyped-def]
        Q,
        K,
        V,
        Out,
        Best,
        Total,
        Partial,
        Tables,
        Lengths,
        KNew,
        VNew,
        Slots,
        Fresh,
        From,
        stride_qb,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_ob,
        stride_oh,
        stride_tb,
        stride_knb,
        stride_knh,
        stride_vnb,
        stride_vnh,
        stride_fresh,
        stride_from,
        scale,
        softcap,
        window,
        splits,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        CHUNKS: tl.constexpr,
        DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        TILE: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        IEEE: tl.constexpr,
        SPLIT: tl.constexpr,
        STORE: tl.constexpr,
        MIXED: tl.constexpr,
    ):
        # One program per (row, key/value head and chunk of its group, split): the chunk's query heads
        # against its share of the row's keys. STORE: the newest position's key and value come from
        # KNew and VNew (the step's), not the pools, and the program whose share holds that position
        # (the first chunk's, of a group spread over several) writes them to the pools' row Slots[row];
        # MIXED: so do the Fresh[row] positions before it, from the step's entries From[row] on.
        row = tl.program_id(0)
        kv_head = tl.program_id(1) // CHUNKS
        chunk = tl.program_id(1) % CHUNKS
        split = tl.program_id(2)
        length = tl.load(Lengths + row)
        heads = chunk * GROUP_PAD + tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, DIM_PAD)
        head_ok = heads < GROUP
        dim_ok = dims < DIM
        q_ptrs = Q + row * stride_qb + (kv_head * GROUP + heads)[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptrs, mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
        best = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        total = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
        first = 0
        if HAS_WINDOW:
            first = tl.maximum(length - window, 0) // TILE * TILE
        share = tl.cdiv(tl.cdiv(length - first, splits), TILE) * TILE
        begin = first + split * share
        end = tl.minimum(begin + share, length)
        stored = length  # positions 0..stored-1 are read from the pools, the others from KNew and VNew
        if STORE:
            fresh = 0
            source = row
            if MIXED:  # (both loaded here, beside the row's length, not one after another)
                fresh = tl.load(Fresh + row * stride_fresh)
                source = tl.load(From + row * stride_from)
            stored = length - 1 - fresh
        pooled = stored
        if HAS_WINDOW:  # no tile that holds no visible key (its weights would be NaN)
            pooled = tl.where(stored > length - window, stored, 0)
        for start in range(begin, tl.minimum(end, pooled), TILE):
            positions = start + tl.arange(0, TILE)
            visible = positions < stored
            if HAS_WINDOW:
                visible = visible & (positions >= length - window)
            blocks = tl.load(Tables + row * stride_tb + positions // BLOCK, mask=positions < stored, other=0)
            slots = blocks * BLOCK + positions % BLOCK
            kv_offsets = slots[:, None] * stride_kn + kv_head * stride_kh + dims[None, :]
            k = tl.load(K + kv_offsets, mask=visible[:, None] & dim_ok[None, :], other=0.0)
            v = tl.load(V + kv_offsets, mask=visible[:, None] & dim_ok[None, :], other=0.0)
            acc, best, total = _attend(q, k, v, visible, acc, best, total, scale, softcap, HAS_SOFTCAP, IEEE)
        if STORE:
            if MIXED:
                # Earlier positions of the row's sequence that this step adds (a newcomer's prompt tokens
                # mixed into the step): entries From[row] on hold them in order, stored by their own
                # programs of this launch, so read from KNew and VNew.
                since = stored
                if HAS_WINDOW:
                    since = tl.maximum(stored, length - window)
                for start in range(tl.maximum(begin, since), tl.minimum(end, length - 1), TILE):
                    positions = start + tl.arange(0, TILE)
                    visible = positions < tl.minimum(end, length - 1)
                    entries = source + positions - stored
                    k_new = entries[:, None] * stride_knb + kv_head * stride_knh + dims[None, :]
                    v_new = entries[:, None] * stride_vnb + kv_head * stride_vnh + dims[None, :]
                    k = tl.load(KNew + k_new, mask=visible[:, None] & dim_ok[None, :], other=0.0)
                    v = tl.load(VNew + v_new, mask=visible[:, None] & dim_ok[None, :], other=0.0)
                    acc, best, total = _attend(
                        q, k, v, visible, acc, best, total, scale, softcap, HAS_SOFTCAP, IEEE
                    )
            # The newest position: the row's own key and value, which this program (the first chunk's,
            # of the split that holds it) also writes to the pools.
            if (length > 0) & (begin <= length - 1) & (length - 1 < end):
                new_k = tl.load(KNew + row * stride_knb + kv_head * stride_knh + dims, mask=dim_ok, other=0.0)
                new_v = tl.load(VNew + row * stride_vnb + kv_head * stride_vnh + dims, mask=dim_ok, other=0.0)
                score = tl.sum(q.to(tl.float32) * new_k.to(tl.float32)[None, :], axis=1) * scale
                if HAS_SOFTCAP:
                    score = softcap * (2.0 * tl.sigmoid(2.0 * score / softcap) - 1.0)
                new_best = tl.maximum(best, score)
                weight = tl.exp(score - new_best)
                rescale = tl.exp(best - new_best)
                total = total * rescale + weight
                if not IEEE:  # as the tiles' weights are, rounded to the values' type
                    weight = weight.to(new_v.dtype).to(tl.float32)
                acc = acc * rescale[:, None] + weight[:, None] * new_v.to(tl.float32)[None, :]
                best = new_best
                if chunk == 0:
                    into = tl.load(Slots + row) * stride_kn + kv_head * stride_kh + dims
                    tl.store(K + into, new_k, mask=dim_ok)
                    tl.store(V + into, new_v, mask=dim_ok)
        if SPLIT:
            at = (row * tl.num_programs(1) + tl.program_id(1)) * splits + split
            lanes = tl.arange(0, GROUP_PAD)
            tl.store(Best + at * GROUP_PAD + lanes, best)
            tl.store(Total + at * GROUP_PAD + lanes, total)
            tl.store(Partial + (at * GROUP_PAD + lanes)[:, None] * DIM_PAD + dims[None, :], acc)
        else:
            out = acc / tl.where(total > 0, total, 1.0)[:, None]
            o_ptrs = Out + row * stride_ob + (kv_head * GROUP + heads)[:, None] * stride_oh + dims[None, :]
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _merge_kernel(  # type: ignore[no-untyped-def]
        Best,
        Total,
        Partial,
        Out,
        stride_ob,
        stride_oh,
        splits,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        CHUNKS: tl.constexpr,
        DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
    ):
        # The splits of one (row, key/value head, chunk of its group), merged as the softmax over all
        # its keys.
        row = tl.program_id(0)
        kv_head = tl.program_id(1) // CHUNKS
        heads = tl.program_id(1) % CHUNKS * GROUP_PAD + tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, DIM_PAD)
        best = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        total = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
        lanes = tl.arange(0, GROUP_PAD)
        for split in range(0, splits):
            at = (row * tl.num_programs(1) + tl.program_id(1)) * splits + split
            part_best = tl.load(Best + at * GROUP_PAD + lanes)
            part_total = tl.load(Total + at * GROUP_PAD + lanes)
            part = tl.load(Partial + (at * GROUP_PAD + lanes)[:, None] * DIM_PAD + dims[None, :])
            new_best = tl.maximum(best, part_best)
            # A split that saw no key has best -inf: it weighs nothing.
            keep = tl.where(best == float("-inf"), 0.0, tl.exp(best - new_best))
            take = tl.where(part_best == float("-inf"), 0.0, tl.exp(part_best - new_best))
            total = total * keep + part_total * take
            acc = acc * keep[:, None] + part * take[:, None]
            best = new_best
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        o_ptrs = Out + row * stride_ob + (kv_head * GROUP + heads)[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(heads < GROUP)[:, None] & (dims < DIM)[None, :])

    @triton.jit
    def _prefill_kernel(  # type: ignore[no-untyped-def]
        Q,
        K,
        V,
        Out,
        Tables,
        Starts,
        Lengths,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_kn,
        stride_kh,
        stride_ob,
        stride_ot,
        stride_oh,
        stride_tb,
        length,
        scale,
        softcap,
        window,
        GROUP: tl.constexpr,
        DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        M: tl.constexpr,
        TILE: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program per (row, key/value head, M consecutive (query position, group head) pairs): the
        # pairs' queries against the keys up to the last one's position, read through the block table.
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        pairs = tl.program_id(2) * M + tl.arange(0, M)
        query_at = pairs // GROUP
        heads = kv_head * GROUP + pairs % GROUP
        dims = tl.arange(0, DIM_PAD)
        dim_ok = dims < DIM
        pair_ok = query_at < length
        start = tl.load(Starts + row)
        end = tl.load(Lengths + row)
        q_ptrs = (
            Q + row * stride_qb + heads[:, None] * stride_qh + query_at[:, None] * stride_qt + dims[None, :]
        )
        q = tl.load(q_ptrs, mask=pair_ok[:, None] & dim_ok[None, :], other=0.0)
        positions_q = start + query_at
        first_q = start + (tl.program_id(2) * M) // GROUP
        last_q = start + tl.minimum((tl.program_id(2) * M + M - 1) // GROUP, length - 1)
        best = tl.full([M], float("-inf"), dtype=tl.float32)
        total = tl.zeros([M], dtype=tl.float32)
        acc = tl.zeros([M, DIM_PAD], dtype=tl.float32)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(first_q - window + 1, 0) // TILE * TILE
        hi = tl.minimum(last_q + 1, end)
        for begin in range(lo, hi, TILE):
            keys_at = begin + tl.arange(0, TILE)
            present = keys_at < end
            visible = present[None, :] & (keys_at[None, :] <= positions_q[:, None])
            if HAS_WINDOW:
                visible = visible & (positions_q[:, None] - keys_at[None, :] < window)
            blocks = tl.load(Tables + row * stride_tb + keys_at // BLOCK, mask=present, other=0)
            slots = blocks * BLOCK + keys_at % BLOCK
            kv_offsets = slots[:, None] * stride_kn + kv_head * stride_kh + dims[None, :]
            k = tl.load(K + kv_offsets, mask=present[:, None] & dim_ok[None, :], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            if HAS_SOFTCAP:
                scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
            scores = tl.where(visible, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            # A pair that has seen no visible key yet keeps best -inf: shift by 0 so nothing is NaN.
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)
            weights = tl.exp(scores - shift[:, None])
            rescale = tl.exp(best - shift)
            total = total * rescale + tl.sum(weights, axis=1)
            v = tl.load(V + kv_offsets, mask=present[:, None] & dim_ok[None, :], other=0.0)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v).to(tl.float32)
            best = new_best
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        o_ptrs = (
            Out + row * stride_ob + query_at[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        )
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=pair_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _store_kernel(  # type: ignore[no-untyped-def]
        Key,
        Value,
        KeyPool,
        ValuePool,
        Slots,
        stride_kb,
        stride_kh,
        stride_vb,
        stride_vh,
        stride_pn,
        stride_ph,
        KV_HEADS: tl.constexpr,
        KV_PAD: tl.constexpr,
        DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
    ):
        # One program per row: its new key and value, every head, to its pool row.
        row = tl.program_id(0)
        slot = tl.load(Slots + row)
        kv_heads = tl.arange(0, KV_PAD)
        dims = tl.arange(0, DIM_PAD)
        ok = (kv_heads < KV_HEADS)[:, None] & (dims < DIM)[None, :]
        into = slot * stride_pn + kv_heads[:, None] * stride_ph + dims[None, :]
        key = tl.load(Key + row * stride_kb + kv_heads[:, None] * stride_kh + dims[None, :], mask=ok)
        tl.store(KeyPool + into, key, mask=ok)
        value = tl.load(Value + row * stride_vb + kv_heads[:, None] * stride_vh + dims[None, :], mask=ok)
        tl.store(ValuePool + into, value, mask=ok)
