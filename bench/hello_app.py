"""The benchmark app: a 13-byte "Hello, World!" ASGI 3 application.

Every server in bench/run.sh serves this same app (except the bare trio + h11
reference loop, which writes the same bytes without ASGI); ``/block?s=N`` blocks the
serving worker's loop (bench/reliability.py). It awaits nothing but
``receive``/``send``, so it runs unchanged on Trio and on asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = b"Hello, World!"
assert len(BODY) == 13


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    kind = scope["type"]
    if kind == "http":
        if scope["path"] == "/block":  # bench/reliability.py's "blocked" experiment:
            # this worker's loop blocks for s seconds (at most 120), as a careless
            # handler's blocking call would
            seconds = float(scope["query_string"].decode().partition("s=")[2] or 0)
            time.sleep(min(seconds, 120.0))
        # A fresh headers list per response: a server may extend it in place.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")],
            }
        )
        await send({"type": "http.response.body", "body": BODY})
    elif kind == "lifespan":
        # Bounded: a lifespan conversation is startup then shutdown; stop at shutdown
        # or when the server hangs up (it sends nothing else).
        for _ in range(16):
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    else:
        raise RuntimeError(f"hello_app: unsupported scope type {kind!r}")
