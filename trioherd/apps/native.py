"""The native app interface: ``async def app(request: Request) -> Response``.

:class:`NativeAdapter` turns the request head into a :class:`~trioherd.Request` (whose body
is read from the connection on demand) and the app's :class:`~trioherd.Response` (or bytes,
or str) into bytes on the wire: a body known in full goes out with its head in one send, an
async iterator is streamed (chunked, or with the length the app declared).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from ..protocols.framing import Fields
from ..protocols.h1core import Exchange
from ..protocols.http1 import BodyReader, HTTPConnection
from .loading import Headers, Request, Response


class NativeAdapter:
    """Serves a native app; one per worker (see ``protocols.http1.Adapter``)."""

    __slots__ = ("app",)

    def __init__(self, app: Callable[[Request], Awaitable[Any]]) -> None:
        self.app = app

    async def __call__(self, http: HTTPConnection, request: Exchange, upgrade: Any = None) -> int:
        if request.upgrade and upgrade is None:  # maybe a WebSocket (its module loaded only then)
            from .websocket import serve_native

            status = await serve_native(self, http, request)  # calls us with its Upgrade
            if status:
                return status
        response = await self.app(make_request(http, request, upgrade))
        if upgrade is not None and upgrade.websocket is not None:
            return 101  # the app accepted the WebSocket: what it returned is not sent
        status, headers, body = response_parts(response)
        if isinstance(body, bytes):
            await http.send_complete(status, headers, body)
        else:
            await _stream(http, status, headers, body)
        return status


def response_parts(response: Any) -> tuple[int, Fields, bytes | AsyncIterable[bytes]]:
    """What a native app returned (a Response, bytes or str) as status, header fields
    (with its content type) and a body: bytes, or an async iterator of them."""
    if not isinstance(response, Response):
        if isinstance(response, bytes | str):
            response = Response(response)
        else:
            raise TypeError(f"app returned {response!r}, not a trioherd.Response")
    raw = response.headers
    items = raw.items() if isinstance(raw, dict) else raw
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in items]
    body = response.body
    content_type = response.content_type
    if isinstance(body, str):
        body = body.encode()
        content_type = content_type or "text/plain; charset=utf-8"
    if content_type:
        headers.append((b"content-type", content_type.encode("latin-1")))
    if isinstance(body, bytearray | memoryview):
        body = bytes(body)
    return response.status, headers, body


def make_request(http: HTTPConnection, request: Exchange, upgrade: Any = None) -> Request:
    """The native Request for a request read on ``http`` (``upgrade``: the WebSocket
    handshake it asks for, ``protocols.websocket.Upgrade``)."""
    target = request.target.decode("latin-1")
    path, _, query = target.partition("?")
    return Request(
        method=request.method.decode("ascii"),
        path=unquote(path) if "%" in path else path,
        query=query,
        headers=Headers(request.headers),
        client=request.client,
        http_version=request.http_version.decode("ascii"),
        scheme=request.scheme,
        tls=http.tls,
        reader=BodyReader(http),
        upgrade=upgrade,
    )


async def _stream(
    http: HTTPConnection, status: int, headers: Fields, body: AsyncIterable[bytes]
) -> None:
    """A body of unknown length, sent as the app produces it (each piece at once)."""
    await http.send(http.head(status, headers, None))
    framing = http.framing
    if not framing.wants_body():  # HEAD, 204, 304, a declared length of 0
        if hasattr(body, "aclose"):
            await body.aclose()
    else:
        async for chunk in body:
            if chunk:
                await http.send(framing.body(bytes(chunk)))
    end = framing.end()
    if end:
        await http.send(end)
