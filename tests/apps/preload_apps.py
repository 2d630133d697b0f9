"""Apps of every interface that say which process imported them and which serves: with
``--preload`` the first is the mold, the second a worker forked from it.

Each answers ``imported <pid> served <pid>`` (the stream handler on connect, then
closes); ``asgi`` serves lifespan and WebSockets as ``ws_apps.asgi`` does.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import trio

import trioherd
from apps import ws_apps
from trioherd import Request, Response

IMPORTED_IN = os.getpid()


def who() -> str:
    return f"imported {IMPORTED_IN} served {os.getpid()}\n"


async def native(request: Request) -> Response:
    return Response(who())


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan, and WebSockets (/echo answers "pid")
        await ws_apps.asgi(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": who().encode()})


async def asyncio_only(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that needs asyncio's own loop (served with --asyncio)."""
    if scope["type"] != "http":
        await asgi(scope, receive, send)
        return
    await asyncio.sleep(0)
    asyncio.get_running_loop()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": who().encode()})


def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [who().encode()]


@trioherd.stream_handler
async def stream(stream: trio.abc.Stream) -> None:
    await stream.send_all(who().encode())
