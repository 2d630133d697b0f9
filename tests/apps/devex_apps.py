"""Apps for tests/test_devex.py: output printed by the app, a plain ``def`` app, an ASGI app
that reports to the primary while it boots."""

from __future__ import annotations

import sys
from typing import Any

import trioherd


async def printer(request: trioherd.Request) -> trioherd.Response:
    """Prints to stdout (one line) and stderr (two lines, one write) on every request."""
    print(f"hello stdout {request.path}")
    print("hello stderr\nsecond line", file=sys.stderr)
    return trioherd.Response("printed")


def sync_app(request: trioherd.Request) -> trioherd.Response:  # not async: refused at boot
    return trioherd.Response("never served")


async def announcing(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: sends ``{"booted": <worker id>}`` to the primary during lifespan startup,
    before the worker is ready, so before anyone can have subscribed to herd.messages()."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                worker = trioherd.current_worker()
                assert worker is not None
                await trioherd.send_to_primary({"booted": worker.id})
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def asyncio_at_startup(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: its lifespan startup needs asyncio (as an asyncpg pool would)."""
    import asyncio

    if scope["type"] == "lifespan":
        await receive()
        asyncio.get_running_loop()  # under Trio without --asyncio: RuntimeError
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
