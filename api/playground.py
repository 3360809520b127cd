"""GET /: the playground, one static page that streams from POST /stream in the browser."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

PAGE_KEY = web.AppKey("playground_page", bytes)


async def page(request: web.Request) -> web.Response:
    return web.Response(body=request.app[PAGE_KEY], content_type="text/html", charset="utf-8")


def add_routes(app: web.Application) -> None:
    app[PAGE_KEY] = resources.files("api").joinpath("static/playground.html").read_bytes()
    app.add_routes([web.get("/", page)])
