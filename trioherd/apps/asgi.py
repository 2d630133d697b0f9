"""The ASGI 3 app interface for requests: the ``http`` scope (lifespan is ``apps.lifespan``).

:class:`ASGIAdapter` builds the scope of each request and runs the app with the
``receive``/``send`` pair of an :class:`ASGIExchange`, which holds that one request's
state: the body reader, the response status and head, whether the response is done.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from ..protocols.framing import as_fields
from ..protocols.h1core import ClientGone, Exchange
from ..protocols.h1driver import BodyReader, H1Driver

ASGIApp = Callable[..., Awaitable[None]]
Message = dict[str, Any]

_TLS_CODES = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

# the scope's text of common methods and versions, and of recent targets (path, raw_path,
# query_string): the same few come again and again (bounded: short targets only, and
# emptied when full)
_NAMES = {
    name.encode(): name
    for name in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "1.1", "1.0")
}
_TARGETS: dict[bytes, tuple[str, bytes, bytes]] = {}
_TARGETS_MAX = 256
_TARGET_MAX = 256


class ASGIAdapter:
    """Serves an ASGI 3 app; one per worker (see ``protocols.http1.Adapter``).

    ``lifespan_state`` is the dict lifespan startup filled; each request's scope gets a
    shallow copy of it, as the spec asks. ``websockets``: an upgrade to a WebSocket is
    served (``apps.websocket``, on the Trio runtime); without it, such a request is an
    ``http`` request like any.
    """

    __slots__ = ("app", "lifespan_state", "websockets")

    def __init__(
        self, app: ASGIApp, lifespan_state: dict[str, Any], websockets: bool = True
    ) -> None:
        self.app = app
        self.lifespan_state = lifespan_state
        self.websockets = websockets

    async def __call__(self, http: H1Driver, request: Exchange) -> int:
        if request.upgrade and self.websockets:  # a "websocket" scope (loaded only then)
            from ..protocols.http1 import HTTPConnection
            from .websocket import serve_asgi

            assert isinstance(http, HTTPConnection)
            status = await serve_asgi(self, http, request)
            if status:
                return status
        exchange = ASGIExchange(http)
        try:
            await self.app(self.http_scope(http, request), exchange.receive, exchange.send)
        finally:
            complete = exchange.complete
            exchange.finish()
        if not exchange.head_sent:
            raise RuntimeError("ASGI app returned without sending a response")
        if not complete:
            raise ClientGone()  # the app stopped mid-body: the response is incomplete
        return exchange.status

    def http_scope(self, http: H1Driver, request: Exchange) -> dict[str, Any]:
        target = request.target
        parts = _TARGETS.get(target)
        if parts is None:
            raw_path, _, query = target.partition(b"?")
            text = raw_path.decode("latin-1")
            parts = (unquote(text) if "%" in text else text, raw_path, query)
            if len(target) <= _TARGET_MAX:
                if len(_TARGETS) >= _TARGETS_MAX:
                    _TARGETS.clear()
                _TARGETS[target] = parts
        version = request.http_version
        method = request.method
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": _NAMES.get(version) or version.decode("ascii"),
            "method": _NAMES.get(method) or method.decode("ascii"),
            "scheme": request.scheme,
            "path": parts[0],
            "raw_path": parts[1],
            "query_string": parts[2],
            "root_path": "",
            "headers": request.headers,
            "client": request.client,
            "server": http.server,
            "state": dict(self.lifespan_state),
        }
        if http.tls is not None:
            scope["extensions"] = {"tls": _asgi_tls(http.tls)}
            scope["trioherd.tls"] = http.tls
        return scope


class ASGIExchange:
    """The ``receive`` and ``send`` of one request."""

    __slots__ = ("_ended", "complete", "head_sent", "http", "pending_head", "reader", "status")

    def __init__(self, http: H1Driver) -> None:
        self.http = http
        self.reader: BodyReader | None = None  # made by the first receive
        self.complete = False  # the response is complete (or the app has returned)
        self._ended: Any = None  # the runtime's event, made for a receive that waits for it
        self.status = 0
        self.pending_head: tuple[Any, ...] | None = None  # from http.response.start
        self.head_sent = False

    async def receive(self) -> Message:
        reader = self.reader
        if reader is None:
            reader = self.reader = BodyReader(self.http)
        if not reader.done:
            chunk = await reader.next_chunk()
            return {"type": "http.request", "body": chunk, "more_body": not reader.done}
        if self.complete:
            await self.http.checkpoint()
        else:
            if self._ended is None:
                self._ended = self.http.event()
            await self._ended.wait()
        return {"type": "http.disconnect"}

    def finish(self) -> None:
        """The response is complete, or the app has returned: a receive that waits for
        the request's end gets ``http.disconnect`` now."""
        self.complete = True
        if self._ended is not None:
            self._ended.set()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.pending_head is not None or self.head_sent:
                raise RuntimeError("ASGI app sent http.response.start twice")
            self.status = int(message["status"])
            # the app's pairs, unconverted (see ResponseFraming.complete), read once
            self.pending_head = tuple(message.get("headers", ()))
        elif kind == "http.response.body":
            if self.complete:
                return
            http = self.http
            body = message.get("body", b"")
            if type(body) is not bytes:
                body = bytes(body)
            more = bool(message.get("more_body"))
            if not self.head_sent:
                if self.pending_head is None:
                    raise RuntimeError("ASGI app sent a body before http.response.start")
                self.head_sent = True
                if not more:  # the whole response at once: one send_all
                    await http.send_complete(self.status, self.pending_head, body)
                    self.finish()
                    return
                head = http.head(self.status, as_fields(self.pending_head), None)
                data = head + http.framing.body(body)
            else:
                data = http.framing.body(body)
            if not more:
                data += http.framing.end()
                self.finish()
            if data:
                await http.send(data)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")


def _asgi_tls(info: dict[str, Any]) -> dict[str, Any]:
    """The ASGI TLS extension's view of a connection."""
    return {
        "server_cert": None,
        "client_cert_chain": [],
        "client_cert_name": info.get("peer_subject"),
        "client_cert_error": None,
        "tls_version": _TLS_CODES.get(info.get("version") or ""),
        "cipher_suite": None,
    }
