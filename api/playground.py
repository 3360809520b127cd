"""GET /: the playground, one page that streams from POST /stream in the browser. It names the served
model, and says so when that is the built-in demo model, which knows only a few paragraphs."""

from __future__ import annotations

import html
from importlib import resources

from aiohttp import web

from trickle.api.common import Route
from trickle.api.openapi import TEXT

PAGE_KEY = web.AppKey("playground_page", bytes)
DEMO_NOTICE = (
    "This is trickle's built-in demo model: tiny, and trained for a few seconds on a few paragraphs about "
    "a bakery, so it can only write their words back. Serve a real model with --model (a Hugging Face hub "
    "id or a local directory)."
)


async def page(request: web.Request) -> web.Response:
    return web.Response(body=request.app[PAGE_KEY], content_type="text/html", charset="utf-8")


def prepare(app: web.Application, model: str) -> None:
    """The page, naming the served model, made once."""
    template = resources.files(__package__).joinpath("static/playground.html").read_text()
    notice = DEMO_NOTICE if model == "demo" else ""
    page_text = template.replace("{{model}}", html.escape(model)).replace("{{notice}}", html.escape(notice))
    app[PAGE_KEY] = page_text.encode()


ROUTES = (
    Route(
        "GET",
        "/",
        page,
        "The playground: a page that streams from the model in the browser",
        "operations",
        lambda ref: {"200": {"description": "HTML.", "content": {"text/html": TEXT}}},
        open=True,
    ),
)
