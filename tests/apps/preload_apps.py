"""Apps of every interface that say which process imported them and which serves: with
``--preload`` the first is the mold, the second a worker forked from it.

Each answers ``imported <pid> served <pid>`` (the stream handler on connect, then
closes); the WebSocket app answers ``pid`` with the serving pid and echoes the rest.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import trio

import trioherd
from trioherd import Request, Response

IMPORTED_IN = os.getpid()


def who() -> str:
    return f"imported {IMPORTED_IN} served {os.getpid()}\n"


async def native(request: Request) -> Response:
    return Response(who())


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "websocket":
        await _websocket(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": who().encode()})


async def _websocket(receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text") or ""
        await send({"type": "websocket.send", "text": str(os.getpid()) if text == "pid" else text})


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
