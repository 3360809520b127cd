"""The HTTP contract: SSE bytes and headers, /predict, errors, auth, health and readiness."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import fail_step, make_engine
from tests.families import assert_scores, model_logprobs
from tests.sse import parse_events, text_of
from tests.test_process import drained
from trickle.config import Settings
from trickle.generation import LoadedModel
from trickle.server import ENGINE_KEY, create_app

ClientFactory = Callable[..., Awaitable[TestClient]]


class ServerClient:
    """The calls these tests make of aiohttp's TestClient, made to a real server's URL."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url, self.session = url, session

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.session.get(self.url + path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.session.post(self.url + path, **kwargs)


@pytest.fixture(scope="module")
def worker_server(model_dir: Path) -> Iterator[str]:
    """The real program with two HTTP workers, set as the in-process app of `client` is."""
    env = {
        "TRICKLE_WORKERS": "2", "TRICKLE_MAX_BODY_BYTES": "4096", "TRICKLE_PING_INTERVAL": "30",
        "TRICKLE_MAX_BATCH_SIZE": "16", "TRICKLE_PREFILL_TOKEN_BUDGET": "4096", "TRICKLE_DTYPE": "float32",
    }  # fmt: skip
    with drained(model_dir, env) as url:
        yield url


@pytest.fixture(params=["in_process", "workers"])
async def client(
    request: pytest.FixtureRequest, aiohttp_client: ClientFactory, tiny: LoadedModel, settings: Settings
) -> AsyncIterator[TestClient | ServerClient]:
    """The app in this process, or the same routes served by the real program's HTTP workers."""
    if request.param == "in_process":
        yield await aiohttp_client(create_app(settings, make_engine(tiny)))
        return
    url = request.getfixturevalue("worker_server")
    async with aiohttp.ClientSession() as session:
        yield ServerClient(url, session)


async def stream_events(
    client: TestClient | ServerClient, body: dict[str, Any], **headers: str
) -> tuple[Any, list[Any]]:
    response = await client.post("/stream", json=body, headers=headers)
    return response, parse_events(await response.text())


async def test_stream_sends_token_events_then_an_end_event(client: TestClient) -> None:
    response, events = await stream_events(
        client, {"prompt": "The baker", "max_new_tokens": 6, "min_new_tokens": 6}
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert len(response.headers["X-Request-Id"]) == 32
    assert [e.event for e in events[:-1]] == ["message"] * (len(events) - 1)
    assert [e.id for e in events] == [str(i) for i in range(len(events))]
    end = events[-1]
    assert end.event == "end"
    assert end.json()["finish_reason"] == "length"
    assert end.json()["usage"]["completion_tokens"] == 6
    assert set(end.json()["timings"]) == {"queue_ms", "ttft_ms", "total_ms"}
    assert "The baker" not in text_of(events)


async def test_stream_wire_format_is_exact(client: TestClient) -> None:
    response = await client.post(
        "/stream", json={"prompt": "The baker", "max_new_tokens": 2, "min_new_tokens": 2, "temperature": 0}
    )
    raw = await response.text()
    first, _ = raw.split("\n\n", 1)
    assert first.startswith('id: 0\ndata: {"text": ')
    assert raw.endswith("}\n\n")
    assert '\nevent: end\ndata: {"finish_reason": "length", "usage": {"prompt_tokens": ' in raw


async def test_client_request_id_is_echoed(client: TestClient) -> None:
    response = await client.post(
        "/predict", json={"prompt": "a", "max_new_tokens": 1}, headers={"X-Request-Id": "abc-123"}
    )
    assert response.headers["X-Request-Id"] == "abc-123"


async def test_predict_text_equals_the_concatenated_stream_for_a_seeded_request(client: TestClient) -> None:
    body = {
        "prompt": "café",
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 7,
        "max_new_tokens": 48,
        "min_new_tokens": 48,
    }
    _, events = await stream_events(client, body)
    response = await client.post("/predict", json=body)
    predicted = await response.json()
    assert response.status == 200
    assert predicted["text"] == text_of(events)
    assert predicted["finish_reason"] == "length"
    assert predicted["usage"] == events[-1].json()["usage"]


BAD_INPUTS = [
    ("not json", {"data": b"{oops", "headers": {"Content-Type": "application/json"}}, 400, None),
    (
        "form body",
        {"data": b"prompt=hi", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        415,
        None,
    ),
    ("json array", {"json": ["prompt"]}, 422, None),
    ("missing prompt", {"json": {"temperature": 0.5}}, 422, "prompt"),
    ("wrong type", {"json": {"prompt": "hi", "top_k": "many"}}, 422, "top_k"),
    ("out of range", {"json": {"prompt": "hi", "temperature": -1}}, 422, "temperature"),
    ("top_p zero", {"json": {"prompt": "hi", "top_p": 0}}, 422, "top_p"),
    ("unknown field", {"json": {"prompt": "hi", "beam_width": 4}}, 422, "beam_width"),
    ("fractional top_k", {"json": {"prompt": "hi", "top_k": 2.5}}, 422, "top_k"),
    # found by schemathesis: past int64 it used to fail the engine step of every row in the batch
    ("huge top_k", {"json": {"prompt": "hi", "top_k": 10**36}}, 422, "top_k"),
    ("empty stop", {"json": {"prompt": "hi", "stop": [""]}}, 422, "stop.0"),
    ("too long for a slot", {"json": {"prompt": "hi", "max_new_tokens": 100000}}, 422, "max_new_tokens"),
    ("too large", {"json": {"prompt": "x" * 5000}}, 413, None),
]


@pytest.mark.parametrize(("route"), ["/stream", "/predict"])
@pytest.mark.parametrize(
    ("name", "request_kwargs", "status", "field"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
async def test_bad_input_gets_a_json_error_and_the_next_request_succeeds(
    client: TestClient, route: str, name: str, request_kwargs: dict[str, Any], status: int, field: str | None
) -> None:
    response = await client.post(route, **request_kwargs)
    assert response.status == status, await response.text()
    error = (await response.json())["error"]
    assert error["status"] == status
    assert error["message"]
    if field is not None:
        assert error["field"] == field
        assert field.split(".")[0] in error["message"]
    ok = await client.post("/predict", json={"prompt": "hi", "max_new_tokens": 2})
    assert ok.status == 200


async def test_min_above_max_new_tokens_names_both(client: TestClient) -> None:
    response = await client.post("/predict", json={"prompt": "hi", "max_new_tokens": 2, "min_new_tokens": 5})
    assert response.status == 422
    message = (await response.json())["error"]["message"]
    assert "min_new_tokens" in message and "max_new_tokens" in message


async def test_unknown_route_and_wrong_method_are_json(client: TestClient) -> None:
    missing = await client.get("/nope")
    assert missing.status == 404 and (await missing.json())["error"]["status"] == 404
    wrong = await client.get("/stream")
    assert wrong.status == 405 and wrong.headers["Allow"] == "POST"


async def test_failed_step_sends_error_then_end_and_the_server_goes_on(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not isinstance(client, TestClient):
        pytest.skip("injects a failure into an engine in this process")
    fail_step(monkeypatch, client.server.app[ENGINE_KEY].engine, at_call=2, message="injected")
    _, events = await stream_events(
        client, {"prompt": "The baker", "max_new_tokens": 10, "min_new_tokens": 10}
    )
    assert [e.event for e in events[-2:]] == ["error", "end"]
    assert "injected" not in events[-2].json()["message"]
    assert events[-1].json()["finish_reason"] == "error"
    _, after = await stream_events(client, {"prompt": "The baker", "max_new_tokens": 3, "min_new_tokens": 3})
    assert after[-1].json()["finish_reason"] == "length"


async def test_health_and_ready(client: TestClient) -> None:
    assert (await client.get("/health")).status == 200
    ready = await client.get("/ready")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"


async def test_ready_is_503_without_a_running_engine(
    aiohttp_client: ClientFactory, tiny: LoadedModel, settings: Settings
) -> None:
    engine = make_engine(tiny)
    client = await aiohttp_client(create_app(settings, engine))
    await engine.stop()
    response = await client.get("/ready")
    assert response.status == 503 and response.headers["Retry-After"]
    refused = await client.post("/stream", json={"prompt": "hi"})
    assert refused.status == 503 and (await refused.json())["error"]["message"]


@pytest.fixture
async def keyed_client(aiohttp_client: ClientFactory, tiny: LoadedModel, tmp_path: Path) -> TestClient:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nfile-key\n\n")
    settings = Settings(model="test", api_keys=["env-key"], api_keys_file=keys_file)
    return await aiohttp_client(create_app(settings, make_engine(tiny)))


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        ("Bearer ", 401),
        ("env-keyX", 401),
        ("Bearer env-key", 200),
        ("bearer file-key", 200),
        ("env-key", 200),
        ("file-key", 200),
    ],
)
async def test_api_keys_guard_generation_routes(
    keyed_client: TestClient, authorization: str | None, status: int
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for route in ("/stream", "/predict"):
        response = await keyed_client.post(route, json={"prompt": "hi", "max_new_tokens": 1}, headers=headers)
        assert response.status == status
        if status == 401:
            assert (await response.json())["error"]["status"] == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_health_and_ready_stay_open_with_keys(keyed_client: TestClient) -> None:
    assert (await keyed_client.get("/health")).status == 200
    assert (await keyed_client.get("/ready")).status == 200


async def test_a_queued_stream_gets_ping_comments_while_it_waits(
    aiohttp_client: ClientFactory, tiny: LoadedModel, settings: Settings
) -> None:
    pinging = settings.model_copy(update={"ping_interval": 0.02})
    client = await aiohttp_client(create_app(pinging, make_engine(tiny, max_batch_size=1)))
    engine = client.server.app[ENGINE_KEY].engine
    first = asyncio.create_task(
        client.post("/predict", json={"prompt": "The baker", "max_new_tokens": 400, "min_new_tokens": 400})
    )
    await engine.wait_until(lambda e: e.num_running == 1)
    response = await client.post("/stream", json={"prompt": "café", "max_new_tokens": 2, "min_new_tokens": 2})
    raw = await response.text()
    assert (await first).status == 200
    assert raw.startswith(": ping\n\n")
    assert parse_events(raw)[-1].json()["finish_reason"] == "length"


@pytest.mark.parametrize(("model", "notice"), [("demo", True), ("org/<b>model</b>", False)])
async def test_the_playground_names_the_model_and_warns_of_the_demos_noise(
    aiohttp_client: ClientFactory, tiny: LoadedModel, settings: Settings, model: str, notice: bool
) -> None:
    client = await aiohttp_client(create_app(settings.model_copy(update={"model": model}), make_engine(tiny)))
    page = await (await client.get("/")).text()
    assert f'<span id="model">{html.escape(model)}</span>' in page and "<b>model" not in page
    assert ("built-in demo model" in page) is notice
    assert 'value="250"' in page and 'value="0.75"' in page  # the API's defaults
    assert '<link rel="icon" href="data:,">' in page  # no request for /favicon.ico


async def test_logprobs_ride_on_the_token_events_and_come_whole_from_predict(
    client: TestClient, tiny: LoadedModel
) -> None:
    """`logprobs: 3`: each token event carries its tokens' entries (the model's log-probabilities, their
    text as each token decodes alone); /predict gives them all; a request without asks none."""
    body = {"prompt": "The baker", "max_new_tokens": 8, "temperature": 0.8, "seed": 5, "logprobs": 3}
    _, events = await stream_events(client, body)
    messages = [event.json() for event in events if event.event == "message"]
    entries = [entry for message in messages for entry in message["logprobs"]]
    assert len(entries) == events[-1].json()["usage"]["completion_tokens"] == 8
    ids = [entry["id"] for entry in entries]
    assert text_of(events) == tiny.tokenizer.decode(ids, skip_special_tokens=True)
    for entry in entries:
        assert entry["token"] == tiny.tokenizer.decode([entry["id"]])
        assert [alt["token"] for alt in entry["top"]] == [
            tiny.tokenizer.decode([alt["id"]]) for alt in entry["top"]
        ]
    assert_scores(
        model_logprobs(tiny.model, tiny.tokenizer.encode("The baker"), ids),
        [(entry["id"], entry["logprob"]) for entry in entries],
        [[(alt["id"], alt["logprob"]) for alt in entry["top"]] for entry in entries],
    )
    predicted = await (await client.post("/predict", json=body)).json()
    assert predicted["text"] == text_of(events)
    assert [entry["id"] for entry in predicted["logprobs"]] == ids  # seeded: the same tokens
    for whole, streamed in zip(predicted["logprobs"], entries, strict=True):
        assert abs(whole["logprob"] - streamed["logprob"]) < 1e-5

    _, plain = await stream_events(client, {**body, "logprobs": None})
    assert all(set(event.json()) == {"text"} for event in plain if event.event == "message")
    assert "logprobs" not in await (await client.post("/predict", json={**body, "logprobs": None})).json()


async def test_a_response_format_is_followed_and_a_bad_one_is_a_422_naming_it(client: TestClient) -> None:
    body: dict[str, Any] = {"prompt": "The baker", "max_new_tokens": 20}
    body["response_format"] = {"type": "regex", "pattern": "(ab|cd){2,4}!"}
    response = await client.post("/predict", json=body)
    assert response.status == 200
    answer = await response.json()
    assert re.fullmatch("(ab|cd){2,4}!", answer["text"]) and answer["finish_reason"] == "eos"
    body["response_format"] = {"type": "regex", "pattern": "(unclosed"}
    response = await client.post("/stream", json=body)
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["field"] == "response_format" and error["message"].startswith("response_format: ")
