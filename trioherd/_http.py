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
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11
import trio

from ._app import Headers, Request, Response
from ._config import Config
from ._rawstream import RawSocketStream

log = logging.getLogger("trioherd.http")
access_log = logging.getLogger("trioherd.access")

RECEIVE_SIZE = 65536
DRAIN_GRACE = 1.0
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024
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
        self.connections: set[HTTPConnection] = set()
        self.asgi_state: dict[str, Any] = {}
        self.on_request: Callable[[], None] | None = None
        shortest = min(config.keep_alive_timeout or 1.0, config.header_timeout, 1.0)
        self.sweep_interval = max(0.01, shortest / 4)

    def start_draining(self) -> None:
        """From now on responses carry ``Connection: close``; idle connections get the
        short drain grace for a request that may already be on its way, then close."""
        self.draining = True
        deadline = trio.current_time() + self.drain_grace
        for connection in self.connections:
            if connection.phase == IDLE:
                connection.deadline = min(connection.deadline, deadline)

    async def sweep(self) -> None:
        """Enforce every connection's phase deadline (idle, head, body).

        One timer task per worker instead of a cancel scope per read: the hot path only
        writes a number. A deadline is enforced within ``sweep_interval`` of passing.
        """
        while True:
            await trio.sleep(self.sweep_interval)
            now = trio.current_time()
            for connection in self.connections:
                if connection.deadline <= now:
                    connection.expire()


# Phases of a connection, each with its own deadline (see ServerState.sweep)
IDLE, HEAD, BODY, APP = range(4)


class BodyTooLarge(Exception):
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
        if conn.they_are_waiting_for_100_continue and not http.sent_continue:
            http.sent_continue = True
            if not http.response_started:  # no 1xx once a final response has begun
                await http.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        limit = http.state.config.max_body_size
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                await http.receive_body()
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
            if event is h11.PAUSED:  # the client offered a protocol switch: we do not take it
                self.done = True
                return b""
            raise ClientGone()


_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")  # h11's rules
# where h11 is done with a request: DONE, or a protocol switch offered that we decline
_REQUEST_DONE = (h11.DONE, h11.MIGHT_SWITCH_PROTOCOL)  # type: ignore[attr-defined]


class InvalidResponse(Exception):
    """The app asked for a response HTTP cannot carry (a bad header, a wrong length)."""


class HTTPConnection:
    """Serves the requests of one connection until it closes.

    h11 parses each request (a fresh h11 state machine per request, fed the bytes left over
    from the one before, so pipelining works); responses are written here, directly as
    bytes, with the framing HTTP/1.1 asks for: that skips most of h11's per-event
    bookkeeping, which costs more than the parsing itself.
    """

    __slots__ = (
        "_bodyless_status",
        "_chunked",
        "_head_only",
        "_remaining",
        "app",
        "asgi",
        "bodyless",
        "client",
        "conn",
        "counted",
        "deadline",
        "expired",
        "headers",
        "keep_alive",
        "leftover",
        "phase",
        "request",
        "response_started",
        "scheme",
        "scope",
        "sent_continue",
        "server",
        "started",
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
        self.conn = self._new_parser()
        self.keep_alive = True
        self.response_started = False
        self.sent_continue = False
        self._head_only = False
        self._chunked = False
        self._bodyless_status = False
        self._remaining: int | None = None
        self.phase = IDLE
        self.deadline = math.inf
        self.expired: int | None = None
        self.scope = trio.CancelScope()
        self.request: h11.Request | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.bodyless = False
        self.leftover = False
        self.counted = False
        self.started = 0.0

    def expire(self) -> None:
        """The current phase ran out of time: cancel whatever the connection awaits."""
        self.expired = self.phase
        self.deadline = math.inf
        self.scope.cancel()

    def _new_parser(self) -> h11.Connection:
        return h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.state.config.max_header_size
        )

    # -- I/O helpers -------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Send part of the response (from now on, no other response can be given)."""
        self.response_started = True
        await self.write(data)

    async def write(self, data: bytes) -> None:
        self.state.stats.bytes_out += len(data)
        await self.stream.send_all(data)

    async def receive_body(self) -> None:
        """Read more of a request body; each read must come within ``header_timeout``."""
        self.phase = BODY
        self.deadline = trio.current_time() + self.state.config.header_timeout
        data = await self.stream.receive_some(RECEIVE_SIZE)
        self.phase = APP
        self.deadline = math.inf
        self.state.stats.bytes_in += len(data)
        self.conn.receive_data(bytes(data))

    # -- the connection loop -------------------------------------------------------------

    async def run(self) -> None:
        state = self.state
        state.connections.add(self)
        linger = False
        try:
            with self.scope:
                linger = await self._serve_requests()
            if self.scope.cancelled_caught and self.expired in (HEAD, BODY):
                what = "head" if self.expired == HEAD else "body"
                if self.response_started:  # too late to say so: count it, then drop
                    self._count(self.request, 408, 0)
                else:
                    await self._reject(408, f"request {what} not received in time")
                linger = True
        except h11.RemoteProtocolError as exc:
            await self._reject(exc.error_status_hint, str(exc))
            linger = True
        except _STREAM_ERRORS:
            pass
        finally:
            state.connections.discard(self)
            await self._close(linger)

    async def _serve_requests(self) -> bool:
        """Serve requests until the connection ends; True if it ended in an error."""
        per_connection = self.state.config.max_requests_per_connection
        served = 0
        while True:
            event = await self._read_head()
            if type(event) is not h11.Request:
                return False
            served += 1
            self.keep_alive = not (
                self.state.draining or (per_connection and served >= per_connection)
            )
            if not await self._serve_request(event):
                return True
            conn = self.conn
            if not self.bodyless and conn.their_state not in _REQUEST_DONE:
                # usually just h11's EndOfMessage; else read and drop the rest (bounded by
                # max_body_size and header_timeout), even before a close: a client that
                # sends its whole body before it reads would meet a reset otherwise
                tail = conn.next_event()
                if type(tail) is not h11.EndOfMessage and tail is not h11.PAUSED:
                    if not await self._discard_body():
                        return True  # linger: read what comes for a moment, then close
                if conn.their_state not in _REQUEST_DONE:
                    return False
            if not self.keep_alive:
                return False
            # RFC 9112 2.2: blank lines before a request line are to be ignored
            leftover = conn.trailing_data[0].lstrip(b"\r\n")
            self.conn = self._new_parser()
            self.leftover = bool(leftover)
            if leftover:
                self.conn.receive_data(leftover)

    async def _read_head(self) -> h11.Request | h11.ConnectionClosed | None:
        # nothing of the request to come is known, counted or sent yet
        self.request = None
        self.response_started = False
        self.counted = False
        self._head_only = False
        self.started = 0.0
        conn = self.conn
        state = self.state
        config = state.config
        if self.leftover:  # bytes of the next request came with the last one
            event = conn.next_event()
            if event is not h11.NEED_DATA:  # pipelined: already here, but others go first
                await trio.lowlevel.cancel_shielded_checkpoint()
                self.phase = APP
                return event  # type: ignore[return-value]
            self.phase = HEAD
            self.deadline = trio.current_time() + config.header_timeout
        else:
            self.phase = IDLE
            wait = state.drain_grace if state.draining else config.keep_alive_timeout
            self.deadline = trio.current_time() + wait
        stream = self.stream
        while True:
            data = await stream.receive_some(RECEIVE_SIZE)
            if self.phase == IDLE:
                if not data:
                    return None
                data = bytes(data).lstrip(b"\r\n")  # RFC 9112 2.2: blank lines are ignored
                if not data:
                    continue
                self.phase = HEAD
                self.deadline = trio.current_time() + config.header_timeout
            state.stats.bytes_in += len(data)
            conn.receive_data(bytes(data))
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                self.phase = APP
                self.deadline = math.inf
                return event  # type: ignore[return-value]

    async def _serve_request(self, request: h11.Request) -> bool:
        """Run the app for one request; False if the connection must end at once."""
        config = self.state.config
        self.request = request
        self.started = self.started_at()
        self._head_only = request.method == b"HEAD"
        self.headers = headers = header_list(request)
        if len(headers) > config.max_header_count:
            await self._reject(431, "too many header fields")
            return False
        # h11 bounds a head that arrives in pieces; one that arrives whole is measured here
        size = len(request.method) + len(request.target) + 12
        content_length = None
        chunked = False
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        self.bodyless = not chunked and not content_length
        if chunked and content_length is not None:
            self.keep_alive = False  # RFC 9112 6.1: answer, then close (smuggling guard)
        if size > config.max_header_size:
            await self._reject(431, "request head too large")
            return False
        if content_length is not None and content_length > config.max_body_size:
            await self._reject(413, "request body too large")
            return False
        sent_before = self.state.stats.bytes_out
        self.sent_continue = False
        if request.http_version != b"1.1" or _wants_close(headers):
            self.keep_alive = False
        status = 500
        try:
            if self.asgi:
                status = await self._call_asgi(request)
            else:
                status = await self._call_native(request)
        except BodyTooLarge:
            status = 413
            if not self.response_started:
                await self._send_error(413, "request body too large")
            return False
        except ClientGone:
            status = 499  # the client went away before the response was complete
            return False
        except h11.RemoteProtocolError as exc:  # a malformed body, read by the app
            status = exc.error_status_hint
            await self._send_error(status, str(exc))
            return False
        except _STREAM_ERRORS:
            status = 499  # the client went away under us
            raise
        except Exception:
            log.exception(
                "app raised on %s %s", request.method.decode(), request.target.decode("latin-1")
            )
            status = 500
            if self.response_started:
                return False  # a half-sent response cannot be repaired
            await self._send_error(500, None)
            return False
        finally:
            if self.expired is None:  # else run() answers 408 and counts it
                self._count(request, status, self.state.stats.bytes_out - sent_before)
        return True

    def _count(self, request: h11.Request | None, status: int, sent: int) -> None:
        """Count a request once (stats, access log)."""
        if self.counted:
            return
        self.counted = True
        started_at = self.started
        stats = self.state.stats
        stats.requests += 1
        stats.status[min(status // 100, 5)] += 1
        if self.state.on_request is not None:
            self.state.on_request()
        if started_at:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            line = (
                f"{request.method.decode()} {request.target.decode('latin-1')} "
                f"HTTP/{request.http_version.decode()}"
                if request is not None
                else "-"
            )
            access_log.info(
                '%s "%s" %d %d %.1fms w%d',
                client,
                line,
                status,
                sent,
                (time.perf_counter() - started_at) * 1000,
                self.state.worker_id,
            )

    async def _discard_body(self) -> bool:
        """Read and drop an unread request body so the connection can be reused."""
        if self.conn.they_are_waiting_for_100_continue and not self.sent_continue:
            return False  # never told them to send it: closing is cheaper than reading it
        reader = BodyReader(self)
        try:
            while await reader.next_chunk():
                pass
        except (BodyTooLarge, ClientGone):
            return False
        return True

    # -- responses -------------------------------------------------------------------------

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> bytes:
        """The response head. ``length``: the body size, or None for a body of unknown
        length (chunked, or close-delimited for an HTTP/1.0 client). Raises
        InvalidResponse for what HTTP/1.1 cannot carry, before anything is sent."""
        if not 200 <= status <= 999:  # 1xx are interim, never the answer
            raise InvalidResponse(f"invalid response status {status!r}")
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
        has_date = has_server = False
        declared: int | None = None
        connection: bytes | None = None
        for name, value in headers:
            lowered = name.lower()
            if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                raise InvalidResponse(f"invalid response header {name!r}: {value!r}")
            if lowered == b"date":
                has_date = True
            elif lowered == b"server":
                has_server = True
            elif lowered == b"connection":
                connection = value
                if b"close" in value.lower():
                    self.keep_alive = False
                continue  # merged with ours below
            elif lowered == b"content-length":
                if not value.isdigit() or (declared is not None and int(value) != declared):
                    raise InvalidResponse(f"invalid content-length {value!r}")
                if declared is not None:
                    continue  # the same value twice: send it once
                declared = int(value)
                if status == 204:
                    continue  # RFC 9110 8.6: never on a 204
            elif lowered == b"transfer-encoding":
                if value.lower() != b"chunked":
                    raise InvalidResponse(f"unsupported transfer-encoding {value!r}")
                continue  # we add our own when we chunk
            parts.append(b"%s: %s\r\n" % (name, value))
        if not has_date:
            parts.append(b"date: %s\r\n" % http_date())
        if not has_server:
            parts.append(b"server: trioherd\r\n")
        if self.state.draining or (
            # the client waits for 100-continue and we answer without reading the body:
            # it may not send it, so this connection cannot go on (RFC 9110 10.1.1)
            not self.bodyless and self.conn.they_are_waiting_for_100_continue
        ):
            self.keep_alive = False
        self._bodyless_status = bodyless = status in (204, 304)
        self._chunked = False
        self._remaining = None
        if bodyless:
            self._remaining = 0
        elif declared is not None:
            # HEAD: the app may declare the GET's length and send nothing (Starlette does)
            if length is not None and length != declared and not (self._head_only and not length):
                raise InvalidResponse(f"content-length {declared} but a body of {length}")
            self._remaining = declared
        elif length is not None:
            parts.append(b"content-length: %d\r\n" % length)
            self._remaining = length
        elif self.keep_alive:
            parts.append(b"transfer-encoding: chunked\r\n")
            self._chunked = True
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif connection is not None:
            parts.append(b"connection: %s\r\n" % connection)
        parts.append(b"\r\n")
        if self._head_only or bodyless:
            self._remaining = 0
            self._chunked = False
        return b"".join(parts)

    def _body(self, data: bytes) -> bytes:
        """Frame a piece of body (none for HEAD, 204 and 304)."""
        if not data or self._head_only or self._bodyless_status:
            return b""
        if self._chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        if self._remaining is not None:
            if len(data) > self._remaining:
                raise InvalidResponse("body longer than its content-length")
            self._remaining -= len(data)
        return data

    def _end(self) -> bytes:
        if self._chunked:
            return b"0\r\n\r\n"
        if self._remaining and not self._head_only:
            raise InvalidResponse("body shorter than its content-length")
        return b""

    async def _send_complete(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """Head + body in one send_all."""
        data = self._head(status, headers, len(body))
        if body and not self._head_only and not self._bodyless_status:
            data += body
        await self.send(data)

    async def _reject(self, status: int, detail: str) -> None:
        """An error answer to a request the app never saw; counted and logged like any."""
        if self.response_started:
            return
        before = self.state.stats.bytes_out
        self.started = self.started or self.started_at()
        await self._send_error(status, detail)
        self._count(self.request, status, self.state.stats.bytes_out - before)

    def started_at(self) -> float:
        return time.perf_counter() if self.state.config.access_log else 0.0

    async def _send_error(self, status: int, detail: str | None) -> None:
        if self.response_started:
            return
        self.keep_alive = False
        body = b"%d %s\n" % (status, _REASONS.get(status, b""))
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        try:
            await self._send_complete(status, headers, body)
        except _STREAM_ERRORS:
            pass
        if detail:
            log.debug("%d to %s: %s", status, self.client, detail)

    async def _close(self, linger: bool) -> None:
        """Close the connection; after an error, read what the client still sends for a
        moment first, so that the kernel does not answer it with a reset that would destroy
        our error response before the client reads it."""
        stream = self.stream
        if isinstance(stream, RawSocketStream | trio.SocketStream):
            if linger:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + LINGER_SECONDS):
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
            if isinstance(stream, RawSocketStream):
                stream.close()  # nothing to flush or say: no need for a cancel scope
            else:
                await trio.aclose_forcefully(stream)
            return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + LINGER_SECONDS):
            try:
                await stream.aclose()  # TLS: try to say goodbye (close_notify), briefly
            except (OSError, *_STREAM_ERRORS):
                pass
        await trio.aclose_forcefully(stream)

    # -- native apps -------------------------------------------------------------------------

    def _request(self, request: h11.Request) -> Request:
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        return Request(
            method=request.method.decode("ascii"),
            path=unquote(path) if "%" in path else path,
            query=query,
            headers=Headers(self.headers),
            client=self.client,
            http_version=request.http_version.decode("ascii"),
            scheme=self.scheme,
            tls=self.tls,
            reader=BodyReader(self),
        )

    async def _call_native(self, request: h11.Request) -> int:
        response = await self.app(self._request(request))
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
        status = response.status
        if isinstance(body, bytes | bytearray | memoryview):
            await self._send_complete(status, headers, bytes(body))
            return status
        await self.send(self._head(status, headers, None))
        if self._head_only or self._remaining == 0:
            if hasattr(body, "aclose"):
                await body.aclose()
        else:
            async for chunk in body:
                if chunk:
                    await self.send(self._body(bytes(chunk)))
        end = self._end()
        if end:
            await self.send(end)
        return status

    # -- ASGI apps -------------------------------------------------------------------------

    async def _call_asgi(self, request: h11.Request) -> int:
        target = request.target
        path, _, query = target.partition(b"?")
        text_path = path.decode("latin-1")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": self.scheme,
            "path": unquote(text_path) if "%" in text_path else text_path,
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": self.headers,
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
                    head_sent = True
                    if not more:
                        await self._send_complete(status, pending_head, body)
                        response_done.set()
                        return
                    data = self._head(status, pending_head, None) + self._body(body)
                else:
                    data = self._body(body)
                if not more:
                    data += self._end()
                    response_done.set()
                if data:
                    await self.send(data)
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r}")

        try:
            await self.app(scope, receive, send)
        finally:
            complete = response_done.is_set()
            response_done.set()
        if not head_sent:
            raise RuntimeError("ASGI app returned without sending a response")
        if not complete:
            raise ClientGone()  # the app stopped mid-body: the response is incomplete
        return status


def header_list(request: h11.Request) -> list[tuple[bytes, bytes]]:
    """The request's (lower-case name, value) pairs as a plain list.

    h11's Headers is a Sequence whose iteration goes through ``__getitem__`` one item at a
    time; its own list of items is read directly when it is there (it is in h11 0.14 to
    0.16), which makes a measurable difference at thousands of requests a second."""
    items = getattr(request.headers, "_full_items", None)
    if isinstance(items, list):
        return [(name, value) for _, name, value in items]
    return list(request.headers)


def _wants_close(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"connection" and b"close" in value.lower():
            return True
    return False


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
