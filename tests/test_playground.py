"""The playground in a real browser: Debian's headless chromium, driven by selenium through chromedriver,
against a live server on loopback. Text grows while it streams; Stop cancels the request on the server.

Needs `chromium` and `chromedriver` on PATH (`bash scripts/install-browser`). Without them the test is
skipped, unless TRICKLE_REQUIRE_BROWSER=1 (CI sets it), where it fails instead. The screenshot lands in
$TRICKLE_TEST_ARTIFACTS (default: test-artifacts/)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import app_url, make_engine
from trickle.config import Settings
from trickle.generation import LoadedModel
from trickle.server import create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRED = os.environ.get("TRICKLE_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(os.environ.get("TRICKLE_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not REQUIRED,
    reason="chromium and chromedriver are not installed (bash scripts/install-browser)",
)


@pytest.fixture
async def url(tiny: LoadedModel, settings: Settings) -> AsyncIterator[str]:
    demo = settings.model_copy(update={"model": "demo"})  # the page names it and warns of its noise
    async with app_url(create_app(demo, make_engine(tiny, max_seq_len=2048, max_batch_size=4))) as served:
        yield served


def until(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll the browser (it has no event to await from here) until `condition` is truthy."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out waiting for the page"
        time.sleep(0.01)
    return value


def running(url: str) -> int:
    with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
        return int(json.load(response)["running"])


def cancelled(url: str) -> float:
    """Requests that ended `cancelled`, from /metrics."""
    name = 'trickle:request_success_total{finished_reason="cancelled"} '
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line[len(name) :]) for line in text.splitlines() if line.startswith(name))


def browse(url: str) -> dict[str, Any]:
    """Everything the browser does, on a worker thread (selenium blocks; the server needs the loop)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1100,900")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or "chromedriver"), options=options)
    seen: dict[str, Any] = {}
    try:
        driver.get(f"{url}/")
        element = lambda name: driver.find_element(By.ID, name)  # noqa: E731
        seen["model"], seen["notice"] = element("model").text, element("notice").text

        def fill(name: str, value: str) -> None:
            element(name).clear()
            element(name).send_keys(value)

        fill("prompt", "The baker")
        fill("max-tokens", "300")
        fill("min-tokens", "300")
        fill("seed", "5")
        element("generate").click()
        snapshots: list[str] = []
        while not element("status").text.startswith("done"):
            text = element("output").text
            if text and (not snapshots or text != snapshots[-1]):
                snapshots.append(text)
        seen["snapshots"] = snapshots
        seen["final"] = element("output").text
        seen["status"] = element("status").text
        seen["ttft"], seen["tps"], seen["tokens"] = (element(n).text for n in ("ttft", "tps", "tokens"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        seen["screenshot"] = ARTIFACTS / "playground.png"
        driver.save_screenshot(str(seen["screenshot"]))

        # A long run, stopped as soon as text shows: the server's running count must drop.
        fill("max-tokens", "1900")
        fill("min-tokens", "1900")
        element("generate").click()
        until(lambda: element("output").text)
        seen["running_before_stop"] = running(url)
        element("stop").click()
        seen["status_after_stop"] = until(lambda: element("status").text == "stopped" and "stopped")
        seen["stopped_at"] = len(element("output").text)
        until(lambda: running(url) == 0)
        seen["running_after_stop"] = running(url)
        seen["cancelled"] = cancelled(url)

        # Token probabilities: the text comes in spans whose titles give each token's and the likeliest
        # alternatives'.
        element("probabilities").click()
        fill("max-tokens", "12")
        fill("min-tokens", "12")
        element("generate").click()
        until(lambda: element("status").text.startswith("done"))
        spans = driver.find_elements(By.CSS_SELECTOR, "#output span[title]")
        seen["spans"] = [(span.text, span.get_attribute("title")) for span in spans]
        seen["probability_text"] = element("output").text
    finally:
        driver.quit()
    return seen


@pytest.mark.timeout(120)
async def test_the_playground_streams_in_a_browser_and_stop_cancels(url: str) -> None:
    seen = await asyncio.to_thread(browse, url)
    assert seen["model"] == "demo" and "built-in demo model" in seen["notice"]  # in the screenshot too

    snapshots = seen["snapshots"]
    assert len(snapshots) >= 3, snapshots  # the text grew in several steps, not all at once
    for shorter, longer in itertools.pairwise(snapshots):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    assert seen["final"].startswith(snapshots[-1])
    assert seen["status"] == "done (length)"
    assert seen["tokens"] == "300"
    assert seen["ttft"].endswith(" ms") and float(seen["tps"]) > 0
    assert seen["screenshot"].stat().st_size > 0

    assert seen["running_before_stop"] == 1
    assert seen["status_after_stop"] == "stopped"
    assert seen["running_after_stop"] == 0
    assert seen["cancelled"] == 1  # Stop cancelled it (not left it running for a reconnect)

    assert seen["spans"] and "".join(text for text, _ in seen["spans"]) == seen["probability_text"]
    for _, title in seen["spans"]:
        assert re.search(r'^".*" \d+\.\d%$', title.splitlines()[0]), title
        assert len([line for line in title.splitlines() if line.startswith("   ")]) % 5 == 0


def browse_twice(url: str, cut: dict[str, Any]) -> dict[str, Any]:
    """One seeded run read whole, then the same run with its connection cut after an event: the page
    reconnects by itself (GET /stream/{id} with Last-Event-ID) and ends with the same text."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or "chromedriver"), options=options)
    seen: dict[str, Any] = {}
    try:
        driver.get(f"{url}/")
        element = lambda name: driver.find_element(By.ID, name)  # noqa: E731
        for name, value in (
            ("prompt", "The baker"),
            ("max-tokens", "60"),
            ("min-tokens", "60"),
            ("seed", "9"),
        ):
            element(name).clear()
            element(name).send_keys(value)
        for run in ("whole", "cut"):
            cut["armed"] = run == "cut"
            element("generate").click()
            until(
                lambda: (
                    element("status").text.startswith("done")
                    or "error" in element("status").get_attribute("class")
                )
            )
            seen[run] = (element("output").text, element("status").text)
    finally:
        driver.quit()
    return seen


@pytest.mark.timeout(120)
async def test_the_playground_resumes_a_stream_whose_connection_dropped(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp_sse import EventSourceResponse

    cut: dict[str, Any] = {"armed": False, "cuts": 0}
    real_send = EventSourceResponse.send

    async def cutting(
        self: Any, data: str, id: str | None = None, event: str | None = None, retry: Any = None
    ) -> None:
        await real_send(self, data, id=id, event=event, retry=retry)
        if cut["armed"] and self._req.method == "POST" and id == "5":  # the first stream, after 6 events
            cut["armed"] = False
            cut["cuts"] += 1
            self._req.transport.close()

    monkeypatch.setattr(EventSourceResponse, "send", cutting)
    seen = await asyncio.to_thread(browse_twice, url, cut)
    assert cut["cuts"] == 1
    assert seen["cut"] == seen["whole"]
    assert seen["whole"][1] == "done (length)" and len(seen["whole"][0]) > 20
