"""HTTP/1.1 without I/O: what one connection has read, what it decides, and its deadlines.

The core of a connection (:class:`H1Core`) is fed the bytes its runtime received and says
what they are (a request head, more needed, the end); it measures each head against the
limits, applies trusted forwarded headers, makes the keep-alive decision, and says what
follows a response (the next request, or the end and how). It owns no socket, no task
and no timer: its deadlines are numbers, computed from the clock its worker's
:class:`~.shared.Shared` state gives (``now``), and a runtime enforces them. The Trio
runtime's connection (``protocols.http1.HTTPConnection``) extends this class with the
reads and the writes; another runtime (asyncio) would extend it the same way.

Each request gets its own :class:`Exchange`, made when its head is read: the request
line, its fields, the client and scheme they report, and what was sent of its response.
The core keeps only what lives across requests: the parser, the response framing, the
number of requests served, and the phase of the connection's current wait with its
deadline (:class:`~.shared.Phase`; the sweeper reads them).

The parser is h11 (a fresh state machine per request, fed the bytes left over from the
one before, so pipelining works); ``protocols.httptools`` overrides the three parser
hooks (:meth:`H1Core.fresh`, :meth:`H1Core.feed`, :meth:`H1Core.next_buffered`) to read
plain heads with llhttp.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Protocol

import h11

from .forwarded import apply as apply_forwarded
from .framing import Fields, ResponseFraming, header_list
from .shared import APP, HEAD, IDLE, Phase, Shared

access_log = logging.getLogger("trioherd.access")

_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 finds the end of a head
_FORWARDED = frozenset((b"forwarded", b"x-forwarded-for", b"x-forwarded-proto"))
# where h11 is done with a request: DONE; MUST_CLOSE (its whole body was read, and the
# connection closes after the response: HTTP/1.0, Connection: close); or a protocol
# switch offered that we decline
_REQUEST_DONE = (h11.DONE, h11.MUST_CLOSE, h11.MIGHT_SWITCH_PROTOCOL)  # type: ignore[attr-defined]

NEED_DATA = h11.NEED_DATA


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class RequestHead(Protocol):
    """The request line, as an adapter reads it: h11's Request has it, an
    :class:`Exchange` has it, and so would the request of another parser."""

    @property
    def method(self) -> bytes: ...

    @property
    def target(self) -> bytes: ...

    @property
    def http_version(self) -> bytes: ...


class Parser(Protocol):
    """What the core and its runtime use of a request's parser: h11's Connection, or a
    stand-in for one that has read a whole request already (``protocols.httptools.Head``)."""

    @property
    def their_state(self) -> object: ...

    @property
    def they_are_waiting_for_100_continue(self) -> bool: ...

    @property
    def trailing_data(self) -> tuple[bytes, bool]: ...

    def next_event(self) -> Any: ...

    def receive_data(self, data: bytes) -> None: ...


class Exchange:
    """One request and its response: made when the request's head is read, done when
    the connection moves on to the next. Its request line and fields, the client and
    scheme (as a trusted proxy may report them), whether it has a body or asks to switch
    protocols, and what has happened to its response (begun, counted, 100 Continue, a
    protocol switched to)."""

    __slots__ = (
        "bodyless",
        "client",
        "counted",
        "headers",
        "http_version",
        "method",
        "response_started",
        "scheme",
        "sent_continue",
        "started",
        "switched",
        "target",
        "upgrade",
    )

    def __init__(
        self,
        head: RequestHead | None,
        headers: Fields,
        client: tuple[str, int] | None,
        scheme: str,
        bodyless: bool = True,
        upgrade: bool = False,
    ) -> None:
        """``head`` None: an answer (400, 408) to a request whose head was never read."""
        if head is None:
            self.method = self.target = self.http_version = b""
        else:
            self.method = head.method
            self.target = head.target
            self.http_version = head.http_version
        self.headers = headers
        self.client = client
        self.scheme = scheme
        self.bodyless = bodyless
        self.upgrade = upgrade
        self.response_started = False
        self.sent_continue = False
        self.counted = False
        self.started = 0.0  # time.perf_counter() when read, for the access log (or 0)
        self.switched = False  # the connection now speaks another protocol (a WebSocket)


# where a connection waits for a request: an answer given before a head is read (400,
# 408) makes an Exchange of its own first (H1Core.unread)
_NO_REQUEST = Exchange(None, [], None, "")


def _head_buffered(conn: Parser) -> bool:
    """The bytes received after the head of the request ``conn`` read hold the whole head
    of another, pipelined, request (asked only of a request without a body)."""
    return _HEAD_END.search(conn.trailing_data[0].lstrip(b"\r\n")) is not None


_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@]*@)?([^/?#@]+)([^#]*)(?:#.*)?", re.S)


def _other_form(exchange: Exchange) -> bool:
    """A target that is not a path: ``*`` (asterisk-form) and CONNECT's authority-form are
    left as they are; one in absolute form (``GET http://host/path HTTP/1.1``, RFC 9112
    3.2.2) gives the request its path and query as target (``/`` if it has none), and
    the target's authority as its Host field (the received Host is ignored, as the RFC
    asks). False if the target is none of these."""
    if exchange.target == b"*" or exchange.method == b"CONNECT":
        return True
    match = _ABSOLUTE.fullmatch(exchange.target)
    if match is None:
        return False
    authority, rest = match.groups()
    exchange.target = rest if rest.startswith(b"/") else b"/" + rest
    headers = exchange.headers
    for index, (name, _) in enumerate(headers):
        if name == b"host":
            headers[index] = (b"host", authority)
            break
    else:
        headers.append((b"host", authority))
    return True


def bare_lf_line(conn: Parser) -> bool:
    """The next line of a chunked body that the parser waits for (a chunk-size line, the
    last chunk) ends in a bare LF: h11 waits for a CRLF that may never come, where the
    request is malformed (RFC 9112 7.1); asked only between chunks."""
    buffered = conn.trailing_data[0]
    end = buffered.find(b"\n")
    return end >= 0 and (end == 0 or buffered[end - 1] != 0x0D)


def chunk_left(conn: Parser) -> int:
    """What is left of the chunk h11 is reading: the size its chunk-size line announced,
    less what was delivered (0 between chunks, or for a body that is not chunked). h11
    keeps it in its reader's ``_bytes_in_chunk``; without that, 0 (the limit is then
    enforced on the bytes as they arrive)."""
    left = getattr(getattr(conn, "_reader", None), "_bytes_in_chunk", 0)
    return left if type(left) is int else 0


class H1Core:
    """One HTTP/1.1 connection's protocol state, without I/O (see the module docstring).

    A runtime drives it: :meth:`await_request` when it is to wait for a request,
    :meth:`head_bytes` with each read until a head comes, :meth:`begin` with the head,
    the app (reading the body through :attr:`conn`), then :meth:`unread_body` and
    :meth:`next_request`.
    """

    __slots__ = (
        "conn",
        "deadline",
        "exchange",
        "expired",
        "framing",
        "leftover",
        "peer",
        "pending",
        "phase",
        "served",
        "state",
        "tls",
    )

    def __init__(
        self, state: Shared, peer: tuple[str, int] | None, tls: dict[str, Any] | None
    ) -> None:
        self.state = state
        self.peer = peer  # the socket's peer; a request's client may be what it reports
        self.tls = tls  # the TLS facts of the connection, or None in clear text
        self.pending = b""  # received, not yet given to a parser (protocols.httptools)
        self.conn: Parser = self.fresh(b"")
        self.framing = ResponseFraming()
        self.exchange = _NO_REQUEST
        self.phase = IDLE
        self.deadline = math.inf
        self.expired: Phase | None = None  # the phase whose deadline ended the connection
        self.leftover = False  # bytes of the next request came with the last one
        self.served = 0  # requests read on this connection

    # -- the parser: h11 here; a subclass may read some requests another way (httptools) --

    def fresh(self, leftover: bytes) -> Parser:
        """The parser of the next request, given the bytes of it already received."""
        conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.state.config.max_header_size
        )
        if leftover:
            conn.receive_data(leftover)
        return conn

    def feed(self, data: bytes) -> Any:
        """Parse received bytes: the next event (a request, or h11.NEED_DATA)."""
        self.conn.receive_data(data)
        return self.conn.next_event()

    def next_buffered(self) -> Any:
        """The next event from the bytes already received."""
        return self.conn.next_event()

    # -- reading a request's head ----------------------------------------------------------

    def await_request(self) -> Any:
        """The connection is to wait for its next request: a request already received
        with the last one (pipelined), or NEED_DATA, with the phase and deadline of the
        wait set: the head's time if part of it is here, else the idle wait."""
        self.framing.head_only = False  # an answer before a head (400, 408) has a body
        self.exchange = _NO_REQUEST
        if self.leftover:
            event = self.next_buffered()
            if event is not NEED_DATA:
                self.phase = APP
                return event
            self.phase = HEAD
            self.deadline = self.state.now() + self.state.config.header_timeout
        else:
            self.phase = IDLE
            state = self.state  # Shared.idle_wait, written out: every request comes here
            wait = state.drain_grace if state.draining else state.config.keep_alive_timeout
            self.deadline = state.now() + wait
        return NEED_DATA

    def head_bytes(self, data: bytes) -> Any:
        """Bytes read while waiting for a head: the request once its head is complete,
        NEED_DATA for more, or None if the client closed before a request began."""
        first = self.phase is IDLE  # the first bytes of the request
        if first:
            if not data:
                return None
            data = data.lstrip(b"\r\n")  # RFC 9112 2.2: blank lines are ignored
            if not data:
                return NEED_DATA
            self.phase = HEAD
        self.state.stats.bytes_in += len(data)
        event = self.feed(data)
        if event is not NEED_DATA:
            self.phase = APP
            self.deadline = math.inf
            return event
        if first:  # the head's deadline, unless it all came at once (the usual case)
            self.deadline = self.state.now() + self.state.config.header_timeout
        return NEED_DATA

    def begin(self, head: RequestHead) -> tuple[int, str] | None:
        """A request's head was read: its Exchange, measured against the limits (the
        error to answer, or None), its keep-alive decision made (the response can only
        turn it off: see ResponseFraming)."""
        self.served += 1
        state = self.state
        config = state.config
        headers = header_list(head)
        # h11 bounds a head that arrives in pieces; one that arrives whole is measured here
        size = len(head.method) + len(head.target) + 12
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
                upgrade = True  # a WebSocket? (see protocols.ws_handshake)
            elif name in _FORWARDED:
                forwarded = True
        client = peer = self.peer  # its forwarded headers are believed if it is trusted
        scheme = "https" if self.tls is not None else "http"
        if forwarded and (peer is None or peer[0] in state.trusted):
            client, scheme = apply_forwarded(headers, peer, scheme, state.trusted)
        bodyless = not chunked and not content_length
        self.exchange = exchange = Exchange(head, headers, client, scheme, bodyless, upgrade)
        exchange.started = time.perf_counter() if config.access_log else 0.0
        version = head.http_version
        limit = config.max_requests_per_connection
        self.framing.begin(
            head.method == b"HEAD",
            not (
                close
                or state.draining
                or version != b"1.1"
                # RFC 9112 6.1: both lengths: answer, then close (a smuggling guard)
                or (chunked and content_length is not None)
                # after a 2xx the bytes that follow are a tunnel's, never HTTP requests
                or head.method == b"CONNECT"
                # the last request; but pipelined requests already here are answered too
                or (
                    limit and self.served >= limit and not (bodyless and _head_buffered(self.conn))
                )
            ),
        )
        if head.target[0] != 0x2F and not _other_form(exchange):  # not a path: rare
            return (400, "request target is neither a path nor an absolute URI")
        if version != b"1.1" and version != b"1.0":  # HTTP/2's preface "PRI * HTTP/2.0" too
            return (505, f"HTTP/{version.decode('ascii', 'replace')} not supported")
        if len(headers) > config.max_header_count:
            return (431, "too many header fields")
        if size > config.max_header_size:
            return (431, "request head too large")
        if content_length is not None and content_length > config.max_body_size:
            return (413, "request body too large")
        return None

    def unread(self) -> Exchange:
        """The current request's Exchange; made first if its head was never read (an
        answer to bytes that are not a request, or to a head that did not come in time)."""
        if self.exchange is _NO_REQUEST:
            own = "https" if self.tls is not None else "http"
            self.exchange = Exchange(None, [], self.peer, own)
        return self.exchange

    # -- after a response ------------------------------------------------------------------

    def unread_body(self) -> bool:
        """After the response: some of the request's body was not read (usually it was,
        but for h11's EndOfMessage, which this takes)."""
        conn = self.conn
        if self.exchange.bodyless or conn.their_state in _REQUEST_DONE:
            return False
        tail = conn.next_event()
        return type(tail) is not h11.EndOfMessage and tail is not h11.PAUSED

    def next_request(self) -> bool | None:
        """After a response and its request's whole body: None if the connection goes on
        (the parser of the next request is ready, fed what came after this one), else
        it ends: True if its close must linger (bytes of the client's are left unread)."""
        conn = self.conn
        if not self.exchange.bodyless and conn.their_state not in _REQUEST_DONE:
            return True
        # RFC 9112 2.2: blank lines before a request line are to be ignored
        leftover = conn.trailing_data[0].lstrip(b"\r\n")
        if not self.framing.keep_alive:
            # pipelined requests we will not read, or more of them still on the way
            limit = self.state.config.max_requests_per_connection
            return bool(leftover) or (bool(limit) and self.served >= limit)
        self.leftover = bool(leftover)
        self.conn = self.fresh(leftover)
        return None

    def closes_after_response(self) -> bool:
        """The response must be the connection's last: during a drain, and when the client
        waits for 100-continue and is answered without its body being read (it may not
        send it, so the connection cannot go on: RFC 9110 10.1.1)."""
        return self.state.draining or (
            not self.exchange.bodyless and self.conn.they_are_waiting_for_100_continue
        )

    # -- counting --------------------------------------------------------------------------

    def count(self, status: int, sent: int) -> None:
        """Count the current request once (stats, access log)."""
        exchange = self.exchange
        if exchange.counted:
            return
        exchange.counted = True
        stats = self.state.stats
        stats.requests += 1
        stats.status[status // 100 if status < 600 else 5] += 1
        if self.state.on_request is not None:
            self.state.on_request()
        if exchange.started:
            _access_log(exchange, self.state.worker_id, status, sent)


def _access_log(exchange: Exchange, worker_id: int, status: int, sent: int) -> None:
    """The access-log line of one request (``--access-log``)."""
    client = f"{exchange.client[0]}:{exchange.client[1]}" if exchange.client else "-"
    known = bool(exchange.method)
    method = exchange.method.decode() if known else None
    path = exchange.target.decode("latin-1") if known else None
    line = f"{method} {path} HTTP/{exchange.http_version.decode()}" if known else "-"
    duration = (time.perf_counter() - exchange.started) * 1000
    access_log.info(
        '%s "%s" %d %d %.1fms w%d',
        client,
        line,
        status,
        sent,
        duration,
        worker_id,
        extra={  # the fields of a JSON access-log line (--log-format json)
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(duration, 3),
            "client": client,
            "bytes": sent,
        },
    )
