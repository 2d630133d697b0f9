"""HTTP/2 without I/O: one connection's streams, limits, defenses and deadlines (in progress).

:class:`H2Core` is RFC 9113 on python-hyper's ``h2`` (h11's sister), as :class:`~.h1core.H1Core`
is HTTP/1.1 on h11: it owns no socket, no task and no timer, and reads time from its worker's
:class:`~.shared.Shared` state (``now``). A runtime's driver (Trio, asyncio: not written yet)
does four things with it:

- feeds it what it reads, :meth:`H2Core.receive`, and acts on the events it returns, in
  order: :class:`NewStream` (a request's head: start its app), :class:`StreamBody` (a piece
  of a request's body, and whether it is the last), :class:`StreamReset` (the client reset a
  stream the driver has: stop its app), :class:`BodyOverLimit` (a body passed
  ``max_body_size``: fail the app's read, then :meth:`H2Core.refuse` with 413),
  :class:`StreamRefused` (the core answered a stream itself, without the app: count it),
  :class:`WindowOpened` (streams that may send more: 0 means every stream),
  :class:`ClientGoAway` (the client ends the connection: h2 sends nothing after it) and
  :class:`MustClose` (send what is left, then close);
- writes what :meth:`H2Core.data_to_send` gives, after every call;
- answers each stream it took: :meth:`H2Core.respond`, :meth:`H2Core.send_data` (takes what
  flow control lets it, returns how much; the rest waits for a :class:`WindowOpened` of the
  stream or of 0), :meth:`H2Core.send_trailers`, :meth:`H2Core.reset`, and
  :meth:`H2Core.finish` once the stream's app has returned; :meth:`H2Core.consumed` when the
  app has read a piece of body: the client's windows are refilled only then, so a big
  body is paced by the app that reads it;
- enforces :attr:`H2Core.deadline` (``phase`` IDLE: no stream open, the keep-alive timeout
  or the drain's grace, from when the last stream ended: PINGs and
  SETTINGS do not extend it; HEAD: a header block begun and not ended, ``header_timeout``, not
  reset by its CONTINUATION frames; APP: none) by calling :meth:`H2Core.expire`, and
  calls :meth:`H2Core.start_drain` when its worker drains (GOAWAY with error 0; the
  streams already open are served, later ones refused), closing once
  :attr:`H2Core.finished`.

Limits and defenses (each with a test in tests/unit/test_h2core.py):

- SETTINGS we send: ``MAX_CONCURRENT_STREAMS`` (:data:`MAX_CONCURRENT_STREAMS`; a client
  over it breaks the connection: h2 answers GOAWAY PROTOCOL_ERROR), ``MAX_FRAME_SIZE``
  (:data:`MAX_FRAME_SIZE`; h2: GOAWAY FRAME_SIZE_ERROR), ``INITIAL_WINDOW_SIZE``
  (:data:`INITIAL_WINDOW_SIZE`; the connection's window is :data:`CONNECTION_WINDOW`),
  ``MAX_HEADER_LIST_SIZE`` (``max_header_size`` plus 28 bytes per allowed field, so the
  head HTTP/1.1 accepts fits, as RFC 9113 counts 32 bytes a field where we count 4).
- A head over ``max_header_size`` or ``max_header_count`` (as HTTP/1.1 measures it) is
  answered 431 by the core; a declared ``content-length`` over ``max_body_size`` is
  answered 413 (then RST_STREAM NO_ERROR: stop sending); CONNECT is answered 501. A body
  that passes ``max_body_size`` as it comes is :class:`BodyOverLimit`: its bytes are
  dropped (and given back to the connection's window) from then on.
- HPACK bombs: the decoder refuses a header list that decodes past twice the advertised
  size, from the first request (h2's ``DenialOfServiceError``: GOAWAY ENHANCE_YOUR_CALM).
- CONTINUATION flood (CVE-2024-27316): h2 refuses more than 64 CONTINUATION frames in a
  block; ``protocols.h2scan`` also bounds the bytes of one header block to that same
  twice, before h2 buffers them (GOAWAY ENHANCE_YOUR_CALM, ``header_flood``).
- Rapid Reset (CVE-2023-44487): a stream the client resets within the read that opened
  it is never given to the driver (no app starts for it); resets of streams not yet
  answered are counted per ``h2scan.FLOOD_WINDOW`` and past ``RESET_LIMIT`` (100), when they are
  more than half of the streams opened in the window, the connection ends (GOAWAY
  ENHANCE_YOUR_CALM, ``rapid_reset``).
- SETTINGS, PING, PRIORITY and empty-DATA floods: frames counted per 10 s (``h2scan``)
  as they arrive, before h2 does any work (or queues any answer) for them; past the
  limits in ``h2scan.FLOOD_LIMITS``, GOAWAY ENHANCE_YOUR_CALM.

These defaults are module constants until the options exist (issue 28).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from h2 import events as h2e
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import (
    DenialOfServiceError,
    FrameTooLargeError,
    ProtocolError,
    StreamClosedError,
)
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from .forwarded import apply as apply_forwarded
from .framing import Fields, InvalidResponse, check_field, http_date
from .h1core import ClientGone
from .h2events import (
    CLIENT_CLOSED,
    FRAME_TOO_LARGE,
    HEAD_TIMEOUT,
    HPACK_BOMB,
    IDLE_CLOSE,
    PROTOCOL_ERROR,
    RAPID_RESET,
    BodyOverLimit,
    ClientGoAway,
    Event,
    MustClose,
    NewStream,
    StreamBody,
    StreamRefused,
    StreamReset,
    WindowOpened,
)
from .h2scan import HEADER_FLOOD, FrameScan, ResetCount
from .shared import APP, HEAD, IDLE, Phase, Shared

__all__ = [
    "HEADER_FLOOD",
    "BodyOverLimit",
    "ClientGoAway",
    "H2Core",
    "MustClose",
    "NewStream",
    "StreamBody",
    "StreamRefused",
    "StreamReset",
    "WindowOpened",
]

MAX_CONCURRENT_STREAMS = 100
"""Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS)."""
MAX_FRAME_SIZE = 16384
"""The largest frame payload we accept (SETTINGS_MAX_FRAME_SIZE; RFC 9113's least)."""
INITIAL_WINDOW_SIZE = 65535
"""Bytes of request body a stream may send before its app reads any (the RFC's default)."""
CONNECTION_WINDOW = 1 << 20
"""Bytes of request body, over all its streams, one connection may hold unread by apps."""

# RFC 9113 8.2.2: connection-specific fields are never sent in HTTP/2
_FORWARDED = frozenset((b"forwarded", b"x-forwarded-for", b"x-forwarded-proto"))
_HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)


# -- the connection --------------------------------------------------------------------------


class Stream:
    """What the core keeps of an open stream, from its head until :meth:`H2Core.finish`
    or a reset."""

    __slots__ = ("body_done", "bodyless", "head_only", "over", "received", "responded", "sent")

    def __init__(self, head_only: bool, body_done: bool) -> None:
        self.head_only = head_only  # a HEAD request: the response has no body
        self.bodyless = head_only  # the response has no body (HEAD, 204, 304)
        self.body_done = body_done  # the request's body is complete
        self.received = 0  # bytes of request body
        self.over = False  # the body passed max_body_size: its bytes are dropped
        self.responded = False  # the response's head is sent
        self.sent = False  # the response is complete


_ERRORS: dict[type[ProtocolError], str] = {
    DenialOfServiceError: HPACK_BOMB,
    FrameTooLargeError: FRAME_TOO_LARGE,
}


class H2Streams:
    """One HTTP/2 connection's h2 state, its open streams, what is sent on them, and its
    deadline: the sending half of :class:`H2Core`, which adds the reading."""

    __slots__ = (
        "closed",
        "conn",
        "deadline",
        "expired",
        "fresh",
        "header_list_size",
        "last_stream_id",
        "outbox",
        "peer",
        "phase",
        "resets",
        "scan",
        "served",
        "state",
        "streams",
        "tls",
    )

    def __init__(
        self, state: Shared, peer: tuple[str, int] | None, tls: dict[str, Any] | None
    ) -> None:
        self.state = state
        self.peer = peer
        self.tls = tls
        config = state.config
        # a head HTTP/1.1 accepts fits (RFC 9113 counts 32 bytes a field, we count 4)
        self.header_list_size = size = config.max_header_size + 28 * config.max_header_count
        self.conn = conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: size,
                SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                SettingCodes.INITIAL_WINDOW_SIZE: INITIAL_WINDOW_SIZE,
            },
        )
        # the HPACK bomb's bound, from the first header block (h2 sets the advertised size
        # only once the client acknowledges it); twice it: a 431 is answered below it
        conn.decoder.max_header_list_size = 2 * size
        conn.initiate_connection()
        if CONNECTION_WINDOW > 65535:
            conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.scan = FrameScan(2 * size)
        self.resets = ResetCount()
        self.streams: dict[int, Stream] = {}
        self.fresh: dict[int, bool] = {}  # streams opened in this read: dropped if reset
        self.outbox = bytearray()  # frames of ours that h2 does not make (a graceful GOAWAY)
        self.last_stream_id: int | None = None  # set by the drain's GOAWAY
        self.closed = False  # h2 has sent or received GOAWAY for good: nothing more
        self.served = 0  # streams opened
        self.phase = IDLE
        self.deadline = state.now() + state.idle_wait()
        self.expired: Phase | None = None

    @property
    def finished(self) -> bool:
        """Nothing more will happen: closed, or drained with no stream left."""
        return self.closed or (self.last_stream_id is not None and not self.streams)

    # -- bytes out ---------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """What is to be written to the client now (b"" for nothing)."""
        data = self.conn.data_to_send()
        if self.outbox:
            data = bytes(self.outbox) + data
            self.outbox.clear()
        self.state.stats.bytes_out += len(data)
        return data

    def queue_frame(self, frame: GoAwayFrame) -> None:
        """A frame h2 would not send without changing its state, after what h2 queued."""
        self.outbox += self.conn.data_to_send()
        self.outbox += frame.serialize()

    @contextmanager
    def sending(self, sid: int) -> Iterator[Stream]:
        """The open stream to send on; ClientGone if it is not open (reset, or the
        connection ended), InvalidResponse for what h2 refuses to send."""
        stream = self.streams.get(sid)
        if stream is None or self.closed:
            raise ClientGone()
        try:
            yield stream
        except StreamClosedError:
            self.streams.pop(sid, None)
            raise ClientGone() from None
        except ProtocolError as error:
            raise InvalidResponse(str(error)) from None

    def respond(
        self, sid: int, status: int, headers: Sequence[tuple[bytes, bytes]], end: bool = False
    ) -> None:
        """Send a response's head: the app's fields, checked, less those HTTP/2 never
        carries, with ``date`` and ``server`` unless the app gave its own. ``end``: the
        response has no body (one HEADERS frame with END_STREAM)."""
        if not 200 <= status <= 999:  # 1xx are interim, never the answer
            raise InvalidResponse(f"invalid response status {status!r}")
        fields = [(b":status", b"%d" % status)]
        has_date = has_server = False
        for name, value in headers:
            check_field(name, value)
            name = name.lower()
            if name in _HOP_BY_HOP:
                continue
            has_date = has_date or name == b"date"
            has_server = has_server or name == b"server"
            fields.append((name, value))
        if not has_date:
            fields.append((b"date", http_date()))
        if not has_server:
            fields.append((b"server", b"trioherd"))
        with self.sending(sid) as stream:
            self.conn.send_headers(sid, fields, end_stream=end)
            stream.responded = True
            stream.sent = end
            stream.bodyless = stream.head_only or status in (204, 304)

    def consumed(self, sid: int, size: int) -> None:
        """The app has read ``size`` bytes of the stream's body: the client's windows (the
        stream's and the connection's) get them back (h2 sends WINDOW_UPDATE once half a
        window is owed, not for each piece)."""
        if size and not self.closed:
            self.conn.acknowledge_received_data(size, sid)

    def sendable(self, sid: int) -> int:
        """Bytes of body the stream may send now (its window and the connection's)."""
        with self.sending(sid):
            return self.conn.local_flow_control_window(sid)

    def send_data(self, sid: int, data: bytes, end: bool = False) -> int:
        """Send what flow control lets of ``data`` (in frames the client accepts); how much
        was taken. ``end``: the body ends with it, once all of it is taken. The body of a
        response that has none (HEAD, 204, 304) is taken and dropped."""
        with self.sending(sid) as stream:
            conn = self.conn
            if stream.bodyless:
                if end:
                    conn.end_stream(sid)
                    stream.sent = True
                return len(data)
            total = len(data)
            room = min(total, conn.local_flow_control_window(sid))
            frame = conn.max_outbound_frame_size
            taken = 0
            while taken < room:
                piece = data[taken : taken + min(frame, room - taken)]
                taken += len(piece)
                conn.send_data(sid, piece, end_stream=end and taken == total)
            if end and taken == total:
                if not total:
                    conn.end_stream(sid)
                stream.sent = True
            return taken

    def send_trailers(self, sid: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """End the response with trailer fields."""
        for name, value in headers:
            check_field(name, value)
        with self.sending(sid) as stream:
            self.conn.send_headers(sid, [(n.lower(), v) for n, v in headers], end_stream=True)
            stream.sent = True

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        """Reset a stream (nothing happens if it is not open)."""
        if self.streams.pop(sid, None) is not None and not self.closed:
            try:
                self.conn.reset_stream(sid, code)
            except StreamClosedError:
                pass
        self.settle(self.state.now())

    def refuse(self, sid: int, status: int) -> None:
        """Answer a taken stream with a bare ``status`` (413 after :class:`BodyOverLimit`),
        or reset it (INTERNAL_ERROR) if its response has begun; then it is finished."""
        stream = self.streams.get(sid)
        if stream is None or self.closed:
            return
        if stream.responded:
            self.reset(sid, ErrorCodes.INTERNAL_ERROR)
            return
        self.respond(sid, status, [(b"content-length", b"0")], end=True)
        self.finish(sid)

    def finish(self, sid: int) -> None:
        """The stream's app has returned: an incomplete response is reset (INTERNAL_ERROR),
        a request body still coming is refused (RST_STREAM NO_ERROR: stop sending)."""
        stream = self.streams.get(sid)
        if stream is None:
            return
        if not stream.sent:
            self.reset(sid, ErrorCodes.INTERNAL_ERROR)
            return
        if not stream.body_done:
            self.reset(sid, ErrorCodes.NO_ERROR)
            return
        del self.streams[sid]
        self.settle(self.state.now())

    # -- the end, and deadlines ---------------------------------------------------------------

    def start_drain(self, last_stream_id: int | None = None) -> None:
        """GOAWAY with error 0: the streams up to ``last_stream_id`` (all those opened so
        far by default) are served, the later ones refused; :attr:`finished` once they are
        done. Sent as a frame of ours: after h2's own GOAWAY it would send nothing more."""
        if self.closed or self.last_stream_id is not None:
            return
        last = self.conn.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        self.last_stream_id = last
        self.queue_frame(GoAwayFrame(0, last_stream_id=last, error_code=0))
        self.settle(self.state.now())

    def fail(self, reason: str, code: int) -> MustClose:
        """End the connection with GOAWAY ``code``: the MustClose to act on."""
        if not self.closed:
            self.closed = True
            self.conn.close_connection(error_code=code, last_stream_id=self.last_stream_id)
        return MustClose(reason, int(code))

    def settle(self, now: float) -> None:
        """The phase and deadline after a change: a header block being received (HEAD), a
        stream open (APP), or none (IDLE: a wait that begins now)."""
        if self.scan.in_block:
            if self.phase is not HEAD:
                self.phase = HEAD
                self.deadline = now + self.state.config.header_timeout
        elif self.streams:
            self.phase = APP
            self.deadline = math.inf
        elif self.phase is not IDLE:
            self.phase = IDLE
            self.deadline = now + self.state.idle_wait()

    def expire(self) -> MustClose | None:
        """The deadline has passed: end the connection (idle: GOAWAY NO_ERROR; a header
        block not received in time: ENHANCE_YOUR_CALM); None in APP."""
        phase = self.phase
        if phase is APP or self.closed:
            return None
        self.expired = phase
        if phase is HEAD:
            return self.fail(HEAD_TIMEOUT, ErrorCodes.ENHANCE_YOUR_CALM)
        return self.fail(IDLE_CLOSE, ErrorCodes.NO_ERROR)


class H2Core(H2Streams):
    """One HTTP/2 connection's protocol state, without I/O (see the module docstring)."""

    __slots__ = ()

    # -- bytes in ----------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Bytes read from the client (b"": its end); the events, in order."""
        if self.closed:
            return []
        if not data:
            self.closed = True
            return [MustClose(CLIENT_CLOSED, 0)]
        state = self.state
        state.stats.bytes_in += len(data)
        now = state.now()
        why = self.scan.feed(data, now)
        if why is not None:
            return [self.fail(why, ErrorCodes.ENHANCE_YOUR_CALM)]
        try:
            received = self.conn.receive_data(data)
        except ProtocolError as error:  # h2 has queued its GOAWAY
            self.closed = True
            code = int(error.error_code or ErrorCodes.PROTOCOL_ERROR)
            return [MustClose(_ERRORS.get(type(error), PROTOCOL_ERROR), code)]
        out: list[Event] = []
        handlers = self._handlers
        for event in received:
            handler = handlers.get(type(event))
            if handler is not None and handler(self, event, out, now):
                return [self.fail(RAPID_RESET, ErrorCodes.ENHANCE_YOUR_CALM)]
        if self.fresh:
            if not all(self.fresh.values()):  # opened and reset in one read: never taken
                out = [e for e in out if self.fresh.get(e.stream_id, True)]
            self.fresh.clear()
        self.settle(now)
        return out

    def _on_request(self, event: h2e.RequestReceived, out: list[Event], now: float) -> bool:
        sid = event.stream_id
        if self.last_stream_id is not None and sid > self.last_stream_id:
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY
            return False
        self.served += 1
        self.resets.open(now)
        end = event.stream_ended is not None
        head = self.read_head(sid, event.headers, end)
        if isinstance(head, StreamRefused):
            self.refuse_unread(head, end)
            out.append(head)
        else:
            self.streams[sid] = Stream(head.method == b"HEAD", end)
            self.fresh[sid] = True
            out.append(head)
        limit = self.state.config.max_requests_per_connection
        if limit and self.served >= limit:
            self.start_drain(sid)
        return False

    def read_head(
        self, sid: int, headers: Iterable[tuple[bytes, bytes]], end: bool
    ) -> NewStream | StreamRefused:
        """A request's header block (validated by h2) as a NewStream, measured against the
        limits as HTTP/1.1 measures a head; or the answer the core gives it."""
        config = self.state.config
        method = path = authority = b""
        scheme = "https" if self.tls is not None else "http"
        fields: Fields = []
        cookies: list[bytes] = []
        size = 12
        length = -1
        forwarded = host = False
        for name, value in headers:
            if name[:1] == b":":
                size += len(value) + 1
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            size += len(name) + len(value) + 4
            if name == b"cookie":
                cookies.append(value)
                continue
            if name == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif name == b"host":
                host = True
            elif name in _FORWARDED:
                forwarded = True
            fields.append((name, value))
        if cookies:
            fields.append((b"cookie", b"; ".join(cookies)))
        if authority and not host:
            fields.append((b"host", authority))
        if method == b"CONNECT":
            return StreamRefused(sid, 501, "CONNECT is not served over HTTP/2")
        if len(fields) > config.max_header_count:
            return StreamRefused(sid, 431, "too many header fields")
        if size > config.max_header_size:
            return StreamRefused(sid, 431, "request head too large")
        if length > config.max_body_size:
            return StreamRefused(sid, 413, "request body too large")
        client = peer = self.peer
        state = self.state
        if forwarded and (peer is None or peer[0] in state.trusted):
            client, scheme = apply_forwarded(fields, peer, scheme, state.trusted)
        return NewStream(sid, method, path, authority, scheme, fields, client, end)

    def refuse_unread(self, refused: StreamRefused, end: bool) -> None:
        """Answer a stream the driver never saw: a head alone, then, if the client is still
        sending, RST_STREAM NO_ERROR (RFC 9113 8.1: stop sending, without error)."""
        status = b"%d" % refused.status
        self.conn.send_headers(
            refused.stream_id, [(b":status", status), (b"content-length", b"0")], end_stream=True
        )
        if not end:
            self.conn.reset_stream(refused.stream_id, ErrorCodes.NO_ERROR)

    def _on_data(self, event: h2e.DataReceived, out: list[Event], now: float) -> bool:
        sid = event.stream_id
        data = event.data
        flow = event.flow_controlled_length
        stream = self.streams.get(sid)
        if stream is None or stream.over:  # refused, reset, or over its limit: dropped
            if flow:
                self.conn.acknowledge_received_data(flow, sid)
            return False
        if flow > len(data):  # padding: given back at once
            self.conn.acknowledge_received_data(flow - len(data), sid)
        end = event.stream_ended is not None
        if not data and not end:
            return False
        stream.received += len(data)
        if stream.received > self.state.config.max_body_size:
            stream.over = True
            self.conn.acknowledge_received_data(len(data), sid)
            out.append(BodyOverLimit(sid, stream.received))
            return False
        stream.body_done = end
        out.append(StreamBody(sid, data, end))
        return False

    def _on_end(self, event: h2e.StreamEnded, out: list[Event], now: float) -> bool:
        stream = self.streams.get(event.stream_id)
        if stream is not None and not stream.body_done and not stream.over:
            stream.body_done = True  # after trailers (not passed on: ASGI has none)
            out.append(StreamBody(event.stream_id, b"", True))
        return False

    def _on_reset(self, event: h2e.StreamReset, out: list[Event], now: float) -> bool:
        sid = event.stream_id
        stream = self.streams.pop(sid, None)
        if stream is None:
            return False
        if sid in self.fresh:
            self.fresh[sid] = False  # its events are dropped: no app starts for it
        else:
            out.append(StreamReset(sid, int(event.error_code or 0)))
        return not stream.sent and self.resets.reset(now)

    def _on_window(self, event: h2e.WindowUpdated, out: list[Event], now: float) -> bool:
        out.append(WindowOpened(event.stream_id))
        return False

    def _on_settings(self, event: h2e.RemoteSettingsChanged, out: list[Event], now: float) -> bool:
        if self.streams and SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            out.append(WindowOpened(0))
        return False

    def _on_goaway(self, event: h2e.ConnectionTerminated, out: list[Event], now: float) -> bool:
        self.closed = True
        out.append(ClientGoAway(int(event.error_code or 0), event.last_stream_id or 0))
        return False

    _handlers: dict[type[h2e.Event], Callable[[H2Core, Any, list[Event], float], bool]] = {
        h2e.RequestReceived: _on_request,
        h2e.DataReceived: _on_data,
        h2e.StreamEnded: _on_end,
        h2e.StreamReset: _on_reset,
        h2e.WindowUpdated: _on_window,
        h2e.RemoteSettingsChanged: _on_settings,
        h2e.ConnectionTerminated: _on_goaway,
    }
