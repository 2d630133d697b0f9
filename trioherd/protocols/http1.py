"""HTTP/1.1 in the worker: one task per connection, an h11 state machine, no task per request.

The layout: this module reads requests (h11) and owns the connection, its deadlines and
its errors; ``protocols.framing`` turns a response into bytes (sans I/O) and holds the keep-alive
decision; an adapter (``apps.native``, ``apps.asgi``), chosen once per worker, runs the app for
one request and writes its response through :meth:`HTTPConnection.send_complete`, or
:meth:`HTTPConnection.head` and :meth:`HTTPConnection.send` with ``framing.body`` and
``framing.end``.

Timeouts, as deadlines the worker's sweeper enforces (``ServerState.sweep`` and
``HTTPConnection.expire``: it interrupts the connection's wait on a raw socket, and
cancels the connection's scope under TLS):
- idle: waiting for the first byte of a request (``keep_alive_timeout``; during a drain the
  short drain grace instead, so a request already on its way is still served);
- head: from the first byte of a request to the end of its head (``header_timeout``, not
  reset by further bytes: a client trickling bytes cannot hold the connection longer); 408;
- body: the gap between two reads of the request body (``header_timeout``); 408;
- send: a response the client takes none of (``send_timeout``); the connection is reset.

Idle crowds: at 90 % of ``max_connections`` the sweeper closes idle keep-alive
connections, the longest idle first, until fewer than 80 % are open (counted in
``Stats.shed``, a heartbeat counter: ``trioherd_connections_shed_total``).

Errors: an h11 protocol error becomes the status h11 hints (400, 431, ...) and a closed
connection; an exception in the app becomes a 500 if nothing was sent yet, else the
connection is dropped; either way one log line with the traceback and the worker goes on.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import h11
import trio

from .closing import STREAM_ERRORS, close_stream, queued_bytes
from .forwarded import apply as apply_forwarded
from .framing import Fields, ResponseFraming, header_list, reason
from .rawstream import RECEIVE_SIZE, RawSocketStream
from .state import APP, BODY, HEAD, IDLE, SEND, Phase, ServerState

log = logging.getLogger("trioherd.http")
access_log = logging.getLogger("trioherd.access")

SEND_PIECE = 65536  # over TLS a response is sent in pieces of this size (see write)
SOON_MAX = 16384  # answers up to this size may be handed to the flusher (send_soon)
_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 finds the end of a head
_NO_SCOPE = trio.CancelScope()  # never entered: cancelling it does nothing
_FORWARDED = frozenset((b"forwarded", b"x-forwarded-for", b"x-forwarded-proto"))


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
                if _chunk_left(conn) > limit - self.received:  # never wait for what we refuse
                    raise BodyTooLarge(self.received + _chunk_left(conn))
                await http.receive_body()
                continue
            kind = type(event)
            if kind is h11.Data:
                data = bytes(event.data)  # type: ignore[union-attr]
                self.received += len(data)
                if self.received > limit or (
                    event.chunk_start  # type: ignore[union-attr]
                    and _chunk_left(conn) > limit - self.received
                ):
                    raise BodyTooLarge(self.received)
                return data
            if kind is h11.EndOfMessage:
                self.done = True
                return b""
            if event is h11.PAUSED:  # the client offered a protocol switch: we do not take it
                self.done = True
                return b""
            raise ClientGone()


def _head_buffered(conn: h11.Connection) -> bool:
    """The bytes received after the head of the request ``conn`` read hold the whole head
    of another, pipelined, request (asked only of a request without a body)."""
    return _HEAD_END.search(conn.trailing_data[0].lstrip(b"\r\n")) is not None


def _chunk_left(conn: h11.Connection) -> int:
    """What is left of the chunk h11 is reading: the size its chunk-size line announced,
    less what was delivered (0 between chunks, or for a body that is not chunked). h11
    keeps it in its reader's ``_bytes_in_chunk``; without that, 0 (the limit is then
    enforced on the bytes as they arrive)."""
    left = getattr(getattr(conn, "_reader", None), "_bytes_in_chunk", 0)
    return left if type(left) is int else 0


# where h11 is done with a request: DONE; MUST_CLOSE (its whole body was read, and the
# connection closes after the response: HTTP/1.0, Connection: close); or a protocol
# switch offered that we decline
_REQUEST_DONE = (h11.DONE, h11.MUST_CLOSE, h11.MIGHT_SWITCH_PROTOCOL)  # type: ignore[attr-defined]


class RequestHead(Protocol):
    """The request line, as an adapter reads it: h11's Request has it, and so would the
    request of another parser."""

    @property
    def method(self) -> bytes: ...

    @property
    def target(self) -> bytes: ...

    @property
    def http_version(self) -> bytes: ...


class Adapter(Protocol):
    """An app interface (native, ASGI), chosen once per worker: runs the app for one
    request and writes its response through the connection; returns the status, for the
    counters and the access log. Raises what the app raised; BodyTooLarge or ClientGone
    from the body; ClientGone for a response it could not finish."""

    async def __call__(self, http: HTTPConnection, request: RequestHead) -> int: ...


class HTTPConnection:
    """Serves the requests of one connection until it closes.

    h11 parses each request (a fresh h11 state machine per request, fed the bytes left over
    from the one before, so pipelining works); responses are framed by ResponseFraming,
    directly as bytes, with the framing HTTP/1.1 asks for: that skips most of h11's
    per-event bookkeeping, which costs more than the parsing itself.
    """

    __slots__ = (
        "adapter",
        "bodyless",
        "client",
        "conn",
        "counted",
        "deadline",
        "expired",
        "framing",
        "headers",
        "leftover",
        "peer",
        "phase",
        "raw",
        "request",
        "response_started",
        "scheme",
        "scope",
        "send_mark",
        "sent_continue",
        "served",
        "server",
        "stalled_in",
        "started",
        "state",
        "stream",
        "tls",
        "upgrade",
    )

    def __init__(
        self,
        state: ServerState,
        adapter: Adapter,
        stream: trio.abc.Stream,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None = None,
        scheme: str = "http",
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.state = state
        self.adapter = adapter
        self.stream = stream
        self.client = self.peer = client  # client: as a trusted proxy may report it
        self.server = server
        self.scheme = scheme
        self.tls = tls
        self.conn: h11.Connection = self._fresh(b"")
        self.framing = ResponseFraming()
        self.response_started = False
        self.sent_continue = False
        self.phase = IDLE
        self.deadline = math.inf
        self.expired: Phase | None = None
        # a raw socket says when a send stalls (send_stalled) and its deadlines interrupt
        # its waits; other streams are timed in write() and their deadlines cancel a scope
        self.raw = raw = stream if isinstance(stream, RawSocketStream) else None
        self.scope = _NO_SCOPE if raw is not None else trio.CancelScope()
        self.request: RequestHead | None = None
        self.headers: Fields = []
        self.bodyless = False
        self.leftover = False
        self.counted = False
        self.started = 0.0
        self.served = 0  # requests read on this connection
        self.send_mark = -1  # what the kernel held for the client at the last look
        self.stalled_in = APP  # the phase a stalled send came from (send_stalled)
        if raw is not None:
            raw.watch = self

    def expire(self) -> bool:
        """The current phase ran out of time: end whatever the connection awaits (a raw
        socket's wait, see RawSocketStream.interrupt; else its cancel scope). False if the
        raw socket's task is not waiting: not expired, it runs and moves on."""
        raw = self.raw
        if raw is not None and not raw.interrupt():
            return False
        self.expired = self.phase
        self.deadline = math.inf
        self.scope.cancel()
        return True

    # -- the parser: h11 here; a subclass may read some requests another way (httptools) --

    def _fresh(self, leftover: bytes) -> h11.Connection:
        """The parser of the next request, given the bytes of it already received."""
        conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.state.config.max_header_size
        )
        if leftover:
            conn.receive_data(leftover)
        return conn

    def _feed(self, data: bytes) -> Any:
        """Parse received bytes: the next event (a request, or h11.NEED_DATA)."""
        self.conn.receive_data(data)
        return self.conn.next_event()

    def _next_buffered(self) -> Any:
        """The next event from the bytes already received."""
        return self.conn.next_event()

    # -- I/O helpers -------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Send part of the response (from now on, no other response can be given)."""
        self.response_started = True
        await self.write(data)

    async def write(self, data: bytes) -> None:
        self.state.stats.bytes_out += len(data)
        if self.raw is not None:
            await self.raw.send_all(data)
        else:
            await _send_timed(self, data)

    def send_stalled(self) -> None:
        """The raw socket's buffer is full, and the client took what it could since the
        last stall: it has ``send_timeout`` to take more (see ServerState.sweep). (An
        answer left by ``send_soon`` stalls in IDLE: that wait begins anew after it.)"""
        if self.phase != SEND:
            self.stalled_in = self.phase
        self.phase = SEND
        self.send_mark = -1
        self.deadline = trio.current_time() + self.state.config.send_timeout

    def check_send(self, now: float) -> None:
        """A send is waiting: if the kernel's queue for the client changed since the last
        look, the client took some, and ``send_timeout`` starts again. (Writability alone
        would not say: it comes only once a third of the send buffer is free, which
        takes a slow reader longer than the timeout with a big buffer.)"""
        queued = queued_bytes(self.stream)
        if queued != self.send_mark:
            self.send_mark = queued
            self.deadline = now + self.state.config.send_timeout

    def send_resumed(self) -> None:
        """The send that stalled is complete."""
        if self.stalled_in == IDLE:
            self.phase = IDLE
            self.deadline = trio.current_time() + self.state.idle_wait()
        else:
            self.phase = APP
            self.deadline = math.inf

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
            try:
                if self.raw is not None:  # deadlines end its waits (expire): no scope needed
                    linger = await self._serve_requests()
                else:
                    with self.scope:
                        linger = await self._serve_requests()
            except STREAM_ERRORS:
                if self.expired not in (HEAD, BODY):
                    raise
            if self.expired in (HEAD, BODY):
                linger = await _answer_expired(self)
        except h11.RemoteProtocolError as exc:
            await self.answer_late(exc.error_status_hint, str(exc))
            linger = True
        except STREAM_ERRORS:
            pass
        finally:
            state.connections.discard(self)
            await close_stream(self.stream, linger, reset=self.expired == SEND)

    async def _serve_requests(self) -> bool:
        """Serve requests until the connection ends; True if its close must linger: after
        an error answer, or with bytes of the client's we leave unread (see _close)."""
        while True:
            event = await self._read_head()
            if event is None or type(event) is h11.ConnectionClosed:
                return False
            self.served += 1
            if not await self._serve_request(event):
                return True
            conn = self.conn
            if not self.bodyless and conn.their_state not in _REQUEST_DONE:
                # usually just h11's EndOfMessage; else read and drop the rest (bounded by
                # max_body_size and header_timeout), even before a close: a client that
                # sends its whole body before it reads would meet a reset otherwise
                tail = conn.next_event()
                if type(tail) is not h11.EndOfMessage and tail is not h11.PAUSED:
                    if not await _discard_body(self):
                        return True  # linger: read what comes for a moment, then close
                if conn.their_state not in _REQUEST_DONE:
                    return True
            # RFC 9112 2.2: blank lines before a request line are to be ignored
            leftover = conn.trailing_data[0].lstrip(b"\r\n")
            if not self.framing.keep_alive:
                # pipelined requests we will not read, or more of them still on the way
                limit = self.state.config.max_requests_per_connection
                return bool(leftover) or (bool(limit) and self.served >= limit)
            self.leftover = bool(leftover)
            self.conn = self._fresh(leftover)

    async def _read_head(self) -> Any:
        """The next request (h11's Request, or a RequestHead another parser read), or at the
        end h11.ConnectionClosed or None."""
        # nothing of the request to come is known, counted or sent yet
        self.request = None
        self.response_started = False
        self.counted = False
        self.started = 0.0
        self.framing.head_only = False  # an answer before a head (400, 408) has a body
        state = self.state
        config = state.config
        if self.leftover:  # bytes of the next request came with the last one
            event = self._next_buffered()
            if event is not h11.NEED_DATA:  # pipelined: already here, but others go first
                await trio.lowlevel.cancel_shielded_checkpoint()
                self.phase = APP
                return event
            self.phase = HEAD
            self.deadline = trio.current_time() + config.header_timeout
        else:
            self.phase = IDLE
            self.deadline = state.now() + state.idle_wait()
        stream = self.stream
        # after a response on a raw socket, wait for the next request before reading
        raw = self.raw
        receive = raw.receive_next if self.served and raw is not None else stream.receive_some
        while True:
            data = bytes(await receive(RECEIVE_SIZE))
            first = self.phase == IDLE  # the first bytes of the request
            if first:
                if not data:
                    return None
                data = data.lstrip(b"\r\n")  # RFC 9112 2.2: blank lines are ignored
                if not data:
                    continue
                self.phase = HEAD
            state.stats.bytes_in += len(data)
            event = self._feed(data)
            if event is not h11.NEED_DATA:
                self.phase = APP
                self.deadline = math.inf
                return event
            if first:  # the head's deadline, unless it all came at once (the usual case)
                self.deadline = trio.current_time() + config.header_timeout

    async def _serve_request(self, request: RequestHead) -> bool:
        """Run the app for one request; False if the connection must end at once."""
        self.request = request
        self.started = self.started_at()
        self.headers = headers = header_list(request)
        refusal = self._check_head(request, headers)
        if refusal is not None:
            await self._reject(*refusal)
            return False
        sent_before = self.state.stats.bytes_out
        self.sent_continue = False
        status = 500
        try:
            status = await self.adapter(self, request)
        except BodyTooLarge:
            status = 413
            await self._send_error(413, "request body too large")
            return False
        except ClientGone:
            status = 499  # the client went away before the response was complete
            return False
        except h11.RemoteProtocolError as exc:  # a malformed body, read by the app
            status = exc.error_status_hint
            await self._send_error(status, str(exc))
            return False
        except STREAM_ERRORS:
            status = 499  # the client went away under us
            raise
        except Exception:
            log.exception(
                "app raised on %s %s", request.method.decode(), request.target.decode("latin-1")
            )
            status = 500
            await self._send_error(500, None)  # unless a response began: it cannot be mended
            return False
        finally:
            expired = self.expired  # a 408 is answered and counted by run()
            if expired is None or expired == SEND:  # a client that took nothing: 499
                status = 499 if expired == SEND else status
                self.count(request, status, self.state.stats.bytes_out - sent_before)
        return True

    def _check_head(self, request: RequestHead, headers: Fields) -> tuple[int, str] | None:
        """Measure the request's head against the limits: the error to answer, or None.

        Also notes whether the request has a body, and makes the request's keep-alive
        decision (the response can only turn it off: see ResponseFraming)."""
        config = self.state.config
        # h11 bounds a head that arrives in pieces; one that arrives whole is measured here
        size = len(request.method) + len(request.target) + 12
        content_length = None
        chunked = close = upgrade = forwarded = False
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
            elif name == b"upgrade":
                upgrade = True
            elif name in _FORWARDED:
                forwarded = True
        peer = self.peer  # its forwarded headers are believed if it is trusted
        trusted = forwarded and (peer is None or peer[0] in self.state.trusted)
        if trusted or self.client is not peer:
            own = "https" if self.tls is not None else "http"  # this request's, or none
            self.client, self.scheme = (
                apply_forwarded(headers, peer, own, self.state.trusted)
                if forwarded
                else (peer, own)
            )
        self.upgrade = upgrade  # asks to switch protocols: a WebSocket? (see protocols.websocket)
        self.bodyless = bodyless = not chunked and not content_length
        version = request.http_version
        limit = config.max_requests_per_connection
        self.framing.begin(
            request.method == b"HEAD",
            not (
                close
                or self.state.draining
                or version != b"1.1"
                # RFC 9112 6.1: both lengths: answer, then close (a smuggling guard)
                or (chunked and content_length is not None)
                # after a 2xx the bytes that follow are a tunnel's, never HTTP requests
                or request.method == b"CONNECT"
                # the last request; but pipelined requests already here are answered too
                or (
                    limit and self.served >= limit and not (bodyless and _head_buffered(self.conn))
                )
            ),
        )
        if version != b"1.1" and version != b"1.0":  # HTTP/2's preface "PRI * HTTP/2.0" too
            return (505, f"HTTP/{version.decode('ascii', 'replace')} not supported")
        if len(headers) > config.max_header_count:
            return (431, "too many header fields")
        if size > config.max_header_size:
            return (431, "request head too large")
        if content_length is not None and content_length > config.max_body_size:
            return (413, "request body too large")
        return None

    def count(self, request: RequestHead | None, status: int, sent: int) -> None:
        """Count a request once (stats, access log)."""
        if self.counted:
            return
        self.counted = True
        stats = self.state.stats
        stats.requests += 1
        stats.status[status // 100 if status < 600 else 5] += 1
        if self.state.on_request is not None:
            self.state.on_request()
        if self.started:
            _access_log(self, request, status, sent)

    # -- responses -------------------------------------------------------------------------

    # The response must be the connection's last during a drain, and when the client waits
    # for 100-continue and is answered without its body being read: it may not send it,
    # so the connection cannot go on (RFC 9110 10.1.1). Written out in both methods below:
    # this is the hot path, and a call costs more than the test.

    def head(self, status: int, headers: Fields, length: int | None) -> bytes:
        """The response head (see ResponseFraming.head); the body follows through
        ``framing.body`` and ``framing.end``."""
        close = self.state.draining or (
            not self.bodyless and self.conn.they_are_waiting_for_100_continue
        )
        return self.framing.head(status, headers, length, close)

    async def send_complete(self, status: int, headers: Sequence[Any], body: bytes) -> None:
        """A response whose body is known: head and body in one send_all."""
        close = self.state.draining or (
            not self.bodyless and self.conn.they_are_waiting_for_100_continue
        )
        data = self.framing.complete(status, headers, body, close)
        # a small answer on a connection that goes on: the worker's flusher writes it with
        # the other answers of this pass, and this task goes straight back to waiting; the
        # connection's last answer goes at once (RawSocketStream.send_final)
        last = not self.framing.keep_alive
        raw = self.raw
        if raw is not None and (last or (len(data) <= SOON_MAX and raw.send_soon(data))):
            self.response_started = True
            self.state.stats.bytes_out += len(data)
            if last:
                await raw.send_final(data)
            return
        await self.send(data)

    async def _reject(self, status: int, detail: str) -> None:
        """An error answer to a request the app never saw; counted and logged like any."""
        if self.response_started:
            return
        before = self.state.stats.bytes_out
        self.started = self.started or self.started_at()
        await self._send_error(status, detail)
        self.count(self.request, status, self.state.stats.bytes_out - before)

    async def answer_late(self, status: int, detail: str) -> None:
        """An error answer after the connection's scope has ended, in a scope of its own
        that the sweeper can cancel too: a client that does not read gets send_timeout."""
        self.scope = trio.CancelScope()
        if self.raw is not None:
            self.raw.resume()
        with self.scope:
            await self._reject(status, detail)

    def started_at(self) -> float:
        return time.perf_counter() if self.state.config.access_log else 0.0

    async def _send_error(self, status: int, detail: str | None) -> None:
        if self.response_started:
            return
        body = b"%d %s\n" % (status, reason(status))
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        try:
            await self.send(self.framing.complete(status, headers, body, close=True))
        except STREAM_ERRORS:
            pass
        if detail:
            log.debug("%d to %s: %s", status, self.client, detail)


async def _discard_body(http: HTTPConnection) -> bool:
    """Read and drop an unread request body so the connection can be reused."""
    if http.conn.they_are_waiting_for_100_continue and not http.sent_continue:
        return False  # never told them to send it: closing is cheaper than reading it
    reader = BodyReader(http)
    try:
        while await reader.next_chunk():
            pass
    except (BodyTooLarge, ClientGone):
        return False
    return True


async def _answer_expired(http: HTTPConnection) -> bool:
    """The request's head or body did not come in time: 408, unless a response has begun
    (then it is only counted). True: the close lingers."""
    if http.response_started:  # too late to say so: count it, then drop
        http.count(http.request, 408, 0)
    else:
        what = "head" if http.expired == HEAD else "body"
        await http.answer_late(408, f"request {what} not received in time")
    return True


def _access_log(http: HTTPConnection, request: RequestHead | None, status: int, sent: int) -> None:
    """The access-log line of one request (``--access-log``)."""
    client = f"{http.client[0]}:{http.client[1]}" if http.client else "-"
    line = (
        f"{request.method.decode()} {request.target.decode('latin-1')} "
        f"HTTP/{request.http_version.decode()}"
        if request is not None
        else "-"
    )
    duration = (time.perf_counter() - http.started) * 1000
    access_log.info(
        '%s "%s" %d %d %.1fms w%d',
        client,
        line,
        status,
        sent,
        duration,
        http.state.worker_id,
        extra={  # the fields of a JSON access-log line (--log-format json)
            "method": request.method.decode() if request is not None else None,
            "path": request.target.decode("latin-1") if request is not None else None,
            "status": status,
            "duration_ms": round(duration, 3),
            "client": client,
            "bytes": sent,
        },
    )


async def _send_timed(http: HTTPConnection, data: bytes) -> None:
    """Send over a stream that cannot say when it stalls (TLS): in pieces, each of which
    must go within ``send_timeout``; the sweeper also watches the kernel's queue."""
    stream = http.stream
    timeout = http.state.config.send_timeout
    http.phase = SEND
    http.send_mark = -1
    try:
        if len(data) <= SEND_PIECE:
            http.deadline = trio.current_time() + timeout
            await stream.send_all(data)
        else:
            view = memoryview(data)
            for start in range(0, len(data), SEND_PIECE):
                http.deadline = trio.current_time() + timeout
                await stream.send_all(view[start : start + SEND_PIECE])
    finally:
        http.phase = APP
        http.deadline = math.inf
