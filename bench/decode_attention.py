"""A decode step's attention per layer: the paged decode kernel, which reads the step's new keys and
values from the step and stores them to the pools as it goes (and its merge, where keys are split),
for the head layouts of Falcon-7B (71 query heads on one key head), Llama-7B (32 on 32) and
Llama-3-8B (32 on 8), at 1/8/64 rows and KV lengths 256/512/2048 (each row 3/4 full): the defaults,
launch settings swept (`paged_decode`'s `launch`: query heads a program takes, positions a tile holds,
programs the keys may be split over), the path before them (two indexed assignments, whole groups,
tiles of 64 positions), the store kernel apart before the decode kernel ("stored apart", session 22's
path), and the runner's path, which hands the kernel each row's count of earlier positions the step
adds (all 0 here: "mixed columns", what a step without newcomers pays for the mixed-step reads). Each
setting's output is checked against `reference_decode`.

Eight layers' pools, each its own tensors, run in one CUDA graph, each layer after a write over the L2
(timed alone and taken off), so each reads its keys from memory, as in a step between the weights.

    python bench/decode_attention.py   # writes $OUT/decode_attention.json and prints a table
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemm_shapes import save, timed

from trickle.generation.kv.attention import DecodeTables, paged_decode, reference_decode, store_new

LAYOUTS = {"falcon-7b": (71, 1, 64), "llama-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}
ROWS = (1, 8, 64)
LENGTHS = (256, 512, 2048)
LAYERS = 8
BLOCK = 16
# Forced: every group chunked (up to its size) whatever the keys a layer reads.
SETTINGS = [{"chunk": c, "chunk_keys": 1 << 40, "tile": tile} for c in (16, 128) for tile in (32, 64, 128)]
# The default chunks and tiles, keys split over programs up to these many (1: never split, so no merge)
SETTINGS += [{"programs": programs} for programs in (1, 32, 256)]
FLUSH_BYTES = 96 << 20  # written between layers: what a layer's weights do to the L2 in a step


def before(query, keys, values, key, value, tables: DecodeTables) -> torch.Tensor:
    """The path this replaces: indexed assignments, whole groups, splits down to one tile."""
    keys[tables.slots] = key
    values[tables.slots] = value
    return paged_decode(query, keys, values, tables, 0.125, launch={"chunk": 1024, "tile": 64})


def stored_apart(query, keys, values, key, value, tables: DecodeTables) -> torch.Tensor:
    """The store kernel, then the decode kernel reading every position from the pools."""
    store_new(keys, values, key, value, tables.slots)
    return paged_decode(query, keys, values, tables, 0.125)


def mixed_columns(given: DecodeTables):
    """The runner's call: the step's earlier positions per row given (`given`), as columns of a wider
    table."""

    def run(query, keys, values, key, value, tables: DecodeTables) -> torch.Tensor:
        return paged_decode(query, keys, values, given, 0.125, new=(key, value))

    return run


def now(launch):
    def run(query, keys, values, key, value, tables: DecodeTables) -> torch.Tensor:
        return paged_decode(query, keys, values, tables, 0.125, launch=launch, new=(key, value))

    return run


def main() -> None:
    torch.manual_seed(0)
    results = []
    # Each layer's keys are read cold, as in a step: a write over the L2 comes first (timed alone, and
    # taken off).
    flush = torch.empty(FLUSH_BYTES // 4, device="cuda", dtype=torch.float32)
    alone = timed(lambda i: flush.fill_(i), LAYERS)
    for model, (heads, kv_heads, dim) in LAYOUTS.items():
        for max_len in LENGTHS:
            for rows in ROWS:
                width = max_len // BLOCK
                pool_rows = (rows * width + 1) * BLOCK
                pools = [
                    (
                        torch.randn(pool_rows, kv_heads, dim, device="cuda", dtype=torch.bfloat16),
                        torch.randn(pool_rows, kv_heads, dim, device="cuda", dtype=torch.bfloat16),
                    )
                    for _ in range(LAYERS)
                ]
                tables = torch.randperm(rows * width, device="cuda").view(rows, width) + 1
                lengths = torch.full((rows,), max_len * 3 // 4, device="cuda")
                position = lengths - 1
                at = tables[torch.arange(rows, device="cuda"), position // BLOCK]
                slots = at * BLOCK + position % BLOCK
                decode = DecodeTables(tables, lengths, BLOCK, max_len, slots)
                columns = torch.zeros(rows, 3, dtype=torch.long, device="cuda")
                given = DecodeTables(tables, lengths, BLOCK, max_len, slots, columns[:, 1], columns[:, 2])
                query = torch.randn(rows, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
                key = torch.randn(rows, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
                value = torch.randn_like(key)
                case = {"model": model, "rows": rows, "max_len": max_len}
                want = None
                runs = [
                    ("before", before),
                    ("stored apart", stored_apart),
                    ("mixed columns", mixed_columns(given)),
                ]
                runs += [("default", now(None))] + [(str(s), now(s)) for s in SETTINGS]
                for name, run in runs:
                    got = run(query, *pools[0], key, value, decode)
                    if want is None:
                        want = reference_decode(query, *pools[0], decode, 0.125)
                    error = (got.float() - want.float()).abs().max().item()

                    def layer(i: int, run=run) -> None:
                        flush.fill_(i)
                        run(query, *pools[i], key, value, decode)

                    us = (timed(layer, LAYERS) - alone) * 1e6
                    results.append({**case, "setting": name, "us": us, "max_error": error})
                mine = [r for r in results if r.items() >= case.items()]
                default = next(r for r in mine if r["setting"] == "default")
                old = next(r for r in mine if r["setting"] == "before")
                apart = next(r for r in mine if r["setting"] == "stored apart")
                given = next(r for r in mine if r["setting"] == "mixed columns")
                best = min(mine, key=lambda r: r["us"])
                print(
                    f"{model:11} rows {rows:3} len {max_len:5}: before {old['us']:6.2f} us, stored apart"
                    f" {apart['us']:6.2f}, default {default['us']:6.2f} (err {default['max_error']:.3f}),"
                    f" mixed columns {given['us']:6.2f}, best {best['us']:6.2f} {best['setting']}",
                    flush=True,
                )
                pools.clear()
                torch.cuda.empty_cache()
    save("decode_attention", results)
    spills()


def spills() -> None:
    """Registers and spills of each variant of the decode kernel compiled above (ptxas on this machine):
    a variant that spills to local memory pays for it on every tile."""
    from trickle.generation.kv import attention

    caches = getattr(attention._decode_kernel, "device_caches", {})
    for device, cache in caches.items():
        for key, kernel in cache[0].items():
            constants = getattr(getattr(kernel, "src", None), "constants", None) or str(key)[:160]
            print(
                f"decode kernel on {device}: {getattr(kernel, 'n_regs', '?')} registers,"
                f" {getattr(kernel, 'n_spills', '?')} spilled, {constants}",
                flush=True,
            )


if __name__ == "__main__":
    main()
