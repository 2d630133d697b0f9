"""WebSocket (RFC 6455) in the worker: one session on the frame protocol of wsproto.

The layout, one request that asks for a WebSocket (``Connection: upgrade`` and
``Upgrade: websocket``; ``HTTPConnection.upgrade`` flags a request with an ``Upgrade`` field
while its head is checked, so other requests pay nothing):

- ``protocols.ws_handshake.read_handshake`` reads the handshake from the request head
  (None: not a WebSocket request, or ``--ws none``: plain HTTP); a malformed one is
  refused before the app runs (400, 426 with ``Sec-WebSocket-Version: 13``; 503 while
  the worker drains);
- the app interface (``apps.websocket``: ``serve_asgi``, ``serve_native``) runs the app
  with an :class:`Upgrade` (here), which the app accepts (the 101 response, then a
  :class:`WebSocket`) or refuses (403, or a full HTTP response: ASGI's
  ``websocket.http.response`` extension, a native ``Response``);
- a :class:`WebSocket` is one open connection: the app's task reads and feeds wsproto
  while it waits in ``receive``, a watcher task while it does not (see :class:`_Core`);
  pings are answered, the close handshake run; a keepalive task pings the client; sends
  take turns on the stream (a compressed frame must go out in the order it was made), and
  answers to messages already read are sent together.

Closing: whoever closes first, the other side answers, then the server half-closes and
waits a moment (:data:`CLOSE_TIMEOUT`) for the client to close its side. A protocol error
from the client (wsproto reports it as a close: 1002, 1007) or a message over
``--ws-max-size`` (1009) closes with that code. A worker that drains closes each open
WebSocket with 1001 (Going Away) and the app gets ``websocket.disconnect``; a client that
does not answer a ping within ``--ws-ping-timeout`` is dropped. An app that raises after
accepting closes with 1011 and one log line.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Message, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from .closing import STREAM_ERRORS
from .http1 import HTTPConnection
from .rawstream import RECEIVE_SIZE, RawSocketStream
from .ws_handshake import Handshake

log = logging.getLogger("trioherd.http")

CLOSE_TIMEOUT = 1.0
"""Seconds to wait for the client's part of a close: its close frame after ours, its end
of the TCP connection after the handshake (the drain's deadline bounds it too)."""
INBOX = 16
"""Messages the watcher reads ahead for an app that is away; then it stops reading."""
AWAY = 0.5
"""Seconds an app may spend away from receive() before the watcher reads for it."""
NORMAL, GOING_AWAY, ABNORMAL, TOO_BIG, INTERNAL_ERROR = 1000, 1001, 1006, 1009, 1011
_OPEN = ConnectionState.OPEN
_CLOSED = ConnectionState.CLOSED
_REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING
_LOCAL_CLOSING = ConnectionState.LOCAL_CLOSING
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


class WebSocketClosed(ConnectionError):
    """The WebSocket is closed. ``code`` is the close code (the client's, or ours; 1006:
    the connection was lost without a close frame), ``reason`` its text.

    A ``ConnectionError`` (an ``OSError``), which is what ASGI asks a server to raise when
    an app sends on a closed connection."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed with {code}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


# -- one open WebSocket -------------------------------------------------------------------


class _Core:
    """The protocol side of a WebSocket (see :class:`WebSocket`): wsproto, the reads
    of the app's task and of the watcher, the writes, the close handshake, the pings.

    Reading: the app's task reads from the connection itself while it waits in
    ``receive``, so a message costs one trip through Trio's scheduler; a watcher task
    reads for it while it does not (away for AWAY seconds, done, or the connection is
    closing), so that pings are answered and a close is seen. A close (or a protocol
    error) that comes behind messages waits until the app has answered them, at most
    CLOSE_TIMEOUT."""

    __slots__ = (
        "_alarm",
        "_app_done",
        "_caught_up",
        "_corked",
        "_failed",
        "_http",
        "_in_receive",
        "_inbox",
        "_leaving",
        "_lingering",
        "_max_size",
        "_nursery",
        "_parts",
        "_pending",
        "_plain",
        "_pong",
        "_proto",
        "_reading",
        "_receives",
        "_size",
        "_sock",
        "_stats",
        "_waiting",
        "_watch_lot",
        "_watch_scope",
        "_writers",
        "_writing",
        "_ws",
        "close_code",
        "close_reason",
        "done",
        "subprotocol",
    )

    def __init__(
        self,
        http: HTTPConnection,
        ws: Connection,
        subprotocol: str | None,
        nursery: trio.Nursery,
    ) -> None:
        self._http = http
        self._ws = ws
        # wsproto's frame protocol, to frame a message without an event object (the hot
        # path) and after a close was received (see _frame)
        self._proto: Any = getattr(ws, "_proto", None)
        self._plain = self._proto is not None and not self._proto.extensions
        stream = http.stream
        self._sock = stream.lend_socket() if isinstance(stream, RawSocketStream) else None
        self.subprotocol = subprotocol
        """The subprotocol chosen when it was accepted (None: none)."""
        self._nursery = nursery
        self._stats = http.state.stats
        self._max_size = http.state.config.ws_max_size
        self._inbox: collections.deque[str | bytes] = collections.deque()
        self._parts: list[Any] = []  # the pieces of a fragmented message
        self._size = 0  # its bytes so far
        self._reading = False  # a task is reading (the app, or the watcher)
        self._in_receive = False  # the app waits in receive(): it answered what it got
        self._receives = 0  # receive() calls that had to wait: the app is not away
        self._waiting: trio.lowlevel.Task | None = None  # the app, waiting for the watcher
        self._app_done = False
        self._pending: CloseConnection | None = None  # a close held until the app caught up
        self._failed = False  # we failed the connection (1002, 1007, 1009)
        self._caught_up = trio.lowlevel.ParkingLot()
        self._watch_lot = trio.lowlevel.ParkingLot()  # the watcher, while the app reads
        self._alarm = trio.lowlevel.ParkingLot()  # the watcher, until a close or the end
        self._watch_scope = trio.CancelScope()
        self._writing = False
        self._writers = trio.lowlevel.ParkingLot()
        self._corked: list[bytes] = []  # answers held back (see _cork)
        self._pong = trio.Event()
        self._leaving = False
        self._lingering = False
        self.done = trio.Event()
        """Set when the connection is over: close handshake done, or connection lost."""
        self.close_code: int | None = None
        """How it closed, once it has (see :class:`WebSocketClosed`)."""
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def _abort_waiting(self, _: Any) -> trio.lowlevel.Abort:
        self._waiting = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_app(self) -> None:
        """Wake the app if it waits for what the watcher reads (once)."""
        task, self._waiting = self._waiting, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _cork(self, frame: bytes) -> None:
        """Hold an answer while the app still has messages to answer (the next send, or
        its next wait for a message, sends them together: one system call instead of
        many), until it yields at the latest: the watcher (not reading, or we would not
        hold it), woken now, sends it then."""
        if not self._corked:
            self._watch_lot.unpark_all()
            self._alarm.unpark_all()
        self._corked.append(frame)

    async def _uncork(self) -> None:
        if self._corked:
            await self._send_raw(b"")

    async def _send_raw(self, data: bytes) -> None:
        """Send what was held back, then ``data``, in a turn of its own."""
        while self._writing:
            await self._writers.park()
        self._writing = True
        try:
            if self._corked:
                data = b"".join([*self._corked, data])
                self._corked.clear()
            if data:
                await self._http.write(data)
        finally:
            self._writing = False
            if self._writers:
                self._writers.unpark()

    async def _send_slowly(self, message: str | bytes | bytearray | memoryview) -> None:
        if isinstance(message, str):
            event: Event = TextMessage(data=message)
        else:
            event = BytesMessage(data=bytes(message))
        try:
            sent = await self._write(event)
        except STREAM_ERRORS:
            self._ended(ABNORMAL, "")
            sent = False
        if not sent:
            raise WebSocketClosed(self.close_code or ABNORMAL, self.close_reason)

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Start the close handshake (a no-op once the connection is closing). The client
        has CLOSE_TIMEOUT seconds to answer; messages that arrive meanwhile are dropped."""
        if self._ws.state is not _OPEN or self._pending is not None:
            return
        self._ended(code, reason)
        try:
            await self._write(CloseConnection(code=code, reason=reason or None))
        except STREAM_ERRORS:
            pass
        self._wait_for_client()

    def going_away(self) -> None:
        """The worker drains: close with 1001, which the app sees as a disconnect."""
        if not self._leaving and self._ws.state is _OPEN:
            self._leaving = True
            self._nursery.start_soon(self.close, GOING_AWAY, "server shutting down")

    # -- the connection's side ------------------------------------------------------------

    def start(self, ping_interval: float, ping_timeout: float) -> None:
        self._nursery.start_soon(self._watch)
        if ping_interval > 0:
            self._nursery.start_soon(self._keepalive, ping_interval, ping_timeout)

    async def finish(self, error: BaseException | None) -> None:
        """After the app is done: close if it did not (1011 if it raised), then give the
        client a moment to finish the close handshake."""
        self._app_done = True
        self._inbox.clear()
        self._watch_lot.unpark_all()
        self._alarm.unpark_all()
        self._caught_up.unpark_all()
        with trio.move_on_after(CLOSE_TIMEOUT):
            if self._pending is not None:
                await self._settle()
            await self.close(INTERNAL_ERROR if error is not None else NORMAL)
            await self.done.wait()

    def _ended(self, code: int, reason: str) -> None:
        """The connection is closing or closed: the app's receive says how (at once)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self._wake_app()
            self._watch_lot.unpark_all()  # the watcher reads from now on
            self._alarm.unpark_all()

    def _wait_for_client(self) -> None:
        """From now on the watcher waits at most CLOSE_TIMEOUT for the client's part."""
        deadline = trio.current_time() + CLOSE_TIMEOUT
        self._watch_scope.deadline = min(self._watch_scope.deadline, deadline)

    async def _write(self, event: Event) -> bool:
        """Frame ``event`` and send it, one writer at a time (a compressed frame must go
        out in the order it was made). False if the state no longer allows it."""
        while self._writing:
            await self._writers.park()
        self._writing = True
        try:
            try:
                data = self._frame(event)
            except LocalProtocolError:
                return False  # e.g. our close crossed the client's, which was answered
            if self._corked:
                data = b"".join([*self._corked, data])
                self._corked.clear()
            await self._http.write(data)
            return True
        finally:
            self._writing = False
            if self._writers:
                self._writers.unpark()

    def _frame(self, event: Event) -> bytes:
        ws = self._ws
        if self._lingering and ws.state is _REMOTE_CLOSING and isinstance(event, Message):
            # RFC 6455 5.5.1: the answer to a close may wait until the message being sent
            # is sent. wsproto sends no data after a close: its frame protocol frames it
            return bytes(self._proto.send_data(event.data, event.message_finished))
        return ws.send(event)

    # -- reading --------------------------------------------------------------------------

    async def _read_some(self) -> None:
        """Read once from the client and act on it. (A read of the app's is not cut short
        by our close: the client's answer, or the watcher's deadline, ends it.)"""
        self._reading = True
        stats = self._stats
        try:
            try:
                data = await self._receive_data()
            except (OSError, *STREAM_ERRORS):
                data = b""
            if not data:
                self._lost()
                return
            stats.bytes_in += len(data)
            ws = self._ws
            state = ws.state
            if (state is _OPEN or state is _LOCAL_CLOSING) and not self._failed:
                ws.receive_data(data)  # else it is read and dropped until EOF
                await self._process()
        finally:
            self._reading = False
            self._wake_app()  # if it waits for what the watcher read
            if self._alarm and (self.close_code is not None or self._app_done):
                self._alarm.unpark_all()  # the watcher reads from now on

    async def _receive_data(self) -> bytes:
        """One read: wait until the socket is readable, then take what is there."""
        sock = self._sock
        if sock is None:
            return bytes(await self._http.stream.receive_some(RECEIVE_SIZE)) or b""
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue

    def _lost(self) -> None:
        """The read side is over (EOF, error): whatever did not close cleanly is 1006."""
        self._ended(ABNORMAL, "")
        self.done.set()
        if self._pending is not None:
            self._pending = None
            self._lingering = False
        self._caught_up.unpark_all()

    async def _process(self) -> None:
        """Act on what wsproto parsed."""
        for event in self._ws.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                self._message(event)  # type: ignore[arg-type]
            elif kind is Ping:
                await self._write(event.response())  # type: ignore[attr-defined]
            elif kind is Pong:
                self._pong.set()
            elif kind is CloseConnection:
                await self._close_frame(event)  # type: ignore[arg-type]
                return
            if self._pending is not None:  # a message over the limit: no more reading
                return

    def _message(self, event: TextMessage | BytesMessage) -> None:
        if self._ws.state is not _OPEN or self._pending is not None:
            return  # we are closing: what still comes is dropped
        data: Any = event.data  # str or bytes
        size = self._size + len(data)
        if type(data) is str and self._size + 4 * len(data) > self._max_size:
            size = self._size + len(data.encode("utf-8", "surrogatepass"))
        if size > self._max_size:
            self._parts = []
            self._pending = CloseConnection(code=TOO_BIG, reason="message too big")
            return
        if not event.message_finished:
            self._parts.append(data)
            self._size = size
            return
        if self._parts:
            self._parts.append(data)
            data = ("" if type(data) is str else b"").join(self._parts)
            self._parts = []
            self._size = 0
        self._stats.ws_in += 1
        if not self._app_done:
            self._inbox.append(data)

    async def _close_frame(self, event: CloseConnection) -> None:
        """A close from the client, its answer to ours, or wsproto's report of a protocol
        error (a close in the OPEN state): held until the app answered what came before."""
        if self._ws.state is _CLOSED:  # the answer to ours
            await self._half_close()
            return
        self._pending = event
        self._lingering = self._ws.state is _REMOTE_CLOSING  # the app's answers still go
        if self._app_done or (self._in_receive and not self._inbox):
            await self._settle()

    async def _settle(self) -> None:
        """Act on the close held back: answer the client's close, or fail the connection
        with the protocol error's code (1002, 1007) or 1009."""
        event, self._pending = self._pending, None
        self._lingering = False
        self._caught_up.unpark_all()
        if event is None:
            return
        self._ended(event.code, event.reason or "")
        if self._ws.state is _REMOTE_CLOSING:
            await self._write(event.response())
        elif self._ws.state is _OPEN:  # failed: what the client still sends is dropped
            self._failed = True
            await self._write(CloseConnection(code=event.code, reason=event.reason or None))
        await self._half_close()

    async def _half_close(self) -> None:
        """Our side is done (RFC 6455 7.1.1: the server closes the TCP connection first):
        half-close a plain connection, and let the watcher wait a moment for the client's
        end. Over TLS the connection closes (close_notify first) once the app is done."""
        self._wait_for_client()
        self._alarm.unpark_all()
        stream = self._http.stream
        if isinstance(stream, trio.abc.HalfCloseableStream):
            while self._writing:
                await self._writers.park()
            with contextlib.suppress(OSError, *STREAM_ERRORS):
                await stream.send_eof()
        else:  # TLS: the connection's close (close_notify first) is the end: no waiting
            self.done.set()

    async def _watch(self) -> None:
        """Read for the app while it does not: when it is away (AWAY seconds without
        waiting in receive), done, or the connection is closing; until the end."""
        with self._watch_scope:
            while not self.done.is_set():
                if self._corked:
                    with contextlib.suppress(*STREAM_ERRORS):
                        await self._uncork()
                if self._pending is not None and not self._app_done:
                    with trio.move_on_after(CLOSE_TIMEOUT):  # the app answers, then settles
                        await self._caught_up.park()
                    if self._pending is not None:
                        await self._settle()
                elif self.close_code is not None or self._app_done:
                    if not self._reading:
                        await self._read_some()
                    else:
                        await self._alarm.park()  # until the app's read is over
                elif self._in_receive:
                    await self._watch_lot.park()  # until the app takes a message
                else:
                    await self._watch_away()
        if self._watch_scope.cancelled_caught:  # the client took too long to close
            _abort(self._http.stream)
            self._lost()

    async def _watch_away(self) -> None:
        """The app is busy with a message: if it stays away AWAY seconds, read for it."""
        seen = self._receives
        with trio.move_on_after(AWAY):
            await self._alarm.park()  # a close, the app's end, or answers held back
        if self._corked:
            return  # sent first (see _watch)
        if seen == self._receives and not self._in_receive and not self._reading:
            if len(self._inbox) < INBOX and self.close_code is None and not self._app_done:
                await self._read_some()

    async def _keepalive(self, interval: float, timeout: float) -> None:
        """Ping every ``interval``; a client that does not answer within ``timeout`` (or
        does not even take the ping) is dropped."""
        while True:
            await trio.sleep(interval)
            if self._ws.state is not _OPEN:
                return
            self._pong = trio.Event()
            with trio.move_on_after(timeout or math.inf) as waited:
                try:
                    await self._write(Ping(payload=b"trioherd"))
                except STREAM_ERRORS:
                    return
                await self._pong.wait()
            if waited.cancelled_caught:
                client = self._http.exchange.client
                log.info("WebSocket client %s did not answer a ping: dropped", client)
                self._ended(ABNORMAL, "ping timeout")
                _abort(self._http.stream)
                return


class WebSocket(_Core):
    """One open WebSocket: what ``await request.accept_websocket()`` gives a native app
    (the ASGI interface drives the same object).

    Messages are ``str`` (text) or ``bytes`` (binary). :meth:`receive` raises
    :class:`WebSocketClosed` once the connection is closed, whoever closed it, and
    ``async for message in websocket`` just ends there; :meth:`send` raises it too.
    """

    __slots__ = ()

    # -- the app's side ----------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next message; raises WebSocketClosed once the connection is closed."""
        inbox = self._inbox
        if inbox:
            return inbox.popleft()
        self._in_receive = True
        self._receives += 1
        try:
            if self._corked:
                await self._uncork()
            while not inbox:
                if self._pending is not None:  # the app answered what came before it
                    await self._settle()
                if self.close_code is not None:
                    raise WebSocketClosed(self.close_code, self.close_reason)
                if self._reading:  # the watcher reads: wait for what it finds
                    self._waiting = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(self._abort_waiting)
                else:
                    await self._read_some()
            return inbox.popleft()
        finally:
            self._in_receive = False
            if self._watch_lot:
                self._watch_lot.unpark()  # the watcher waits for the app to go away

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                message = await self.receive()
            except WebSocketClosed:
                return
            yield message

    async def send(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message."""
        if not isinstance(message, str | bytes | bytearray | memoryview):
            raise TypeError(f"a WebSocket message is str or bytes, not {type(message).__name__}")
        proto = self._proto
        if self._writing or proto is None or self._ws.state is not _OPEN:
            await self._send_slowly(message)
        else:  # the usual case, without an event object or a wait for a turn
            self._writing = True
            try:
                if self._plain:  # no extension: the frame is a head and the payload
                    frame = _data_frame(message)
                else:
                    frame = bytes(proto.send_data(message, True))
                if self._inbox and not self._reading and self._pending is None:
                    self._cork(frame)  # the app answers more at once: sent together
                else:
                    if self._corked:
                        frame = b"".join([*self._corked, frame])
                        self._corked.clear()
                    await self._http.write(frame)
            except STREAM_ERRORS:
                self._ended(ABNORMAL, "")
                raise WebSocketClosed(ABNORMAL) from None
            finally:
                self._writing = False
                if self._writers:
                    self._writers.unpark()
        self._stats.ws_out += 1


def _data_frame(message: str | bytes | bytearray | memoryview) -> bytes:
    """An unfragmented, unmasked (server) data frame without extensions (RFC 6455 5.2)."""
    if isinstance(message, str):
        payload, head = message.encode(), 0x81  # FIN, text
    else:
        payload, head = bytes(message), 0x82  # FIN, binary
    size = len(payload)
    if size < 126:
        return bytes((head, size)) + payload
    if size < 65536:
        return _HEAD16.pack(head, 126, size) + payload
    return _HEAD64.pack(head, 127, size) + payload


def _abort(stream: trio.abc.Stream) -> None:
    """Close the socket under ``stream`` now: whatever waits on it is woken with
    ClosedResourceError (the connection's own close follows later)."""
    transport = getattr(stream, "transport_stream", stream)
    if isinstance(transport, RawSocketStream):
        transport.close()
    elif isinstance(transport, trio.SocketStream):
        transport.socket.close()


# -- the app's answer to a handshake --------------------------------------------------------


class Upgrade:
    """A request that asks for a WebSocket, until the app accepts it or answers with HTTP.
    A native ``Request`` holds it (``request.accept_websocket()``)."""

    __slots__ = ("handshake", "http", "nursery", "websocket")

    def __init__(self, http: HTTPConnection, handshake: Handshake) -> None:
        self.http = http
        self.handshake = handshake
        self.nursery: trio.Nursery | None = None
        self.websocket: WebSocket | None = None

    @property
    def subprotocols(self) -> list[str]:
        return self.handshake.subprotocols

    async def accept(
        self, subprotocol: str | None = None, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> WebSocket:
        """Answer 101 Switching Protocols; from now on the connection is a WebSocket."""
        http = self.http
        if self.websocket is not None or http.exchange.response_started:
            raise RuntimeError("the WebSocket handshake was answered already")
        assert self.nursery is not None
        config = http.state.config
        head, extensions = self.handshake.response(
            subprotocol, headers, config.ws_per_message_deflate
        )
        early = http.conn.trailing_data[0]  # frames that came right behind the request
        ws = Connection(ConnectionType.SERVER, extensions, trailing_data=early)
        websocket = WebSocket(http, ws, subprotocol, self.nursery)
        await http.send(head)
        self.websocket = websocket
        http.state.websockets.add(websocket)
        http.state.stats.ws_open += 1
        websocket.start(config.ws_ping_interval, config.ws_ping_timeout)
        return websocket

    async def run(self, app: Callable[[], Awaitable[Any]], target: bytes) -> None:
        """Run the app; after it accepted, close when it is done (1011 if it raised: one
        log line). An error before it accepted propagates (a 500, if nothing was sent)."""
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    await app()
                except Exception as exc:
                    error = exc
                websocket = self.websocket
                if websocket is not None:
                    if isinstance(error, WebSocketClosed):  # the app did not catch it: no error
                        error = None
                    elif error is not None:
                        log.error(
                            "app raised on WebSocket %s", target.decode("latin-1"), exc_info=error
                        )
                    await websocket.finish(error)
                nursery.cancel_scope.cancel()
        finally:
            if self.websocket is not None:
                self.http.state.websockets.discard(self.websocket)
                self.http.state.stats.ws_open -= 1
        if error is not None and self.websocket is None:
            raise error
