"""The OpenAI-compatible routes, driven by the official `openai` SDK against a live server, plus the raw
stream bytes and the refusals the SDK would hide."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import torch

from tests.conftest import app_url, make_engine
from tests.families import model_logprobs, reference
from tests.test_process import drained
from trickle.api.openai import ChatCompletionRequest, _sampling_params
from trickle.config import Settings
from trickle.generation import LoadedModel
from trickle.server import create_app

CHAT = [
    {"role": "system", "content": "You are a baker."},
    {"role": "user", "content": "What rises in the oven?"},
]


@pytest.fixture(scope="module")
def worker_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real program with two HTTP workers, serving the tiny model as `test` (a directory of that
    name where it runs) with the key and limits of the in-process app."""
    where = tmp_path_factory.mktemp("served")
    (where / "test").symlink_to(model_dir)
    env = {
        "TRICKLE_WORKERS": "2", "TRICKLE_API_KEYS": "sesame", "TRICKLE_MAX_BODY_BYTES": "4096",
        "TRICKLE_PING_INTERVAL": "30", "TRICKLE_MAX_BATCH_SIZE": "16",
        "TRICKLE_PREFILL_TOKEN_BUDGET": "4096", "TRICKLE_DTYPE": "float32",
    }  # fmt: skip
    with drained(Path("test"), env, cwd=where) as url:
        yield url


@pytest.fixture(params=["in_process", "workers"])
async def base_url(
    request: pytest.FixtureRequest, tiny: LoadedModel, settings: Settings
) -> AsyncIterator[str]:
    """The app in this process, or the same routes served by the real program's HTTP workers."""
    if request.param == "workers":
        yield request.getfixturevalue("worker_server")
        return
    app = create_app(settings.model_copy(update={"api_keys": ["sesame"]}), make_engine(tiny))
    async with app_url(app) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sesame", max_retries=0) as sdk:
        yield sdk


async def test_models_lists_the_served_model(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in page.data] == [("test", "model", "trickle")]


async def test_chat_streamed_equals_not_streamed_and_usage_matches(client: openai.AsyncOpenAI) -> None:
    ask: dict[str, Any] = {"model": "test", "messages": CHAT, "seed": 7, "max_tokens": 24, "temperature": 0.9}
    whole = await client.chat.completions.create(**ask)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")

    chunks = [c async for c in await client.chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}
    )]  # fmt: skip
    assert {c.id for c in chunks} == {whole.id.replace(whole.id, chunks[0].id)}
    assert all(c.object == "chat.completion.chunk" and c.model == "test" and c.created for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == [whole.choices[0].finish_reason]
    # include_usage: a last chunk with no choices carries the counts; every other chunk has usage null.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    streamed_usage, whole_usage = chunks[-1].usage.model_dump(), whole.usage.model_dump()
    # The second asking finds the first's prompt in the prefix cache: only that differs.
    assert streamed_usage.pop("prompt_tokens_details")["cached_tokens"] > 0
    assert whole_usage.pop("prompt_tokens_details")["cached_tokens"] == 0
    assert streamed_usage == whole_usage
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


async def test_completions_streamed_equals_not_streamed_and_usage_matches(client: openai.AsyncOpenAI) -> None:
    ask: dict[str, Any] = {"model": "test", "prompt": "The baker", "seed": 3, "max_tokens": 20}
    ask["extra_body"] = {"min_tokens": 20}  # an extension: the SDK passes it through extra_body
    whole = await client.completions.create(**ask)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 20

    chunks = [c async for c in await client.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}
    )]  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()

    # Without include_usage there is no usage chunk at all.
    plain = [c async for c in await client.completions.create(**ask, stream=True)]
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


async def test_stop_token_ids_through_the_sdk_end_the_text_at_that_token(
    client: openai.AsyncOpenAI, tiny: LoadedModel
) -> None:
    """vLLM's `stop_token_ids` extension: a token of the greedy answer, named as a stop token, ends the
    answer there (its text kept) with finish_reason `stop`."""
    ask: dict[str, Any] = {"model": "test", "prompt": "The baker", "temperature": 0, "max_tokens": 12}
    ids = reference(tiny.model, tiny.tokenizer.encode("The baker"), 12, tiny.tokenizer.pad_token_id)
    free = await client.completions.create(**ask)
    assert free.choices[0].text == tiny.tokenizer.decode(ids)
    first = ids.index(ids[4])
    stopped = await client.completions.create(**ask, extra_body={"stop_token_ids": [ids[4]]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == tiny.tokenizer.decode(ids[: first + 1])
    assert stopped.usage is not None and stopped.usage.completion_tokens == first + 1


async def test_chat_logprobs_streamed_and_not_are_the_models_and_the_sdk_parses_them(
    client: openai.AsyncOpenAI, tiny: LoadedModel
) -> None:
    ask: dict[str, Any] = {"model": "test", "messages": CHAT, "max_tokens": 8, "temperature": 0}
    ask |= {"logprobs": True, "top_logprobs": 3}
    whole = await client.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content
    assert whole.usage is not None and len(content) == whole.usage.completion_tokens
    chunks = [c async for c in await client.chat.completions.create(**ask, stream=True)]
    streamed = [
        entry
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for entry in c.choices[0].logprobs.content
    ]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(len(entry.top_logprobs) == 3 for entry in content)
    # The tokens' bytes put together are the text's, parts of characters included.
    joined = b"".join(bytes(entry.bytes or []) for entry in content)
    assert joined.decode() == whole.choices[0].message.content
    # Against the model (greedy: the tokens are generate()'s), the prompt as the chat template makes it.
    prompt = tiny.tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = reference(tiny.model, list(prompt), 8, tiny.tokenizer.pad_token_id)
    want = model_logprobs(tiny.model, list(prompt), ids)
    assert [e.token for e in content] == [tiny.tokenizer.decode([i]) for i in ids]
    for place, entry in enumerate(content):
        assert abs(entry.logprob - want[place, ids[place]].item()) < 1e-4
        best = want[place].topk(3)
        assert [t.token for t in entry.top_logprobs] == [
            tiny.tokenizer.decode([i]) for i in best.indices.tolist()
        ]
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in entry.top_logprobs]), best.values, atol=1e-4, rtol=0
        )


async def test_completion_logprobs_take_the_legacy_shape(
    client: openai.AsyncOpenAI, tiny: LoadedModel
) -> None:
    ask: dict[str, Any] = {
        "model": "test",
        "prompt": "The baker",
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": 2,
    }
    whole = await client.completions.create(**ask)
    scores = whole.choices[0].logprobs
    assert scores is not None and scores.tokens is not None and scores.top_logprobs is not None
    assert "".join(scores.tokens) == whole.choices[0].text
    assert scores.text_offset == [len("".join(scores.tokens[:i])) for i in range(len(scores.tokens))]
    assert all(len(top) == 2 for top in scores.top_logprobs)
    ids = reference(tiny.model, tiny.tokenizer.encode("The baker"), 6, tiny.tokenizer.pad_token_id)
    want = model_logprobs(tiny.model, tiny.tokenizer.encode("The baker"), ids)
    for place, (token, logprob) in enumerate(zip(ids, scores.token_logprobs or [], strict=True)):
        assert abs(logprob - want[place, token].item()) < 1e-4
    chunks = [c async for c in await client.completions.create(**ask, stream=True)]
    offsets = [
        o
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for o in c.choices[0].logprobs.text_offset or []
    ]
    assert offsets == scores.text_offset


async def prefix_hits(base_url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as response:
        text = await response.text()
    name = "trickle:prefix_cache_hits_total "
    return sum(float(line[len(name) :]) for line in text.splitlines() if line.startswith(name))


async def test_n_choices_prefill_the_prompt_once_and_each_is_reproducible_alone(
    base_url: str, client: openai.AsyncOpenAI
) -> None:
    """n=4 with a seed: four choices, choice i the text of the same request alone with seed + i; the
    three after the first read the prompt's full blocks from the prefix cache (its last block and token
    are always computed); streamed, the chunks name their choice and give the same texts."""
    prompt = f"{uuid.uuid4().hex} The baker lights the oven and the dough rests by the warm stones."
    ask: dict[str, Any] = {"model": "test", "prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 11}
    ask["extra_body"] = {"min_tokens": 8}
    before = await prefix_hits(base_url)
    whole = await client.completions.create(**ask, n=4)
    hits = await prefix_hits(base_url) - before
    assert [choice.index for choice in whole.choices] == [0, 1, 2, 3]
    assert whole.usage is not None and whole.usage.completion_tokens == 32
    prompt_tokens = whole.usage.prompt_tokens
    assert prompt_tokens > 2 * 16 and hits == 3 * ((prompt_tokens - 1) // 16 * 16)
    texts = [choice.text for choice in whole.choices]
    assert len(set(texts)) > 1, "the choices are sampled apart"
    for i, text in enumerate(texts):
        alone = await client.completions.create(**{**ask, "seed": 11 + i})
        assert alone.choices[0].text == text, i

    streamed: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    async for chunk in await client.completions.create(**ask, n=4, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(4)] == texts
    assert finishes == dict.fromkeys(range(4), "length")

    chat = await client.chat.completions.create(
        model="test", messages=CHAT, max_tokens=6, n=3, seed=5, temperature=1.0
    )
    assert [choice.index for choice in chat.choices] == [0, 1, 2]
    second = await client.chat.completions.create(
        model="test", messages=CHAT, max_tokens=6, seed=6, temperature=1.0
    )
    assert second.choices[0].message.content == chat.choices[1].message.content


async def test_best_of_returns_the_n_choices_whose_tokens_are_likeliest(client: openai.AsyncOpenAI) -> None:
    ask: dict[str, Any] = {"model": "test", "prompt": "The baker", "max_tokens": 6, "temperature": 1.5}
    ask |= {"seed": 3, "logprobs": 0}
    every = await client.completions.create(**ask, n=5)
    sums = [sum(choice.logprobs.token_logprobs or []) for choice in every.choices if choice.logprobs]
    best = await client.completions.create(**ask, n=2, best_of=5)
    chosen = [sum(choice.logprobs.token_logprobs or []) for choice in best.choices if choice.logprobs]
    assert chosen == pytest.approx(sorted(sums, reverse=True)[:2], abs=1e-5)
    assert best.usage is not None and every.usage is not None
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all five are generated
    without = await client.completions.create(**{**ask, "logprobs": None}, n=2, best_of=5)
    assert [c.text for c in without.choices] == [c.text for c in best.choices]
    assert all(choice.logprobs is None for choice in without.choices)


SIZE_SCHEMA = {
    "type": "object",
    "properties": {"size": {"enum": ["small", "large"]}, "count": {"type": "integer", "maximum": 99}},
    "required": ["size", "count"],
    "additionalProperties": False,
}


async def test_response_format_is_followed_and_a_bad_one_is_a_400_naming_it(
    client: openai.AsyncOpenAI,
) -> None:
    strict = {"type": "json_schema", "json_schema": {"name": "size", "schema": SIZE_SCHEMA, "strict": True}}
    chat = await client.chat.completions.create(
        model="test",
        messages=CHAT,
        max_tokens=40,
        seed=3,
        response_format=strict,  # type: ignore[arg-type]
    )
    assert chat.choices[0].finish_reason == "stop"
    answer = json.loads(chat.choices[0].message.content or "")
    assert answer["size"] in ("small", "large") and isinstance(answer["count"], int)
    regex = await client.completions.create(
        model="test",
        prompt="The baker",
        max_tokens=20,
        extra_body={"response_format": {"type": "regex", "pattern": "[0-9]{4}"}},
    )
    assert re.fullmatch("[0-9]{4}", regex.choices[0].text)
    broken = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="test",
            messages=CHAT,
            response_format=broken,  # type: ignore[arg-type]
        )
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "response_format"
    assert "nonsense" in caught.value.body["message"]


def test_openais_penalties_and_the_extensions_reach_the_sampling_parameters() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "test",
            "messages": CHAT,
            "frequency_penalty": 1.25,
            "presence_penalty": -0.5,
            "stop_token_ids": [7, 9],
            "ignore_eos": True,
        }
    )
    params = _sampling_params(body, prompt_tokens=10, limit=100)
    assert (params.frequency_penalty, params.presence_penalty) == (1.25, -0.5)
    assert (params.stop_token_ids, params.ignore_eos) == ([7, 9], True)


async def test_the_raw_stream_has_the_full_chunk_shape_and_ends_with_done(base_url: str) -> None:
    body = {"model": "test", "messages": CHAT, "max_tokens": 5, "min_tokens": 5, "stream": True}
    headers = {"Authorization": "Bearer sesame"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.post(f"{base_url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        text = await response.text()
    frames = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    for chunk in chunks:
        assert set(chunk) == {"id", "object", "created", "model", "choices"}
        assert set(chunk["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


@pytest.mark.parametrize(
    ("route", "extra", "param"),
    [
        ("chat", {"n": 17}, "n"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "bake"}}]}, "tools"),
        ("chat", {"frequency_penalty": 2.5}, "frequency_penalty"),
        ("chat", {"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids.0"),
        ("chat", {"max_tokens": 100000}, "max_tokens"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"echo": True}, "echo"),
        ("completions", {"best_of": 3, "n": 4}, "best_of"),
        ("completions", {"best_of": 3, "stream": True}, "best_of"),
        ("completions", {"temperature": 5}, "temperature"),
        ("completions", {"extra_body": {"top_k": 10**36}}, "top_k"),
    ],
)
async def test_what_the_engine_cannot_honour_is_a_400_naming_it(
    client: openai.AsyncOpenAI, route: str, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        if route == "chat":
            await client.chat.completions.create(**{"model": "test", "messages": CHAT, **extra})
        else:
            await client.completions.create(**{"model": "test", "prompt": "The baker", **extra})
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]
    # ... and the server goes on serving.
    after = await client.completions.create(model="test", prompt="The baker", max_tokens=2)
    assert after.choices[0].finish_reason in ("stop", "length")


async def test_a_lone_surrogate_in_the_prompt_is_a_client_error(base_url: str) -> None:
    # JSON can carry one; the SDK cannot even send it, so this goes by hand.
    raw = '{"model": "test", "prompt": "bad \\ud800 text"}'
    headers = {"Authorization": "Bearer sesame", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(f"{base_url}/v1/completions", data=raw) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "prompt"
        async with session.post(f"{base_url}/stream", data='{"prompt": "bad \\ud800"}') as response:
            assert response.status == 422
            assert (await response.json())["error"]["field"] == "prompt"


async def test_an_unknown_model_is_a_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.completions.create(model="gpt-4", prompt="hi")
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "model"


async def test_the_api_key_guards_the_v1_routes_with_an_openai_error(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.models.list()
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "authentication_error"


async def test_a_model_without_a_chat_template_gets_a_400(
    request: pytest.FixtureRequest,
    client: openai.AsyncOpenAI,
    tiny: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if request.node.callspec.params["base_url"] != "in_process":
        pytest.skip("changes the tokenizer of a model in this process")
    monkeypatch.setattr(tiny.tokenizer, "chat_template", None)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="test", messages=CHAT)
    assert isinstance(caught.value.body, dict) and "chat template" in caught.value.body["message"]


async def test_v1_responses_are_counted_in_the_metrics(base_url: str, client: openai.AsyncOpenAI) -> None:
    async def counted(status: str) -> float:
        async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as response:
            text = await response.text()
        name = f'trickle:http_responses_total{{route="/v1/completions",status="{status}"}} '
        return sum(float(line[len(name) :]) for line in text.splitlines() if line.startswith(name))

    before = (await counted("200"), await counted("400"))
    await client.completions.create(model="test", prompt="The baker", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="test", prompt="The baker", n=3, best_of=2)
    assert (await counted("200"), await counted("400")) == (before[0] + 1, before[1] + 1)


async def test_v1_limits_answer_with_the_openai_error_object(base_url: str) -> None:
    auth = {"Authorization": "Bearer sesame"}
    url = f"{base_url}/v1/completions"
    async with aiohttp.ClientSession(headers=auth) as session:
        cases = [
            (session.post(url, data="x" * 5000, headers={"Content-Type": "application/json"}), 413),
            (session.post(url, data="{}", headers={"Content-Type": "text/plain"}), 415),
            (session.post(url, data="{not json", headers={"Content-Type": "application/json"}), 400),
            (session.get(url), 405),
        ]
        for call, status in cases:
            async with call as response:
                assert response.status == status
                body = await response.json()
                assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_the_readmes_sdk_example_prints_the_text_and_then_the_token_count(base_url: str) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    example = example.replace("http://127.0.0.1:8080/v1", f"{base_url}/v1")
    example = example.replace('"unused-unless-the-server-has-keys"', '"sesame"').replace(
        'model="demo"', 'model="test"'
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        await asyncio.to_thread(exec, example, {})
    text, _, count = printed.getvalue().rstrip("\n").rpartition("\n")
    assert text and re.fullmatch(r"\[\d+ tokens\]", count), printed.getvalue()
    assert "None" not in text and "CompletionUsage" not in text
