"""The app interfaces of a WebSocket: the native API (a ``Request``'s Upgrade) and the
ASGI ``websocket`` scope (spec 2.4, with the ``websocket.http.response`` extension), on
top of one :class:`~trioherd.protocols.websocket.WebSocket` session. Loaded by a worker's
first request that asks for a WebSocket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from ..protocols.framing import Fields
from ..protocols.h1core import ClientGone, Exchange
from ..protocols.http1 import HTTPConnection
from ..protocols.websocket import Upgrade
from ..protocols.ws_handshake import read_handshake, refuse
from ..protocols.ws_session import ABNORMAL, NORMAL, WebSocketClosed

# -- the app interfaces -------------------------------------------------------------------


class ASGIHost(Protocol):
    """What the ASGI adapter lends: the app, and the ``http`` scope of a request."""

    app: Callable[..., Awaitable[None]]

    def http_scope(self, http: HTTPConnection, request: Exchange) -> dict[str, Any]: ...


class NativeHost(Protocol):
    """The native adapter, called again with the request's Upgrade."""

    async def __call__(
        self, http: HTTPConnection, request: Exchange, upgrade: Any = None
    ) -> int: ...


async def serve_native(adapter: NativeHost, http: HTTPConnection, request: Exchange) -> int:
    """Serve a request that may ask for a WebSocket; 0 if it does not (plain HTTP)."""
    handshake = read_handshake(http, request)
    if handshake is None:
        return 0
    http.framing.keep_alive = False  # after a WebSocket, or a refusal, the connection ends
    if handshake.refusal is not None:
        return await refuse(http, *handshake.refusal)
    upgrade = Upgrade(http, handshake, http.exchange.client)
    status = 0

    async def app() -> None:
        nonlocal status
        status = await adapter(http, request, upgrade)

    await upgrade.run(app, request.target)
    return 101 if upgrade.websocket is not None else status


async def serve_asgi(adapter: ASGIHost, http: HTTPConnection, request: Exchange) -> int:
    """Serve a request that may ask for a WebSocket with a ``websocket`` scope; 0 if it
    does not (plain HTTP)."""
    handshake = read_handshake(http, request)
    if handshake is None:
        return 0
    http.framing.keep_alive = False
    if handshake.refusal is not None:
        return await refuse(http, *handshake.refusal)
    upgrade = Upgrade(http, handshake, http.exchange.client)
    scope = adapter.http_scope(http, request)
    scope["type"] = "websocket"
    scope["asgi"] = {"version": "3.0", "spec_version": "2.4"}
    scope["scheme"] = "wss" if http.exchange.scheme == "https" else "ws"
    del scope["method"]
    scope["subprotocols"] = handshake.subprotocols
    scope.setdefault("extensions", {})["websocket.http.response"] = {}
    exchange = ASGIWebSocket(upgrade)
    app = adapter.app
    await upgrade.run(lambda: app(scope, exchange.receive, exchange.send), request.target)
    if upgrade.websocket is not None:
        return 101
    if not exchange.status:
        raise RuntimeError("ASGI app returned without accepting or refusing the WebSocket")
    if not exchange.answered.is_set():
        raise ClientGone()  # the app stopped in the middle of its HTTP response
    return exchange.status


class ASGIWebSocket:
    """The ``receive`` and ``send`` of one ASGI ``websocket`` scope (spec 2.4, with the
    ``websocket.http.response`` extension)."""

    __slots__ = ("answered", "connected", "pending", "status", "upgrade")

    def __init__(self, upgrade: Upgrade) -> None:
        self.upgrade = upgrade
        self.connected = False  # websocket.connect was received
        self.status = 0  # the HTTP status the app answered with instead (403, a denial)
        self.pending: Fields | None = None  # websocket.http.response.start's headers
        self.answered = trio.Event()  # accepted, or the HTTP answer is complete

    async def receive(self) -> dict[str, Any]:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        websocket = self.upgrade.websocket
        if websocket is None:
            await self.answered.wait()
            websocket = self.upgrade.websocket
            if websocket is None:
                return {"type": "websocket.disconnect", "code": ABNORMAL, "reason": ""}
        try:
            message = await websocket.receive()
        except WebSocketClosed as closed:
            return {"type": "websocket.disconnect", "code": closed.code, "reason": closed.reason}
        if type(message) is str:
            return {"type": "websocket.receive", "text": message}
        return {"type": "websocket.receive", "bytes": message}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        websocket = self.upgrade.websocket
        if kind == "websocket.send" and websocket is not None:
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
                if data is None:
                    raise RuntimeError("websocket.send without bytes or text")
            await websocket.send(data)
        elif kind == "websocket.close":
            if websocket is not None:
                await websocket.close(
                    int(message.get("code") or NORMAL), message.get("reason") or ""
                )
            elif not self.status:  # before accepting: 403, and no WebSocket
                self.status = 403
                await refuse(self.upgrade.http, 403, "the app closed the WebSocket", [])
                self.answered.set()
        elif kind == "websocket.accept" and websocket is None and not self.status:
            headers = [(bytes(n), bytes(v)) for n, v in message.get("headers") or ()]
            await self.upgrade.accept(message.get("subprotocol"), headers)
            self.answered.set()
        elif kind == "websocket.http.response.start" and websocket is None and not self.status:
            self.status = int(message["status"])
            self.pending = [(bytes(n), bytes(v)) for n, v in message.get("headers") or ()]
        elif kind == "websocket.http.response.body" and self.status and websocket is None:
            await self._deny(bytes(message.get("body", b"")), bool(message.get("more_body")))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in this WebSocket state")

    async def _deny(self, body: bytes, more: bool) -> None:
        """Part of the HTTP response the app answers with instead of accepting."""
        if self.answered.is_set():
            return
        http = self.upgrade.http
        if self.pending is not None:
            headers, self.pending = self.pending, None
            if not more:
                await http.send_complete(self.status, headers, body)
                self.answered.set()
                return
            data = http.head(self.status, headers, None) + http.framing.body(body)
        else:
            data = http.framing.body(body)
        if not more:
            data += http.framing.end()
            self.answered.set()
        if data:
            await http.send(data)
