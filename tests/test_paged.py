"""The paged KV cache as users meet it: as many rows as the pool's blocks hold, and prompts whose leading
tokens are cached prefilled only past them (exactly the same text), over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import make_engine
from tests.families import FAMILIES, build_from
from tests.sse import parse_events, text_of
from tests.test_service import metric
from trickle.config import Settings
from trickle.generation import AsyncEngine, LoadedModel, SamplingParams
from trickle.generation.kv.blocks import NULL_BLOCK
from trickle.server import create_app

ClientFactory = Callable[..., Awaitable[TestClient]]
WORDS = "the baker lights the oven before dawn and the bread rises while the town still sleeps "


def text_of_tokens(loaded: LoadedModel, count: int, start: str = "") -> str:
    """A text of at least `count` tokens."""
    text = start
    while len(loaded.tokenizer.encode(text)) < count:
        text += WORDS
    return text


async def test_a_4096_token_pool_runs_24_of_32_hundred_token_requests_at_once(tiny: LoadedModel) -> None:
    # One slot of max_seq_len per row would hold one such request at a time.
    engine = make_engine(tiny, max_batch_size=64, max_seq_len=4096, kv_cache_tokens=4096)
    prompt = tiny.tokenizer.encode(text_of_tokens(tiny, 50))
    params = SamplingParams(max_new_tokens=50, min_new_tokens=50)
    peak = 0

    def watch(e: AsyncEngine) -> bool:
        nonlocal peak
        peak = max(peak, e.num_running)
        return False

    await engine.start()
    try:

        async def one() -> None:
            async for _ in engine.generate(prompt, params):
                watch(engine)

        await asyncio.gather(*(one() for _ in range(32)))
    finally:
        await engine.stop()
    assert peak >= 24
    assert engine.engine.scheduler.preemptions == 0


async def stream(client: TestClient, prompt: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One /stream request's text and end event; its events' ids count up from 0 with no gap."""
    body = body or {
        "prompt": prompt,
        "max_new_tokens": 12,
        "min_new_tokens": 12,
        "temperature": 0,
        "cutoff_len": 2000,
    }
    response = await client.post("/stream", json=body)
    assert response.status == 200
    events = parse_events(await response.text())
    ids = [int(e.id) for e in events if e.event == "message" and e.id is not None]
    assert ids == list(range(len(ids))), "no gap and no duplicate"
    return {"text": text_of(events), **events[-1].json()}


async def three_requests(
    aiohttp_client: ClientFactory, tiny: LoadedModel, prefix: str, cache: bool
) -> tuple[list[dict[str, Any]], dict[str, float], list[int]]:
    """One request, then two at once, all after one long prefix: their results, the prefix-cache
    counters' moves over the two, and the blocks any forward wrote while several rows held them."""
    engine = make_engine(tiny, max_seq_len=2048, prefix_cache=cache)
    written_while_shared: list[int] = []
    pool, cache_ = engine.engine.scheduler.pool, engine.engine.runner.cache
    for_forward = cache_.for_forward

    def checked(*args: Any, **kwargs: Any) -> None:
        for_forward(*args, **kwargs)
        blocks = {int(slot) // cache_.block_size for slot in cache_._slots.tolist()} - {NULL_BLOCK}
        written_while_shared.extend(block for block in blocks if pool.refs(block) > 1)

    cache_.for_forward = checked  # type: ignore[method-assign]
    client = await aiohttp_client(create_app(Settings(model="test"), engine))
    first = await stream(client, prefix + "What does the baker do first?")
    before = await (await client.get("/metrics")).text()
    second, third = await asyncio.gather(
        stream(client, prefix + "Who sleeps while the bread rises?"),
        stream(client, prefix + "When does the oven get lit?"),
    )
    after = await (await client.get("/metrics")).text()
    moved = {
        name: metric(after, f"trickle:{name}") - metric(before, f"trickle:{name}")
        for name in ("prefix_cache_hits_total", "prefix_cache_queries_total")
    }
    return [first, second, third], moved, written_while_shared


@pytest.fixture(scope="module")
def wider(tiny: LoadedModel) -> LoadedModel:
    """A Llama of 4 layers of 256, with the demo's tokenizer: big enough that prefilling 1,000 tokens
    costs clearly more than a step's fixed work (on the demo model it took ~20 ms against ~10 ms for a
    short tail, and a loaded machine could tip the comparison; here ~125 ms against ~20)."""
    config = FAMILIES["llama"](len(tiny.tokenizer))
    config.update(
        {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 4096,
        }
    )
    return dataclasses.replace(tiny, model=build_from(config, tiny.tokenizer.eos_token_id))


async def test_a_shared_1000_token_prefix_is_prefilled_once_for_the_same_text(
    aiohttp_client: ClientFactory, wider: LoadedModel
) -> None:
    prefix = text_of_tokens(wider, 1000)
    cached, moved, written_while_shared = await three_requests(aiohttp_client, wider, prefix, cache=True)
    uncached, _, _ = await three_requests(aiohttp_client, wider, prefix, cache=False)
    assert [r["text"] for r in cached] == [r["text"] for r in uncached]
    assert all(r["usage"]["cached_tokens"] == 0 for r in uncached)

    first, second, third = cached
    full_blocks = len(wider.tokenizer.encode(prefix)) // 16 * 16
    assert first["usage"]["cached_tokens"] == 0
    for later in (second, third):
        assert full_blocks - 16 <= later["usage"]["cached_tokens"] <= full_blocks
        assert later["timings"]["ttft_ms"] < first["timings"]["ttft_ms"] / 2
    assert (
        moved["prefix_cache_hits_total"] == second["usage"]["cached_tokens"] + third["usage"]["cached_tokens"]
    )
    assert (
        moved["prefix_cache_queries_total"]
        == second["usage"]["prompt_tokens"] + third["usage"]["prompt_tokens"]
    )
    assert written_while_shared == []


async def test_preempted_streams_go_on_without_gap_or_repeat_and_say_what_they_said_alone(
    aiohttp_client: ClientFactory, tiny: LoadedModel
) -> None:
    """Four streams through a pool of six 16-position blocks outgrow it: the newest are preempted and
    resumed, and every stream's SSE events still count up one by one and spell its solo text."""
    engine = make_engine(tiny, max_batch_size=4, max_seq_len=96, kv_cache_tokens=96)
    client = await aiohttp_client(create_app(Settings(model="test"), engine))
    prompts = ["The baker", "Every morning the little bakery", "Bread and water", "On the square"]

    async def one(prompt: str) -> dict[str, Any]:
        body = {"prompt": prompt, "max_new_tokens": 40, "min_new_tokens": 40, "temperature": 0}
        return await stream(client, prompt, body)

    together = await asyncio.gather(*(one(p) for p in prompts))
    assert engine.engine.scheduler.preemptions > 0
    alone = [await one(p) for p in prompts]
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert all(r["usage"]["completion_tokens"] == 40 for r in together)
