"""The ASGI app of bench/tls.py, the same for every server: ``/`` the 13-byte hello of
hello_app.py, ``/download?mb=N`` N MiB with a Content-Length, sent in pieces of 1 MiB,
``/upload`` reads the request body and answers how many bytes it had.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MIB = 1 << 20
PIECE = b"x" * MIB


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        for _ in range(16):  # startup, then shutdown (bounded, as hello_app's)
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
        return
    if scope["type"] != "http":
        raise RuntimeError(f"transfer_app: unsupported scope type {scope['type']!r}")
    path = scope["path"]
    if path == "/download":
        pieces = int(scope["query_string"].decode().partition("mb=")[2] or 1)
        await start(send, pieces * MIB)
        for index in range(pieces):
            more = index < pieces - 1
            await send({"type": "http.response.body", "body": PIECE, "more_body": more})
        return
    body = b"Hello, World!"
    if path == "/upload":
        received, more = 0, True
        while more:
            message = await receive()
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"%d" % received
    await start(send, len(body))
    await send({"type": "http.response.body", "body": body})


async def start(send: Send, length: int) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", b"%d" % length),
            ],
        }
    )
