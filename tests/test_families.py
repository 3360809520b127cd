"""The model matrix: every family greedy-decodes exactly what `generate()` does, alone and with rows
joining a running batch at different steps; its streamed text is the tokenizer's decoding of its ids; and
the logits it samples its first token from are the model's own."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tests.conftest import record_prefills
from tests.families import FAMILIES, WINDOW, assert_scores, build, build_from, model_logprobs, reference
from trickle.config import Settings
from trickle.generation import (
    AsyncEngine,
    EngineConfig,
    LoadedModel,
    ModelRunError,
    RequestOutput,
    SamplingParams,
    linear,
)
from trickle.generation.kv import attention as paged_attention
from trickle.generation.models import adapt, decoder_layers
from trickle.generation.runner.compiled import compile_layers, restore_layers
from trickle.server import create_app

# Prompts of different lengths, the longest several sliding windows long.
PROMPTS = [
    "The oven warms and the dough rests; the baker waits by the window and sings of bread. " * 2,
    "a",
    "Bread and water, 日本語 and café",
    "On the square, the old men sit and talk about the weather",
]
NEW_TOKENS = [24, 9, 17, 30]


@pytest.fixture(scope="session")
def models() -> dict[str, PreTrainedModel]:
    return {}


def model_of(family: str, models: dict[str, PreTrainedModel], tokenizer: PreTrainedTokenizerFast) -> Any:
    if family not in models:
        models[family] = build(family, len(tokenizer), tokenizer.eos_token_id)
    return models[family]


class Recorded:
    """An engine whose generated ids and first-token logits the test can read, by request label."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, config: EngineConfig | None = None
    ) -> None:
        config = config or EngineConfig(
            max_batch_size=4, max_seq_len=256, prefill_token_budget=4096, kv_cache_tokens=1024
        )
        self.engine = AsyncEngine(model, tokenizer, config)
        self.ids: dict[str, list[int]] = {}
        self.logits: list[torch.Tensor] = []
        append, head = self.engine.engine._append, self.engine.engine.runner.head

        def recording_append(seq: Any, token: int, now: float) -> str:
            self.ids.setdefault(seq.label, []).append(token)
            return append(seq, token, now)

        def recording_head(hidden: torch.Tensor) -> torch.Tensor:
            logits = head(hidden)
            self.logits.append(logits.clone())
            return logits

        self.engine.engine._append = recording_append  # type: ignore[method-assign]
        self.engine.engine.runner.head = recording_head  # type: ignore[assignment]
        prefills = record_prefills(self.engine)
        # requests prefilled a chunk a step, in the decoding rows' forward, and apart from it
        self.chunked, self.mixed, self.apart = prefills.chunked, prefills.mixed, prefills.apart

    async def run(
        self, label: str, ids: list[int], new_tokens: int, min_new_tokens: int = 0
    ) -> list[RequestOutput]:
        params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=min_new_tokens)
        return [out async for out in self.engine.generate(ids, params, label=label)]


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_greedy_output_is_generates_alone_and_joining_a_running_batch(
    family: str, in_place: bool, models: dict[str, PreTrainedModel], tiny: LoadedModel
) -> None:
    """Rows joining decoding rows prefill inside their forward (gathered, or read in place as a GPU
    runs it)."""
    await assert_exact(model_of(family, models, tiny.tokenizer), tiny.tokenizer)


async def assert_exact(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, config: EngineConfig | None = None
) -> Recorded:
    """Greedy ids equal generate()'s, alone and joining a running batch, and the text is their decoding
    (on the model's device: the CUDA tests run it with graphs)."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len(prompts[0]) > 3 * WINDOW
    expected = [
        reference(model, ids, n, tokenizer.eos_token_id) for ids, n in zip(prompts, NEW_TOKENS, strict=True)
    ]
    recorded = Recorded(model, tokenizer, config)
    engine = recorded.engine
    await engine.start()
    try:
        alone = [
            await recorded.run(f"alone{i}", ids, n)
            for i, (ids, n) in enumerate(zip(prompts, NEW_TOKENS, strict=True))
        ]
        tasks = []
        for i, (ids, n) in enumerate(zip(prompts, NEW_TOKENS, strict=True)):
            tasks.append(asyncio.create_task(recorded.run(f"batched{i}", ids, n)))
            # The next request comes once this one is generating: rows join at different steps.
            await engine.wait_until(lambda e, label=f"batched{i}": bool(recorded.ids.get(label)))
        batched = await asyncio.gather(*tasks)
    finally:
        await engine.stop()
    if engine.engine.runner.mixed_tokens:
        # Each later request joined rows that were decoding: its prompt ran in their forward.
        assert recorded.mixed == {f"batched{i}" for i in range(1, len(prompts))}
    for i, want in enumerate(expected):
        for kind, outputs in (("alone", alone[i]), ("batched", batched[i])):
            assert recorded.ids[f"{kind}{i}"] == want, f"{kind} request {i}: ids"
            text = "".join(out.text for out in outputs)
            assert text == tokenizer.decode(want, skip_special_tokens=True), f"{kind} request {i}: text"
    return recorded


@pytest.fixture(params=[False, True], ids=["gathered", "in place"])
def in_place(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Prefills past cached blocks read them gathered, or in place through the paged kernels' reference
    as a GPU runs them."""
    if request.param:
        monkeypatch.setattr(paged_attention, "available", lambda device: True)
    return bool(request.param)


@pytest.mark.parametrize(
    "family", ["llama", "mistral-sliding", "gemma2", "falcon-mqa", "falcon-alibi", "mpt-alibi", "gpt2"]
)
async def test_long_prompts_joining_a_running_batch_are_prefilled_in_exact_chunks(
    family: str, in_place: bool, models: dict[str, PreTrainedModel], tiny: LoadedModel
) -> None:
    """A prefill budget of 16 (one block): the 71-token prompt, joining a decoding row, goes in one-block
    chunks, each read back from the prefix cache by the next (gathered, or in place as a GPU runs it);
    both requests give generate()'s ids, sliding windows, softcaps and alibi included."""
    await assert_chunks_exact(model_of(family, models, tiny.tokenizer), tiny.tokenizer)


async def assert_chunks_exact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> Recorded:
    """The 71-token prompt joins a decoding row under a 16-token budget: chunked, and both exact (on
    the model's device: the CUDA tests run it with graphs)."""
    config = EngineConfig(max_batch_size=4, max_seq_len=256, prefill_token_budget=16, kv_cache_tokens=1024)
    recorded = Recorded(model, tokenizer, config)
    short, long = tokenizer.encode(PROMPTS[1]), tokenizer.encode(PROMPTS[0])
    await recorded.engine.start()
    try:
        running = asyncio.create_task(recorded.run("short", short, 40, min_new_tokens=40))
        await recorded.engine.wait_until(lambda e: bool(recorded.ids.get("short")))
        await recorded.run("long", long, 12)
        await running
    finally:
        await recorded.engine.stop()
    assert recorded.chunked == {"long"}
    assert recorded.ids["long"] == reference(model, long, 12, tokenizer.eos_token_id)
    assert recorded.ids["short"] == reference(model, short, 40, tokenizer.eos_token_id, min_new_tokens=40)
    runner = recorded.engine.engine.runner
    if runner.mixed_tokens:  # chunks ran in the decoding row's forward
        assert "long" in recorded.mixed and "short" in recorded.apart
        if runner.mixed_read_limit is None:  # all of them (on a GPU, later chunks read past the limit)
            assert (recorded.mixed, recorded.apart) == ({"long"}, {"short"})
    return recorded


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_rows_preempted_for_lack_of_kv_blocks_resume_exactly(
    family: str, models: dict[str, PreTrainedModel], tiny: LoadedModel
) -> None:
    """A pool of 6 blocks of 16 positions for requests that need 18 together, none ending early: the
    newest rows give their blocks back, wait, prefill what they had again and go on, token for token."""
    await assert_resumes_exactly(model_of(family, models, tiny.tokenizer), tiny)


@pytest.mark.parametrize("family", ["llama", "mistral-sliding", "gemma2", "falcon-mqa", "falcon-40b-layout"])
async def test_preempted_rows_resume_exactly_reading_their_cached_blocks_in_place(
    family: str, models: dict[str, PreTrainedModel], tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a GPU runs it: a resumed row prefills past the blocks it left in the prefix cache through the
    paged prefill (its reference here), sliding windows and softcaps included."""
    monkeypatch.setattr(paged_attention, "available", lambda device: True)
    await assert_resumes_exactly(model_of(family, models, tiny.tokenizer), tiny)


@pytest.mark.parametrize("family", ["llama", "gemma2", "falcon-mqa"])
async def test_a_prompt_cached_but_for_its_last_token_prefills_that_token_alone(
    family: str, in_place: bool, models: dict[str, PreTrainedModel], tiny: LoadedModel
) -> None:
    """Two full blocks and one token: asked again, the prompt finds both blocks cached and prefills a
    single token past them (a decode-shaped prefill), and gives generate()'s ids."""
    tokenizer = tiny.tokenizer
    model = model_of(family, models, tokenizer)
    ids = (tokenizer.encode(PROMPTS[0]) * 2)[:33]
    want = reference(model, ids, 8, tokenizer.eos_token_id)
    recorded = Recorded(model, tokenizer)
    await recorded.engine.start()
    try:
        await recorded.run("first", ids, 8)
        outputs = await recorded.run("again", ids, 8)
    finally:
        await recorded.engine.stop()
    assert outputs[-1].usage["cached_tokens"] == 32
    assert recorded.ids["first"] == recorded.ids["again"] == want


async def assert_resumes_exactly(model: PreTrainedModel, tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    # The short prompts first: they run together and outgrow the pool; the long one waits for room.
    prompts = [tokenizer.encode(PROMPTS[i]) for i in (1, 2, 3, 0)]
    new_tokens = [40, 40, 40, 24]
    expected = [
        reference(model, ids, n, tokenizer.eos_token_id, min_new_tokens=n)
        for ids, n in zip(prompts, new_tokens, strict=True)
    ]
    config = EngineConfig(max_batch_size=4, max_seq_len=96, prefill_token_budget=4096, kv_cache_tokens=96)
    recorded = Recorded(model, tokenizer, config)
    await recorded.engine.start()
    try:
        outputs = await asyncio.gather(
            *(
                recorded.run(f"r{i}", ids, n, min_new_tokens=n)
                for i, (ids, n) in enumerate(zip(prompts, new_tokens, strict=True))
            )
        )
    finally:
        await recorded.engine.stop()
    assert recorded.engine.engine.scheduler.preemptions > 0
    for i, want in enumerate(expected):
        assert recorded.ids[f"r{i}"] == want, f"request {i}: ids"
        text = "".join(out.text for out in outputs[i])
        assert text == tokenizer.decode(want, skip_special_tokens=True), f"request {i}: text"


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_the_first_tokens_logits_are_the_models_own(
    family: str, models: dict[str, PreTrainedModel], tiny: LoadedModel
) -> None:
    tokenizer = tiny.tokenizer
    model = model_of(family, models, tokenizer)
    recorded = Recorded(model, tokenizer)
    await recorded.engine.start()
    try:
        for i, prompt in enumerate(PROMPTS[:2]):
            recorded.logits.clear()
            ids = tokenizer.encode(prompt)
            await recorded.run(f"r{i}", ids, 1)
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[:, -1]
            got = recorded.logits[0][:1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        await recorded.engine.stop()


async def test_a_request_past_the_models_position_limit_is_422_and_a_bystander_is_served(
    aiohttp_client: Any, models: dict[str, PreTrainedModel], tiny: LoadedModel
) -> None:
    tokenizer = tiny.tokenizer
    gpt2 = model_of("gpt2", models, tokenizer)
    limit = gpt2.config.n_positions
    engine = AsyncEngine(gpt2, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=4 * limit))
    assert engine.config.max_seq_len == limit
    client = await aiohttp_client(create_app(Settings(model="test"), engine))
    bystander = asyncio.create_task(
        client.post("/predict", json={"prompt": "The baker", "max_new_tokens": 60, "min_new_tokens": 60})
    )
    prompt = "bread "
    while len(tokenizer.encode(prompt + "bread ")) < limit - 9:  # just under the limit
        prompt += "bread "
    prompt_tokens = len(tokenizer.encode(prompt))
    refused = await client.post("/stream", json={"prompt": prompt, "max_new_tokens": 24, "cutoff_len": limit})
    assert refused.status == 422
    assert (await refused.json())["error"]["field"] == "max_new_tokens"
    served = await bystander
    assert served.status == 200 and (await served.json())["usage"]["completion_tokens"] == 60
    fits = {"prompt": prompt, "max_new_tokens": limit - prompt_tokens, "cutoff_len": limit}
    assert (await client.post("/predict", json=fits)).status == 200


async def test_the_falcon_40b_layout_keeps_only_its_key_value_heads_in_the_cache(
    models: dict[str, PreTrainedModel], tiny: LoadedModel
) -> None:
    model = model_of("falcon-40b-layout", models, tiny.tokenizer)
    assert (model.config.num_attention_heads, model.config.num_kv_heads) == (8, 2)
    recorded = Recorded(model, tiny.tokenizer)
    await recorded.engine.start()
    try:
        await recorded.run("r", tiny.tokenizer.encode("The baker"), 4)
    finally:
        await recorded.engine.stop()
    keys, values = recorded.engine.engine.runner.cache.pools(0)
    assert keys.shape[1] == values.shape[1] == 2


async def test_ready_comes_only_after_a_real_forward_and_a_model_that_cannot_run_never_starts(
    models: dict[str, PreTrainedModel], tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_of("llama", models, tiny.tokenizer)
    forwards: list[int] = []
    hook = model.base_model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    engine = AsyncEngine(model, tiny.tokenizer, EngineConfig(max_batch_size=2, max_seq_len=64))
    try:
        await engine.start()
        assert forwards and engine.unavailable is None
        await engine.stop()

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("this model cannot run here")

        broken_engine = AsyncEngine(model, tiny.tokenizer, EngineConfig(max_batch_size=2, max_seq_len=64))
        monkeypatch.setattr(model.base_model, "forward", broken)
        with pytest.raises(ModelRunError, match="cannot run here"):
            await broken_engine.start()
        assert broken_engine.unavailable == "the model is not ready"
    finally:
        hook.remove()


ALIBI = {"bloom-alibi", "mpt-alibi", "falcon-alibi"}


def reads_in_place(family: str, model: PreTrainedModel) -> bool:
    """Whether the family's attention takes the paged kernels: not with alibi positions, and only where
    its attention goes through transformers' attention interface (`_supports_attention_backend`: not
    StableLM's, nor GPT-J's before transformers 5.2x) or is Falcon's, which the engine adapts."""
    if family in ALIBI:
        return False
    return family.startswith("falcon") or bool(getattr(model, "_supports_attention_backend", False))


@pytest.mark.parametrize("family", ["mistral-sliding", "gemma2"])
def test_a_model_switched_to_paged_attention_still_masks_its_own_forward(
    family: str, tiny: LoadedModel
) -> None:
    """Called directly (not by the engine, which hands it masks), a model the engine switched to the paged
    attention gets the masks its own implementation makes: its sliding window holds."""
    tokenizer = tiny.tokenizer
    model = build(family, len(tokenizer), tokenizer.eos_token_id)
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    assert ids.shape[1] > 3 * WINDOW
    with torch.no_grad():
        before = model(ids).logits
        assert paged_attention.install(model)
        after = model(ids).logits
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_the_paged_attention_operators_are_exact_for_every_family(
    family: str, models: dict[str, PreTrainedModel], tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a GPU runs: each layer's decode attention is `decode_layer`, which stores the new keys and
    reads the blocks in place, and a prefill past a cached prefix (the batched requests find their
    prompts cached) reads them in place too (`prefill_layer`); here the plain-torch references stand
    in for the Triton kernels."""
    monkeypatch.setattr(paged_attention, "available", lambda device: True)
    prefills: list[int] = []
    reference_prefill = paged_attention.reference_prefill

    def counted(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        prefills.append(query.shape[2])
        return reference_prefill(query, *args, **kwargs)

    monkeypatch.setattr(paged_attention, "reference_prefill", counted)
    model = model_of(family, models, tiny.tokenizer)
    recorded = await assert_exact(model, tiny.tokenizer)
    paged = reads_in_place(family, model)
    assert recorded.engine.engine.runner.kernel_reads == paged
    assert bool(prefills) == paged, "prefills past the cached prompts read the blocks in place"


# The linear layers of a decoder layer that read one input, by family (GPT-2's are Conv1D).
SIBLINGS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]],
    "gemma2": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
    ],
    # parallel attention: the query/key/value and the MLP's up projection read the same normed input
    "falcon-mqa": [["self_attention.query_key_value", "mlp.dense_h_to_4h"]],
    "gpt2": [],
}
# What the compiled layers of batch 1 fold into their linear layers' kernels (`linear.fuse_epilogues`),
# in order: each product's activation, whether it is gated, and how many tensors are added to it.
# Gemma2's activation is gelu's tanh approximation, and its norms come between products and residuals.
EPILOGUES = {
    # (activation, gated, addends, joins a product run aside)
    # o_proj + residual; silu(gate) * up; down + residual
    "llama": [("", False, 1, False), ("silu", True, 0, False), ("", False, 1, False)],
    "gemma2": [],
    # gelu of the MLP up projection; the attention's output projection + the MLP's down projection (run
    # beside the attention) + residual
    "falcon-mqa": [("gelu", False, 0, False), ("", False, 2, True)],
    "gpt2": [],
}


@pytest.mark.parametrize("family", list(SIBLINGS))
async def test_compiled_layers_compile_once_for_all_layers_and_stay_exact(
    family: str, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder layers compile as one function a class (torch.compile's tracing for real, with its
    plain `eager` backend, as the CPU has no CUDA graphs): six layers make no more graphs than the
    shapes and layer kinds they run (batch 1 and more; gemma2's sliding and global layers), and the
    output stays exact. The linear layers that read one input are found and fused, and each compiled
    graph computes a group's product once."""
    monkeypatch.setattr(paged_attention, "available", lambda device: True)
    tokenizer = tiny.tokenizer
    config = FAMILIES[family](len(tokenizer))
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(config, name):
            setattr(config, name, 6)
    if family == "gemma2":
        config.layer_types = ["sliding_attention", "full_attention"] * 3
    model = build_from(config, tokenizer.eos_token_id)
    layers = decoder_layers(model.base_model)
    assert len(layers) == 6
    torch._dynamo.reset()
    counters.clear()
    adapt(model)  # as the runner does before compiling (Falcon's linear layers become nn.Linear)
    groups = linear.siblings(layers, lambda: model(torch.tensor([[5, 6, 7]])))
    names = {module: name for layer in layers for name, module in layer.named_modules()}
    assert [[names[m] for m in group] for group in groups] == SIBLINGS[family] * 6
    for group in groups:
        linear.fuse(group)
    graphs = []

    def eager(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        graphs.append(graph)
        return graph.forward

    compile_layers(layers, functools.partial(torch.compile, backend=linear.merging_repeats(eager)))
    calls = []
    applies = linear.applies
    monkeypatch.setattr(linear, "applies", lambda *args: calls.append(1) or applies(*args))
    try:
        await assert_exact(model, tokenizer)
    finally:
        restore_layers(layers)
    kinds = 2 if family == "gemma2" else 1
    assert 0 < counters["stats"]["unique_graphs"] <= 2 * kinds
    # the compiled layers' linear layers went through `trickle::linear`, a group's members once for all,
    # and restoring the layers took it out again
    assert bool(calls) == (family != "gpt2")
    per_layer = sum(isinstance(m, torch.nn.Linear) for m in layers[0].modules())
    once = per_layer - sum(len(group) - 1 for group in SIBLINGS[family])
    products = linear.OPS + linear.EPILOGUE_OPS + linear.ASIDE_OPS
    assert [sum(node.target in products for node in g.graph.nodes) for g in graphs] == [once] * len(graphs)

    # graphs of batch 1 (no symbolic size) fold what follows their products into the products' kernels
    def folded(graph: torch.fx.GraphModule) -> list[tuple[object, int]]:
        nodes = graph.graph.nodes
        ops = [node for node in nodes if node.target in linear.EPILOGUE_OPS]
        return [
            (node.args[3], node.args[6] >= 0, len(node.args[7]), node.args[8:] == (True,))  # type: ignore[operator]
            for node in ops
        ]

    def aside(graph: torch.fx.GraphModule) -> int:
        return sum(node.target in linear.ASIDE_OPS for node in graph.graph.nodes)

    def one_row(graph: torch.fx.GraphModule) -> bool:
        return not any(isinstance(node.meta.get("example_value"), torch.SymInt) for node in graph.graph.nodes)

    assert [folded(g) for g in graphs if one_row(g)] == [EPILOGUES[family]] * kinds
    assert all(folded(g) == [] for g in graphs if not one_row(g))
    assert [aside(g) for g in graphs if one_row(g)] == [int(family == "falcon-mqa")] * kinds
    assert all(aside(g) == 0 for g in graphs if not one_row(g))
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert all("forward" not in vars(m) for m in linears)


def assert_logprobs_are_the_models(
    model: PreTrainedModel, prompt: list[int], outputs: list[RequestOutput], top: int
) -> None:
    entries = [entry for out in outputs for entry in (out.logprobs or [])]
    assert len(entries) == outputs[-1].usage["completion_tokens"] > 0
    assert all(len(entry.top_ids) == top for entry in entries)
    assert_scores(
        model_logprobs(model, prompt, [entry.token for entry in entries]),
        [(entry.token, entry.logprob) for entry in entries],
        [list(zip(entry.top_ids, entry.top_logprobs, strict=True)) for entry in entries],
    )


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_logprobs_are_the_models_own_for_sampled_tokens_in_a_batch(
    family: str, models: dict[str, PreTrainedModel], tiny: LoadedModel
) -> None:
    """Rows that ask for log-probabilities (5 alternatives, 0) beside one that asks for none, joining a
    running batch: the sampled tokens' and the alternatives' are the model's distribution's."""
    model, tokenizer = model_of(family, models, tiny.tokenizer), tiny.tokenizer
    engine = AsyncEngine(
        model,
        tokenizer,
        EngineConfig(max_batch_size=4, max_seq_len=256, prefill_token_budget=4096, kv_cache_tokens=1024),
    )
    prefills = record_prefills(engine)
    await engine.start()
    prompts = [tokenizer.encode(p) for p in PROMPTS[1:]]
    asks = [5, None, 0]

    def run(i: int) -> Any:
        params = SamplingParams(
            temperature=0.9, top_k=0, top_p=1.0, seed=i, max_new_tokens=8, logprobs=asks[i]
        )
        return engine.generate(prompts[i], params, label=f"row{i}")

    async def read(stream: Any) -> list[RequestOutput]:
        return [out async for out in stream]

    try:
        # The later rows join the first while it decodes (mixed into its forward, where the engine mixes).
        runs = [run(0)]
        first = await anext(runs[0])
        runs += [run(1), run(2)]
        results = await asyncio.gather(*(read(stream) for stream in runs))
        results[0].insert(0, first)
    finally:
        await engine.stop()
    if engine.engine.runner.mixed_tokens:
        assert {"row1", "row2"} <= prefills.mixed
    for ids, n, outputs in zip(prompts, asks, results, strict=True):
        if n is None:
            assert all(out.logprobs is None for out in outputs)
        else:
            assert_logprobs_are_the_models(model, ids, outputs, n)
