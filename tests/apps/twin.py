"""ASGI twins of the native test apps, so the HTTP, TLS, limits and chaos tests run on the
asyncio runtime too (it serves ASGI apps): ``apps.twin:chaos_apps.app`` is
``apps.chaos_apps:app`` behind an ASGI front. The twin turns the scope into the native
``Request`` (its body read through ``receive``) and the native ``Response`` into ASGI
messages: a body known in full in one message, an async iterator piece by piece. An app
that is already ASGI is returned as it is. (``helpers.runtime_app`` names them.)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from trioherd import Request
from trioherd.apps.loading import Headers
from trioherd.apps.native import response_parts

ASGI = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def asgi(native: Callable[[Request], Awaitable[Any]]) -> ASGI:
    """The ASGI app that serves what ``native`` answers."""
    if len(inspect.signature(native).parameters) == 3:
        return native  # type: ignore[return-value]  # an ASGI app already

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # no lifespan

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return

        request = Request(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode("latin-1"),
            headers=Headers(list(scope["headers"])),
            client=scope["client"],
            http_version=scope["http_version"],
            scheme=scope["scheme"],
            tls=scope.get("trioherd.tls"),
            reader=body(),
        )
        response = await native(request)
        await respond(send, response)

    return app


async def respond(send: Any, response: Any) -> None:
    """Send a native answer (a Response, bytes or str) as ASGI messages."""
    status, headers, body = response_parts(response)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if isinstance(body, bytes):
        await send({"type": "http.response.body", "body": body})
        return
    async for chunk in body:
        if chunk:
            await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class _Twins:
    """The twins of one module's apps, by attribute."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> ASGI:
        return asgi(getattr(self._module, name))


def __getattr__(name: str) -> _Twins:
    return _Twins(importlib.import_module(f"apps.{name}"))
