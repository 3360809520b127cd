"""/openapi.json: it documents every route the app serves, and schemathesis, fuzzing a live server from
it, finds no 5xx and no response that breaks it."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import make_engine
from trickle.config import Settings
from trickle.generation import LoadedModel
from trickle.server import create_app

# Checks about the responses only: schemathesis's other checks judge whether the API accepts what the
# schema allows, which is not what this test is about (cross-field limits such as min <= max tokens,
# or the prompt fitting max_seq_len, cannot be written in a JSON schema).
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
FUZZ_SECONDS = 60


@pytest.fixture
async def live(tiny: LoadedModel, settings: Settings) -> AsyncIterator[tuple[str, web.Application]]:
    # A short max_seq_len keeps every generated request quick.
    app = create_app(settings, make_engine(tiny, max_seq_len=96))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", app
    await runner.cleanup()


async def test_the_document_covers_every_route(live: tuple[str, web.Application]) -> None:
    url, app = live
    async with aiohttp.ClientSession() as session, session.get(f"{url}/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document["openapi"].startswith("3.1")
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served == documented
    # The request bodies are the handlers' own pydantic models.
    schemas = document["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["test"]
    assert "max_new_tokens" in schemas["GenerateRequest"]["properties"]


@pytest.mark.timeout(FUZZ_SECONDS + 120)
async def test_schemathesis_finds_no_server_error_and_no_response_off_the_spec(
    live: tuple[str, web.Application], tmp_path: Path
) -> None:
    url, _ = live
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is installed with the test extras"
    process = await asyncio.create_subprocess_exec(
        st, "run", f"{url}/openapi.json", "--checks", CHECKS, "--phases", "examples,coverage,fuzzing",
        "--max-examples", "30", "--max-time", str(FUZZ_SECONDS), "--seed", "1", "--workers", "1",
        "--request-timeout", "20", "--no-color", "--report-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # its example cache stays out of the checkout
    )  # fmt: skip
    output, _ = await process.communicate()
    text = output.decode()
    assert process.returncode == 0, text[-4000:]
    counted = re.search(r"(\d+) generated, (\d+) passed", text)
    assert counted is not None, text[-2000:]
    generated, passed = int(counted[1]), int(counted[2])
    assert generated == passed and generated >= 200, text[-2000:]
    assert "Tested: 11" in text
