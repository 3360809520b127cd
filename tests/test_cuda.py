"""CUDA-only paths, skipped without a GPU: the step graphs (decode, sampling, prefill) over the paged
KV cache against stock transformers, with and without torch.compile, and the paged decode and prefill
kernels."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import FalconForCausalLM

from tests.conftest import make_engine
from tests.families import FAMILIES, build
from tests.test_engine import generate_all
from tests.test_families import SIBLINGS, assert_chunks_exact, assert_exact, reads_in_place
from tests.test_structured import texts
from trickle.generation import LoadedModel, SamplingParams, linear, load_model
from trickle.generation.kv.attention import (
    DecodeTables,
    PrefillTables,
    paged_decode,
    paged_prefill,
    reference_prefill,
    store_new,
)
from trickle.generation.runner.graphs import Part
from trickle.generation.sampler import (
    PLAIN,
    TOP_K,
    TOP_K_CANDIDATES,
    SamplingTensors,
    ranking_keys,
    sample_rows,
)
from trickle.generation.top_keys import largest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_tiny(model_dir: Path) -> LoadedModel:
    return load_model(str(model_dir), dtype="float32", device="cuda")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled graphs"])
async def test_graphs_match_generate_token_for_token(
    cuda_tiny: LoadedModel, model_dir: Path, compile: bool
) -> None:
    """Rows join running ones; decode batches are padded to their graph's size, and the padding rows
    must write only the null block."""
    stock = FalconForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().cuda()
    # Sized: by default the pool takes what GPU memory is left, and tests run several engines.
    engine = make_engine(cuda_tiny, max_batch_size=16, kv_cache_tokens=16 * 512, compile=compile)
    await generate_all(engine, stock, cuda_tiny)
    runner = engine.engine.runner
    assert runner.use_graphs and Part.DECODE in runner.graphs


# Families whose step cannot be captured at all, and decode exactly, eagerly: transformers' grouped-GEMM
# experts run torch._grouped_mm, which copies from the host for float32 weights (torch 2.11, seen on
# the H200).
UNCAPTURED = {"mixtral-sliding", "qwen2-moe", "qwen3-moe"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", list(FAMILIES))
async def test_every_family_is_exact_with_cuda_graphs(
    family: str, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model matrix on the GPU: masks, alibi and the model's own head inside captured graphs; the
    decoder layers compiled, where attention takes the paged kernels (and prefills past the cached
    prompts read the blocks in place), their linear layers in one-row steps by `generation.linear`'s
    kernel."""
    kernel_calls = []
    skinny = linear.skinny_linear
    monkeypatch.setattr(
        linear, "skinny_linear", lambda *args, **kwargs: kernel_calls.append(1) or skinny(*args, **kwargs)
    )
    model = build(family, len(tiny.tokenizer), tiny.tokenizer.eos_token_id).cuda()
    runner = (await assert_exact(model, tiny.tokenizer)).engine.engine.runner
    paged = reads_in_place(family, model)
    assert runner.kernel_reads == paged
    assert runner.use_graphs == (family not in UNCAPTURED)
    assert bool(runner.compiled.layers) == (paged and runner.use_graphs)
    assert (Part.PREFIX in runner.graphs) == (paged and runner.use_graphs)
    # the one-row decode graph was captured with the kernel in compiled layers with linear layers (not
    # GPT-2's Conv1D); uncompiled layers never run it
    linears = any(type(m) is torch.nn.Linear for layer in runner.compiled.layers for m in layer.modules())
    if runner.use_graphs:
        assert bool(kernel_calls) == linears
    if family in SIBLINGS and runner.compiled.layers:
        # the linear layers that read one input were fused before the KV plan (as on the CPU)
        for layer in runner.compiled.layers:
            names = {m: name for name, m in layer.named_modules()}
            fused = {}
            for m in layer.modules():
                if getattr(m, "fused_weight", None) is not None:
                    fused.setdefault(m.fused_weight.data_ptr(), []).append(names[m])
            assert sorted(fused.values()) == sorted(SIBLINGS[family])
    assert paged or not kernel_calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("out_features", "in_features"), [(4672, 4544), (37, 1030), (1, 64), (129, 3000)])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_the_one_row_linear_kernel_computes_what_f_linear_computes(
    dtype: torch.dtype, out_features: int, in_features: int, bias: bool
) -> None:
    """`trickle::linear` on one row runs the kernel and equals `F.linear` within its accumulation's
    rounding (shapes that are not multiples of its blocks among them); on more rows, a weight it cannot
    walk, or a CPU, it is `F.linear` exactly."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) / in_features**0.5
    b = torch.randn(out_features, device="cuda", dtype=dtype) if bias else None
    x = torch.randn(1, 1, in_features, device="cuda", dtype=dtype)
    assert linear.applies(x, weight)
    got = torch.ops.trickle.linear(x, weight, b)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.shape == (1, 1, out_features) and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)
    rows = torch.randn(2, in_features, device="cuda", dtype=dtype)
    strided = torch.randn(out_features, 2 * in_features, device="cuda", dtype=dtype)[:, ::2]
    for args in ((rows, weight, b), (x, strided, b), (x.cpu(), weight.cpu(), None if b is None else b.cpu())):
        assert not linear.applies(args[0], args[1])
        assert torch.equal(torch.ops.trickle.linear(*args), F.linear(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "silu", "relu"])
def test_the_kernels_epilogue_computes_what_the_operators_after_the_product_compute(
    dtype: torch.dtype, act: str
) -> None:
    """`trickle::linear_epilogue` on one row: the kernel's product, then the activation over a column
    range and two addends, equal what torch's operators give applied to the kernel's own product (the
    additions to the bit, the activations within the type's rounding); and gated, `act(gate) * up` of
    two column ranges."""
    torch.manual_seed(0)
    out_features, in_features = 4672 + 2 * 4544 + 3, 4544
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) / in_features**0.5
    bias = torch.randn(out_features, device="cuda", dtype=dtype)
    x = torch.randn(1, 1, in_features, device="cuda", dtype=dtype)
    a, b = (torch.randn(1, 1, out_features, device="cuda", dtype=dtype) for _ in range(2))
    product = torch.ops.trickle.linear(x, weight, bias)
    start, stop = 4672, out_features - 3
    function = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[act]
    eps = torch.finfo(dtype).eps
    # float32: no rounding to a narrower type separates the kernel's multiply from its add, so the two may
    # fuse (one rounding where torch rounds twice); erf and exp may differ from torch's in the last place
    atol = 2 * eps if dtype == torch.float32 else eps / 16
    got = torch.ops.trickle.linear_epilogue(x, weight, bias, act, start, stop, -1, [])
    assert torch.equal(got[..., :start], product[..., :start])
    assert torch.equal(got[..., stop:], product[..., stop:])
    torch.testing.assert_close(
        got[..., start:stop], function(product[..., start:stop]), rtol=2 * eps, atol=atol
    )
    added = torch.ops.trickle.linear_epilogue(x, weight, bias, "", 0, 0, -1, [a, b])
    assert torch.equal(added, (product + a) + b)
    width = 4544
    gated = torch.ops.trickle.linear_epilogue(x, weight, bias, act, start, start + width, 3, [a[..., :width]])
    gate, up = product[..., start : start + width], product[..., 3 : 3 + width]
    activated = function(gate) * up
    want = activated + a[..., :width]
    # Where the sum nearly cancels, its error is relative to its terms, not to itself: a few units in the
    # last place of the activation (erf and exp), one of the product (float32 may fuse it into the add)
    # and one of the sum, each of a term at most. So is the bound.
    bound = 8 * eps * (activated.abs() + a[..., :width].abs()) + atol
    assert ((gated.double() - want.double()).abs() <= bound).all()


def test_a_product_run_aside_is_joined_exactly_eagerly_and_in_a_captured_graph() -> None:
    """`linear_aside` starts the kernel on a side stream and returns at once; small kernels queued after
    it run beside it; `linear_epilogue(..., joins=True)` waits for it before adding it. Eagerly and
    replayed from a CUDA graph (the side stream forks from the capture and joins it again), the result
    is the kernel's products added as torch adds them, with the side stream's input freed early (its
    memory not reused while the side stream reads it)."""
    torch.manual_seed(0)
    hidden, up = 4544, 18176
    both = torch.randn(1, 1, 4672 + up, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(hidden, up, device="cuda", dtype=torch.bfloat16) / up**0.5
    dense = torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    residual = torch.randn(1, 1, hidden, device="cuda", dtype=torch.bfloat16)

    def layer(source: torch.Tensor) -> torch.Tensor:
        fresh = source * 1  # freed after the aside reads it
        mlp = torch.ops.trickle.linear_aside(fresh[..., 4672:], down, None)
        del fresh
        attended = source[..., :hidden]
        for _ in range(8):  # stand-ins for attention, allocating as they go
            attended = torch.tanh(attended) * 1.5
        return torch.ops.trickle.linear_epilogue(attended, dense, None, "", 0, 0, -1, [mlp, residual], True)

    attended = both[..., :hidden]
    for _ in range(8):
        attended = torch.tanh(attended) * 1.5
    want = (
        torch.ops.trickle.linear(attended, dense, None)
        + torch.ops.trickle.linear(both[..., 4672:], down, None)
    ) + residual
    assert torch.equal(layer(both), want)
    source = both.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(source)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(source)
    for _ in range(3):
        source.copy_(torch.randn_like(source))
        graph.replay()
        attended = source[..., :hidden]
        for _ in range(8):
            attended = torch.tanh(attended) * 1.5
        product = torch.ops.trickle.linear(source[..., 4672:], down, None)
        assert torch.equal(out, (torch.ops.trickle.linear(attended, dense, None) + product) + residual)
    # a product the kernel does not take (a strided weight) is computed in place, and the join still
    # finds a fork to wait for in the capture
    strided = torch.randn(up, hidden, device="cuda", dtype=torch.bfloat16).t()
    assert not linear.applies(both[..., 4672:], strided)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mlp = torch.ops.trickle.linear_aside(source[..., 4672:], strided, None)
        joined = torch.ops.trickle.linear_epilogue(
            source[..., :hidden], dense, None, "", 0, 0, -1, [mlp], True
        )
    graph.replay()
    first = torch.ops.trickle.linear(source[..., :hidden], dense, None)
    assert torch.equal(joined, first + F.linear(source[..., 4672:], strided))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["llama", "mistral-sliding", "falcon-mqa", "falcon-alibi"])
async def test_a_long_prompt_prefilled_in_chunks_through_the_graphs_is_exact(
    family: str, tiny: LoadedModel
) -> None:
    """Chunks of a prompt joining a decoding row, exact against generate(): mixed into the decoding
    row's captured forward where the model's attention takes the paged kernels (a chunk whose reads
    pass the mixed read limit, and every chunk of a model that gathers its blocks, through the prefill
    graphs: the first from position 0, the next past the cached ones)."""
    model = build(family, len(tiny.tokenizer), tiny.tokenizer.eos_token_id).cuda()
    runner = (await assert_chunks_exact(model, tiny.tokenizer)).engine.engine.runner
    assert runner.use_graphs and Part.PREFILL in runner.graphs


@pytest.mark.timeout(600)
async def test_rows_that_follow_grammars_sample_through_the_masked_graphs(tiny: LoadedModel) -> None:
    """Constrained rows beside a free one, captured: each constrained text is in its language, the free
    row writes what it writes alone, and the masked sampling ran from its graphs (not eagerly)."""
    model = build("llama", len(tiny.tokenizer), tiny.tokenizer.eos_token_id).cuda()
    loaded = LoadedModel(model, tiny.tokenizer, "random-llama", torch.device("cuda"), torch.float32)
    engine = make_engine(loaded, max_batch_size=16, kv_cache_tokens=16 * 512)
    runner = engine.engine.runner
    replayed: list[Part] = []
    get = runner.graphs.get

    def recording(part: Part, *shape: int) -> Any:
        replayed.append(part)
        return get(part, *shape)

    await engine.start()
    runner.graphs.get = recording  # type: ignore[method-assign]
    free = SamplingParams(temperature=1.0, seed=7, max_new_tokens=40)
    pattern = "[a-z]{3}-[0-9]{2,4}"
    shaped = SamplingParams(
        temperature=1.0, max_new_tokens=40, response_format={"type": "regex", "pattern": pattern}
    )
    try:
        (alone,) = await texts(engine, "The baker", [free])
        mixed = await texts(
            engine, "The baker", [shaped.model_copy(update={"seed": s}) for s in range(6)] + [free]
        )
    finally:
        await engine.stop()
    *constrained, beside = mixed
    assert beside == alone
    assert all(re.fullmatch(pattern, text) and finish == "eos" for text, finish in constrained)
    assert Part.MASKED in replayed and runner.use_graphs


@pytest.mark.parametrize(
    "launch",
    [None, {"chunk": 128, "tile": 64}, {"chunk": 16, "chunk_keys": 1 << 40, "tile": 128}],
    ids=["default", "whole groups, narrow tiles", "chunked groups, wide tiles"],
)
@pytest.mark.parametrize("rows", [5, 200], ids=["split keys", "one program a row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "window", "softcap"),
    [
        (8, 8, None, None),
        (8, 2, None, None),
        (71, 1, None, None),
        (8, 2, 24, None),
        (8, 2, 1, None),
        (4, 4, None, 30.0),
    ],
    ids=["mha", "gqa", "mqa", "sliding", "window of one", "softcap"],
)
@pytest.mark.parametrize("new", [False, True], ids=["pooled", "newest given"])
def test_the_paged_decode_kernel_reads_what_a_gathered_cache_holds(
    rows: int,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    window: int | None,
    softcap: float | None,
    launch: dict[str, int] | None,
    new: bool,
) -> None:
    """Rows of different lengths with their blocks scattered over the pool: the kernel's attention
    equals attention over each row's positions gathered in order (few rows split their keys over
    several programs; a large group's query heads are spread over programs of 16). Given the step's
    keys and values (`new`), it reads each row's newest position from them, not the pools (which hold
    something else there), and writes them to the pools' rows of that position."""
    torch.manual_seed(0)
    block, dim = 16, 64
    lengths = torch.tensor([1, 17, 64, 100, 300] * (rows // 5), device="cuda")
    width = 32
    pool_blocks = rows * width + 1
    keys = torch.randn(pool_blocks * block, kv_heads, dim, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    tables = torch.randperm(pool_blocks - 1, device="cuda")[: rows * width].view(rows, width) + 1
    query = torch.randn(rows, heads, 1, dim, device="cuda", dtype=dtype)
    newest = lengths - 1
    slots = tables[torch.arange(rows, device="cuda"), newest // block] * block + newest % block
    decode = DecodeTables(tables, lengths, block, max_len=512, slots=slots)
    step = None
    if new:
        step = (keys[slots].clone(), values[slots].clone())
        keys[slots], values[slots] = torch.randn_like(step[0]), torch.randn_like(step[1])
    got = paged_decode(query, keys, values, decode, dim**-0.5, window, softcap, launch, new=step)[:, 0]
    if step is not None:
        assert torch.equal(keys[slots], step[0]) and torch.equal(values[slots], step[1])
    assert_attends_gathered(got, query, keys, values, tables, lengths, window, softcap)


def assert_attends_gathered(
    got: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    window: int | None,
    softcap: float | None,
) -> None:
    """Each row of `got` ([B, H, D]) is its query's attention over its positions 0..length-1 gathered
    in order from the pools through its table row."""
    block, (heads, dim), kv_heads = 16, query.shape[1::2], keys.shape[1]
    for row, length in enumerate(lengths.tolist()):
        positions = torch.arange(length, device="cuda")
        slots = tables[row, positions // block] * block + positions % block
        k = keys[slots].float().repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        v = values[slots].float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", query[row, :, 0].float(), k) * dim**-0.5
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if window:
            scores[:, : max(0, length - window)] = float("-inf")
        want = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)
        tolerance = 1e-4 if query.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[row].float(), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("launch", [None, {"programs": 1}], ids=["split keys", "one program a row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "window", "softcap"),
    [(8, 2, None, None), (71, 1, None, None), (8, 2, 24, None), (8, 2, 3, None), (4, 4, None, 30.0)],
    ids=["gqa", "mqa", "sliding", "window of three", "softcap"],
)
def test_the_paged_decode_kernel_reads_a_steps_earlier_positions_from_the_step(
    launch: dict[str, int] | None,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    window: int | None,
    softcap: float | None,
) -> None:
    """A step that carries several positions of one sequence (newcomers' tokens mixed among decoding
    rows, as `StepInputs` lays them out: each newcomer's last in its row, the others after the rows):
    each entry attends to its sequence's earlier positions of the step in the step's keys, which other
    programs of the same launch store (the pools hold something else there), and the pools end up
    holding every entry's key and value."""
    torch.manual_seed(0)
    block, dim, width = 16, 64, 32
    # Each sequence: positions cached before the step, positions the step adds.
    sequences = [(16, 1), (40, 1), (0, 5), (16, 20), (33, 3), (0, 1), (300, 1), (100, 40)]
    rows = len(sequences)
    entries: list[tuple[int, int]] = []  # (sequence, position)
    earlier, first = [], []
    extras: list[tuple[int, int, int, int]] = []
    for index, (cached, new) in enumerate(sequences):
        start = rows + len(extras)
        extras += [(index, cached + k, k, start) for k in range(new - 1)]
        entries.append((index, cached + new - 1))
        earlier.append(new - 1)
        first.append(start)
    entries += [(index, position) for index, position, _, _ in extras]
    earlier += [k for _, _, k, _ in extras]
    first += [start for _, _, _, start in extras]
    pool_blocks = rows * width + 1
    keys = torch.randn(pool_blocks * block, kv_heads, dim, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    sequence_tables = torch.randperm(pool_blocks - 1, device="cuda")[: rows * width].view(rows, width) + 1
    owner = torch.tensor([index for index, _ in entries], device="cuda")
    positions = torch.tensor([position for _, position in entries], device="cuda")
    tables = sequence_tables[owner]
    slots = tables[torch.arange(len(entries), device="cuda"), positions // block] * block + positions % block
    new_keys = torch.randn(len(entries), kv_heads, dim, device="cuda", dtype=dtype)
    step = (new_keys, torch.randn_like(new_keys))
    query = torch.randn(len(entries), heads, 1, dim, device="cuda", dtype=dtype)
    lengths = positions + 1
    # Columns of one table, as the runner's step inputs hold them: strided.
    fresh, fresh_from = torch.tensor([earlier, first], device="cuda").T.contiguous().unbind(1)
    decode = DecodeTables(tables, lengths, block, 512, slots, fresh=fresh, fresh_from=fresh_from)
    got = paged_decode(query, keys, values, decode, dim**-0.5, window, softcap, launch, new=step)[:, 0]
    assert torch.equal(keys[slots], step[0]) and torch.equal(values[slots], step[1])
    assert_attends_gathered(got, query, keys, values, tables, lengths, window, softcap)


@pytest.mark.parametrize("mode", [PLAIN, TOP_K])
def test_the_compiled_sampler_draws_what_the_eager_one_draws_from_a_large_vocabulary(mode: str) -> None:
    """Falcon's 65,024 tokens: inductor compiles the sampler as the runner does (its argmax in chunks,
    the token ids read from the runner's tensor), and every row of every step draws the eager token."""
    torch.manual_seed(0)
    rows, vocab = 4, 65024
    logits = torch.randn(rows, vocab, device="cuda") * 4

    def full(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, device="cuda", dtype=dtype)

    ones, zeros = full(1, 1, 1, 1), full(0, 0, 0, 0)
    top_k = full(0, 0, 0, 0, dtype=torch.long) if mode == PLAIN else full(0, 50, 10, 64, dtype=torch.long)
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device="cuda")
    counts = torch.zeros(rows, vocab, dtype=torch.int32, device="cuda")
    eos = torch.zeros(vocab, dtype=torch.bool, device="cuda")
    token_ids = torch.arange(vocab, device="cuda")
    compiled = torch.compile(sample_rows, dynamic=True)
    for step in range(5):
        params = SamplingTensors(
            temperature=full(0.0, 0.7, 1.0, 1.5),
            top_p=full(1.0, 1.0, 0.9, 1.0),
            top_k=top_k,
            penalty=ones,
            frequency=zeros,
            presence=zeros,
            seeds=full(1, 2, 3, 4, dtype=torch.long),
            steps=full(step, step, step, step, dtype=torch.long),
            ban_eos=torch.zeros(rows, dtype=torch.bool, device="cuda"),
        )
        args = (logits, params, seen, counts, eos, mode)
        want = sample_rows(*args, token_ids=token_ids)
        assert torch.equal(compiled(*args, token_ids=token_ids), want)
        assert want[0] == logits[0].argmax()


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("vocab", [70, 1024, 3 * 1024 + 5, 32000, 65024, 128256])
def test_the_candidates_kernels_pick_what_topk_picks(rows: int, vocab: int) -> None:
    """TOP_K's candidates by the chunk-sorting kernels: the tokens of each row's largest ranking keys,
    largest first, as torch's top-k over whole rows ranks them, with ties in the logits (ranked by token
    id) and masked tokens (-inf) about."""
    generator = torch.Generator(device="cuda").manual_seed(vocab + rows)
    logits = (torch.randn(rows, vocab, device="cuda", generator=generator) * 8).round() / 4
    logits[:, ::7] = float("-inf")
    keys = ranking_keys(logits)
    count = min(TOP_K_CANDIDATES, vocab)
    got = largest(keys, count)
    assert torch.equal(got, keys.topk(count, dim=-1).indices)
    assert torch.equal(got, logits.sort(dim=-1, descending=True, stable=True).indices[:, :count])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("kv_heads", "dim"), [(1, 64), (8, 128), (3, 80)])
def test_the_store_kernel_writes_each_rows_new_keys_to_its_pool_row(
    dtype: torch.dtype, kv_heads: int, dim: int
) -> None:
    """A decode step's new keys and values, as the cache hands them over (a view of [B, KV, 1, D]),
    land in their pool rows and nowhere else."""
    torch.manual_seed(0)
    rows, pool_rows = 37, 300
    keys = torch.randn(pool_rows, kv_heads, dim, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    want_keys, want_values = keys.clone(), values.clone()
    states = torch.randn(rows, 1, kv_heads, dim, device="cuda", dtype=dtype).transpose(1, 2)
    key, value = states[:, :, 0], (states * 2)[:, :, 0]
    slots = torch.randperm(pool_rows, device="cuda")[:rows]
    want_keys[slots], want_values[slots] = key, value
    store_new(keys, values, key, value, slots)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "window", "softcap"),
    [
        (8, 8, 64, None, None),
        (8, 2, 128, None, None),
        (71, 1, 64, None, None),
        (8, 2, 64, 24, None),
        (4, 4, 256, None, 30.0),
    ],
    ids=["mha", "gqa", "mqa", "sliding", "softcap-256"],
)
def test_the_paged_prefill_kernel_reads_what_its_reference_reads(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, window: int | None, softcap: float | None
) -> None:
    """Rows that found 0 to 250 positions cached prefill up to 40 new ones each (shorter rows padded),
    their blocks scattered over the pool: each real query's attention equals the plain-torch
    reference's (the one the CPU tests hold to generate())."""
    torch.manual_seed(0)
    block, width, new = 16, 24, 40
    starts = torch.tensor([0, 16, 37, 100, 250, 3], device="cuda")
    real = torch.tensor([40, 1, 23, 40, 17, 9], device="cuda")
    rows = starts.shape[0]
    pool_blocks = rows * width + 1
    keys = torch.randn(pool_blocks * block, kv_heads, dim, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    tables = torch.randperm(pool_blocks - 1, device="cuda")[: rows * width].view(rows, width) + 1
    query = torch.randn(rows, heads, new, dim, device="cuda", dtype=dtype)
    prefill = PrefillTables(tables, starts, starts + real, block)
    got = paged_prefill(query, keys, values, prefill, dim**-0.5, window, softcap)
    want = reference_prefill(query, keys, values, prefill, dim**-0.5, window, softcap)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for row, count in enumerate(real.tolist()):
        torch.testing.assert_close(
            got[row, :count].float(), want[row, :count].float(), rtol=tolerance, atol=tolerance
        )
