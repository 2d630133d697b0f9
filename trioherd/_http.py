"""HTTP/1.1 in the worker: one task per connection, an h11 state machine, no task per request.

Timeouts, all cancel scopes in the connection's own task:
- idle: waiting for the first byte of a request (``keep_alive_timeout``; during a drain the
  short drain grace instead, so a request already on its way is still served);
- head: from the first byte of a request to the end of its head (``header_timeout``, not
  reset by further bytes: a client trickling bytes cannot hold the connection longer); 408;
- body: the gap between two reads of the request body (``header_timeout``); 408.

Errors: an h11 protocol error becomes the status h11 hints (400, 431, ...) and a closed
connection; an exception in the app becomes a 500 if nothing was sent yet, else the
connection is dropped; either way one log line with the traceback and the worker goes on.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11
import trio

from ._app import Headers, Request, Response
from ._config import Config

log = logging.getLogger("trioherd.http")
access_log = logging.getLogger("trioherd.access")

RECEIVE_SIZE = 65536
DRAIN_GRACE = 1.0
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024
SERVER_HEADER = (b"server", b"trioherd")
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_date_second = 0
_date_value = b""


def http_date() -> bytes:
    """The Date header value, formatted once per second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = email.utils.formatdate(now, usegmt=True).encode()
    return _date_value


class Stats:
    """Counters of one worker, sent to the primary with every heartbeat."""

    __slots__ = ("bytes_in", "bytes_out", "requests", "status")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = [0, 0, 0, 0, 0, 0]  # index = status // 100

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "status": {f"{i}xx": n for i, n in enumerate(self.status) if i and n},
        }


class ServerState:
    """What every connection of one worker shares: config, stats, the drain switch."""

    def __init__(self, config: Config, worker_id: int = 0) -> None:
        self.config = config
        self.worker_id = worker_id
        self.stats = Stats()
        self.draining = False
        self.drain_grace = min(DRAIN_GRACE, config.graceful_timeout)
        self.idle_scopes: set[trio.CancelScope] = set()
        self.asgi_state: dict[str, Any] = {}
        self.on_request: Callable[[], None] | None = None

    def start_draining(self) -> None:
        """From now on responses carry ``Connection: close``; idle connections get the
        short drain grace for a request that may already be on its way, then close."""
        self.draining = True
        deadline = trio.current_time() + self.drain_grace
        for scope in self.idle_scopes:
            scope.deadline = min(scope.deadline, deadline)


class BodyTooLarge(Exception):
    pass


class RequestTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


class BodyReader:
    """Async iterator over the request body, reading from the connection on demand."""

    __slots__ = ("_http", "done", "received")

    def __init__(self, http: HTTPConnection) -> None:
        self._http = http
        self.received = 0
        self.done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            chunk = await self.next_chunk()
            if chunk:
                yield chunk

    async def next_chunk(self) -> bytes:
        """The next piece of body (b"" once it is complete)."""
        http = self._http
        conn = http.conn
        if self.done:
            return b""
        if conn.they_are_waiting_for_100_continue:
            await http.send(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        limit = http.state.config.max_body_size
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                await http.receive(http.state.config.header_timeout, RequestTimeout)
                continue
            kind = type(event)
            if kind is h11.Data:
                data = bytes(event.data)  # type: ignore[union-attr]
                self.received += len(data)
                if self.received > limit:
                    raise BodyTooLarge(self.received)
                return data
            if kind is h11.EndOfMessage:
                self.done = True
                return b""
            raise ClientGone()


class HTTPConnection:
    """Serves the requests of one connection until it closes."""

    __slots__ = (
        "_response_started",
        "app",
        "asgi",
        "client",
        "conn",
        "scheme",
        "server",
        "state",
        "stream",
        "tls",
    )

    def __init__(
        self,
        state: ServerState,
        app: Callable[..., Awaitable[Any]],
        asgi: bool,
        stream: trio.abc.Stream,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None = None,
        scheme: str = "http",
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.state = state
        self.app = app
        self.asgi = asgi
        self.stream = stream
        self.client = client
        self.server = server
        self.scheme = scheme
        self.tls = tls
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=state.config.max_header_size
        )
        self._response_started = False

    # -- I/O helpers -------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        self.state.stats.bytes_out += len(data)
        await self.stream.send_all(data)

    async def receive(self, timeout: float, error: type[Exception]) -> None:
        with trio.move_on_after(timeout) as scope:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        if scope.cancelled_caught:
            raise error()
        self.state.stats.bytes_in += len(data)
        self.conn.receive_data(bytes(data))

    # -- the connection loop -------------------------------------------------------------

    async def run(self) -> None:
        conn = self.conn
        config = self.state.config
        per_connection = config.max_requests_per_connection
        served = 0
        linger = False
        try:
            while True:
                event = await self._read_head()
                if type(event) is not h11.Request:
                    break
                served += 1
                close = self.state.draining or (per_connection and served >= per_connection)
                keep_going = await self._serve_request(event, bool(close))
                if not keep_going or conn.our_state is not h11.DONE:
                    linger = conn.our_state is h11.MUST_CLOSE and conn.their_state is not h11.DONE
                    break
                if conn.their_state is not h11.DONE and not await self._discard_body():
                    linger = True
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._send_error(exc.error_status_hint, str(exc))
            linger = True
        except RequestTimeout:
            await self._send_error(408, "request head not received in time")
            linger = True
        except _STREAM_ERRORS:
            pass
        finally:
            await self._close(linger)

    async def _read_head(self) -> h11.Request | h11.ConnectionClosed | None:
        conn = self.conn
        state = self.state
        config = state.config
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        started = bool(conn.trailing_data[0])
        head_deadline = trio.current_time() + config.header_timeout if started else math.inf
        while True:
            if started:
                deadline = head_deadline
            else:
                wait = state.drain_grace if state.draining else config.keep_alive_timeout
                deadline = trio.current_time() + wait
            with trio.CancelScope(deadline=deadline) as scope:
                if started:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                else:
                    state.idle_scopes.add(scope)
                    try:
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                    finally:
                        state.idle_scopes.discard(scope)
            if scope.cancelled_caught:
                if started:
                    raise RequestTimeout()
                return None  # idle too long, or drained: close quietly
            if not started and data:
                started = True
                head_deadline = trio.current_time() + config.header_timeout
            state.stats.bytes_in += len(data)
            conn.receive_data(bytes(data))
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]

    async def _serve_request(self, request: h11.Request, close: bool) -> bool:
        """Run the app for one request; False if the connection must end now."""
        config = self.state.config
        if len(request.headers) > config.max_header_count:
            await self._send_error(431, "too many header fields")
            return False
        for name, value in request.headers:
            if name == b"content-length":
                if int(value) > config.max_body_size:
                    await self._send_error(413, "request body too large")
                    return False
                break
        started_at = time.perf_counter() if config.access_log else 0.0
        self._response_started = False
        status = 500
        try:
            if self.asgi:
                status = await self._call_asgi(request, close)
            else:
                status = await self._call_native(request, close)
        except BodyTooLarge:
            status = 413
            if not self._response_started:
                await self._send_error(413, "request body too large")
            return False
        except RequestTimeout:
            status = 408
            if not self._response_started:
                await self._send_error(408, "request body not received in time")
            return False
        except ClientGone:
            return False
        except _STREAM_ERRORS:
            raise
        except Exception:
            log.exception(
                "app raised on %s %s", request.method.decode(), request.target.decode("latin-1")
            )
            if self._response_started:
                return False  # a half-sent response cannot be repaired
            await self._send_error(500, None, linger=False)
            status = 500
        finally:
            self._count(request, status, started_at)
        return True

    def _count(self, request: h11.Request, status: int, started_at: float) -> None:
        stats = self.state.stats
        stats.requests += 1
        stats.status[min(status // 100, 5)] += 1
        if self.state.on_request is not None:
            self.state.on_request()
        if started_at:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            access_log.info(
                '%s "%s %s HTTP/%s" %d %.1fms w%d',
                client,
                request.method.decode(),
                request.target.decode("latin-1"),
                request.http_version.decode(),
                status,
                (time.perf_counter() - started_at) * 1000,
                self.state.worker_id,
            )

    async def _discard_body(self) -> bool:
        """Read and drop an unread request body so the connection can be reused."""
        conn = self.conn
        if conn.they_are_waiting_for_100_continue:
            return False  # never told them to send it: closing is cheaper than reading it
        reader = BodyReader(self)
        try:
            while await reader.next_chunk():
                pass
        except (BodyTooLarge, RequestTimeout, ClientGone):
            return False
        return True

    # -- responses -------------------------------------------------------------------------

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], close: bool) -> bytes:
        has_date = has_server = False
        for name, _ in headers:
            lowered = name.lower()
            if lowered == b"date":
                has_date = True
            elif lowered == b"server":
                has_server = True
        if not has_date:
            headers.append((b"date", http_date()))
        if not has_server:
            headers.append(SERVER_HEADER)
        if close:
            headers.append((b"connection", b"close"))
        self._response_started = True
        response = h11.Response(
            status_code=status, headers=headers, reason=_REASONS.get(status, b"")
        )
        return self.conn.send(response)

    def _no_body(self, status: int) -> bool:
        return status in (204, 304) or self.conn._request_method == b"HEAD"

    async def _send_complete(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, close: bool
    ) -> None:
        """Head + body in one send_all."""
        conn = self.conn
        if self._no_body(status):
            data = self._head(status, headers, close) + conn.send(h11.EndOfMessage())
        else:
            data = self._head(status, headers, close)
            if body:
                data += conn.send(h11.Data(data=body))
            data += conn.send(h11.EndOfMessage())
        await self.send(data)

    async def _send_error(self, status: int, detail: str | None, linger: bool = True) -> None:
        conn = self.conn
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = b"%d %s\n" % (status, _REASONS.get(status, b""))
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        try:
            await self._send_complete(status, headers, body, close=True)
        except (h11.LocalProtocolError, *_STREAM_ERRORS):
            pass
        if detail:
            log.debug("%d to %s: %s", status, self.client, detail)

    async def _close(self, linger: bool) -> None:
        """Close the connection; after an error, read what the client still sends for a
        moment first, so that the kernel does not answer it with a reset that would destroy
        our error response before the client reads it."""
        stream = self.stream
        with trio.CancelScope(shield=True, deadline=trio.current_time() + LINGER_SECONDS):
            if linger and isinstance(stream, trio.SocketStream):
                try:
                    await stream.send_eof()
                    drained = 0
                    while drained < LINGER_BYTES:
                        data = await stream.receive_some(RECEIVE_SIZE)
                        if not data:
                            break
                        drained += len(data)
                except (OSError, *_STREAM_ERRORS):
                    pass
            try:
                await stream.aclose()
            except (OSError, *_STREAM_ERRORS):
                pass
        if not isinstance(stream, trio.SocketStream):
            await trio.aclose_forcefully(stream)

    # -- native apps -------------------------------------------------------------------------

    def _request(self, request: h11.Request) -> Request:
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        return Request(
            method=request.method.decode("ascii"),
            path=unquote(path),
            query=query,
            headers=Headers(request.headers),  # type: ignore[arg-type]
            client=self.client,
            http_version=request.http_version.decode("ascii"),
            scheme=self.scheme,
            tls=self.tls,
            reader=BodyReader(self),
        )

    async def _call_native(self, request: h11.Request, close: bool) -> int:
        response = await self.app(self._request(request))
        if not isinstance(response, Response):
            if isinstance(response, bytes | str):
                response = Response(response)
            else:
                raise TypeError(f"app returned {response!r}, not a trioherd.Response")
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in (
                response.headers.items()
                if isinstance(response.headers, dict)
                else response.headers
            )
        ]
        body = response.body
        content_type = response.content_type
        if isinstance(body, str):
            body = body.encode()
            content_type = content_type or "text/plain; charset=utf-8"
        if content_type:
            headers.append((b"content-type", content_type.encode("latin-1")))
        status = response.status
        if isinstance(body, bytes | bytearray | memoryview):
            headers.append((b"content-length", str(len(body)).encode()))
            await self._send_complete(status, headers, bytes(body), close)
            return status
        await self.send(self._head(status, headers, close))
        if not self._no_body(status):
            async for chunk in body:
                if chunk:
                    await self.send(self.conn.send(h11.Data(data=chunk)))
        elif hasattr(body, "aclose"):
            await body.aclose()
        await self.send(self.conn.send(h11.EndOfMessage()))
        return status

    # -- ASGI apps -------------------------------------------------------------------------

    async def _call_asgi(self, request: h11.Request, close: bool) -> int:
        target = request.target
        path, _, query = target.partition(b"?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": self.scheme,
            "path": unquote(path.decode("latin-1")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": request.headers,
            "client": self.client,
            "server": self.server,
            "state": dict(self.state.asgi_state),
        }
        if self.tls is not None:
            scope["extensions"] = {"tls": _asgi_tls(self.tls)}
            scope["trioherd.tls"] = self.tls
        reader = BodyReader(self)
        response_done = trio.Event()
        status = 0
        pending_head: list[tuple[bytes, bytes]] | None = None
        head_sent = False

        async def receive() -> dict[str, Any]:
            if not reader.done:
                chunk = await reader.next_chunk()
                return {"type": "http.request", "body": chunk, "more_body": not reader.done}
            await response_done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, pending_head, head_sent
            kind = message["type"]
            if kind == "http.response.start":
                if pending_head is not None or head_sent:
                    raise RuntimeError("ASGI app sent http.response.start twice")
                status = int(message["status"])
                pending_head = [(bytes(n), bytes(v)) for n, v in message.get("headers", ())]
            elif kind == "http.response.body":
                if response_done.is_set():
                    return
                body = bytes(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if not head_sent:
                    if pending_head is None:
                        raise RuntimeError("ASGI app sent a body before http.response.start")
                    headers = pending_head
                    head_sent = True
                    if not more:
                        if not any(n.lower() == b"content-length" for n, _ in headers):
                            headers.append((b"content-length", str(len(body)).encode()))
                        await self._send_complete(status, headers, body, close)
                        response_done.set()
                        return
                    await self.send(self._head(status, headers, close))
                if body and not self._no_body(status):
                    await self.send(self.conn.send(h11.Data(data=body)))
                if not more:
                    await self.send(self.conn.send(h11.EndOfMessage()))
                    response_done.set()
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r}")

        try:
            await self.app(scope, receive, send)
        finally:
            response_done.set()
        if not head_sent:
            if not self._response_started:
                raise RuntimeError("ASGI app returned without sending a response")
        elif self.conn.our_state is h11.SEND_BODY:
            raise ClientGone()  # the app stopped mid-body: the response is incomplete
        return status


_TLS_CODES = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


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
