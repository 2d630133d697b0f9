"""One WebSocket session without I/O: bytes in, messages and bytes out, deadlines as data.

:class:`Session` is RFC 6455 on wsproto's frame protocol (its ``FrameProtocol``: frames
parsed and framed; the close handshake's states are kept here). It never waits and never
reads a clock: a driver (``protocols.websocket``, on Trio) owns the socket, the tasks and
the timers. The driver:

- feeds what it reads to :meth:`Session.receive_data`, then calls :meth:`Session.step`
  until it says what to do (:class:`Step`): complete messages land in ``inbox``, a ping
  is answered, a pong noted; a close from the client, a protocol error of its or a
  message over the limit is *held* (``pending``) until the app has answered the messages
  before it, then :meth:`Session.settle` answers it;
- sends what :meth:`Session.take_outgoing` gives, one writer at a time: every frame the
  session makes (the app's messages, pongs, pings, closes) is queued in the order it was
  made, which is the order a compressed frame needs;
- sleeps until the deadlines the session computes from the ``now`` it is given:
  ``ping_at`` (the next ping), ``pong_by`` (its answer), ``close_by`` (the client's part
  of a close).

A message is assembled and measured by ``protocols.ws_incoming``; a compressed one
(permessage-deflate) is inflated there in bounded pieces, one per :meth:`Session.step`,
and fails with 1009 the moment it passes the limit: a message being received holds at
most the limit plus one piece, and the driver lets other tasks run between two pieces
(:attr:`Step.BUSY`).
An asyncio driver would do what the Trio one does, with its own streams and timers.
"""

from __future__ import annotations

import collections
import enum
import math
import struct
import zlib
from collections.abc import Iterator
from typing import Protocol

from wsproto.connection import ConnectionState
from wsproto.extensions import Extension
from wsproto.frame_protocol import Frame, FrameProtocol, Opcode, ParseFailed

from .ws_incoming import Incoming, TooBig
from .ws_inflate import BoundedDeflate

NORMAL, GOING_AWAY, ABNORMAL, INVALID_DATA, TOO_BIG, INTERNAL_ERROR = (
    1000,
    1001,
    1006,
    1007,
    1009,
    1011,
)
CLOSE_TIMEOUT = 1.0
"""Seconds to wait for the client's part of a close: its close frame after ours, its end
of the TCP connection after the handshake (the drain's deadline bounds it too)."""
OPEN = ConnectionState.OPEN
REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING
LOCAL_CLOSING = ConnectionState.LOCAL_CLOSING
CLOSED = ConnectionState.CLOSED
TEXT, BINARY, PING, PONG, CLOSE = (
    Opcode.TEXT,
    Opcode.BINARY,
    Opcode.PING,
    Opcode.PONG,
    Opcode.CLOSE,
)
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


class Step(enum.Enum):
    """What :meth:`Session.step` stopped for."""

    IDLE = "idle"
    """Everything received was acted on: read more."""
    BUSY = "busy"
    """A piece of a compressed message was inflated and more is to come: let other tasks
    run, then step again."""
    PONG = "pong"
    """The client answered our ping: wake whoever waits for it, then step again."""
    HELD = "held"
    """A close from the client, or a failure of the connection (a protocol error: 1002,
    1007; a message over the limit: 1009), is held until the app has answered the messages
    that came before it; then :meth:`Session.settle`."""
    CLOSED = "closed"
    """The client answered our close: the close handshake is complete."""


class Counters(Protocol):
    """Where a session counts the messages it received (``protocols.state.Stats``)."""

    ws_in: int


class Pings:
    """The keepalive's deadlines: the next ping is due ``interval`` after the last one
    was answered (:attr:`at`); its pong is due ``timeout`` after it went out (:attr:`by`).
    0 for either: no pings, or no limit on the wait for a pong."""

    __slots__ = ("at", "by", "interval", "out", "timeout")

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.out = False  # a ping waits for its pong
        self.at = self.by = math.inf

    def schedule(self, now: float, open_: bool) -> float:
        """The next ping is due ``interval`` from ``now`` (never without pings, or once
        the session is closing)."""
        self.at = now + self.interval if open_ and self.interval > 0 else math.inf
        return self.at

    def sent(self, now: float) -> float:
        """The ping went out at ``now``: its pong is due ``timeout`` later."""
        self.out = True
        self.by = now + self.timeout if self.timeout > 0 else math.inf
        return self.by

    def answered(self) -> bool:
        """A pong came; True if a ping waited for it."""
        waited, self.out = self.out, False
        return waited


class Session:
    """One WebSocket session, server side, without I/O (see the module docstring).

    ``state`` is wsproto's ``ConnectionState`` (OPEN, then LOCAL_CLOSING or
    REMOTE_CLOSING, then CLOSED). ``close_code`` and ``close_reason`` say how the session
    ended, from the moment it did (a close sent or held, the connection lost: 1006).
    """

    __slots__ = (
        "_frames",
        "app_done",
        "close_by",
        "close_code",
        "close_reason",
        "counters",
        "failed",
        "failure",
        "inbox",
        "incoming",
        "lingering",
        "outgoing",
        "pending",
        "pings",
        "plain",
        "proto",
        "state",
    )

    def __init__(
        self,
        extensions: list[Extension],
        max_size: int,
        counters: Counters,
        *,
        ping_interval: float = 0.0,
        ping_timeout: float = 0.0,
        early: bytes = b"",
    ) -> None:
        """``extensions`` as the handshake agreed on them; ``early``: frames that came
        right behind the handshake request."""
        self.proto = FrameProtocol(client=False, extensions=extensions)
        deflates = [ext for ext in self.proto.extensions if isinstance(ext, BoundedDeflate)]
        self.plain = not self.proto.extensions  # a frame is a head and the payload
        self.state = OPEN
        self.counters = counters
        self.incoming = Incoming(max_size, deflates[0] if deflates else None)
        self.inbox: collections.deque[str | bytes] = collections.deque()
        self.outgoing: list[bytes] = []  # frames in the order made, for one writer to send
        self.pending: tuple[int, str] | None = None  # a close held until the app caught up
        self.failure: str | None = None  # why we fail it: "protocol_error" or "limit"
        self.failed = False  # we failed it: what the client still sends is dropped
        self.lingering = False  # a close came behind messages: the app's answers still go
        self.app_done = False  # the app returned: messages are no longer kept
        self.close_code: int | None = None
        self.close_reason = ""
        self.pings = Pings(ping_interval, ping_timeout)
        self.close_by = math.inf  # the client's part of a close, once ours is done
        self._frames: Iterator[Frame] | None = None  # parsed, not acted on yet
        if early:
            self.receive_data(early)

    @property
    def open(self) -> bool:
        """Neither side has closed (nor failed the connection)."""
        return self.state is OPEN

    @property
    def awaiting_close(self) -> bool:
        """Our close frame is out and the client's answer has not come."""
        return self.state is LOCAL_CLOSING

    # -- input ------------------------------------------------------------------------------

    @property
    def unread(self) -> bool:
        """Received bytes may hold frames :meth:`step` has not acted on yet."""
        return self._frames is not None or self.incoming.inflating

    def receive_data(self, data: bytes) -> bool:
        """Bytes from the client. False if they are dropped: we failed the connection, or
        the client's close came (nothing after it counts)."""
        if (self.state is not OPEN and self.state is not LOCAL_CLOSING) or self.failed:
            return False
        self.proto.receive_bytes(data)
        if self._frames is None:
            self._frames = self.proto.received_frames()
        return True

    def step(self) -> Step:
        """Act on what was received, up to the next thing the driver must do."""
        if self.failed:  # what the client still sends is dropped unread
            self._frames = None
            return Step.IDLE
        if self.incoming.inflating:
            step = self._inflate()
            if step is not None:
                return step
        while (frames := self._frames) is not None:
            try:
                frame = next(frames, None)
            except ParseFailed as exc:  # the client broke the protocol: 1002, 1007
                self._frames = None
                return self._fail(exc.code, str(exc), "protocol_error")
            if frame is None:
                self._frames = None
                break
            opcode = frame.opcode
            if opcode is TEXT or opcode is BINARY:
                step = self._data(frame)
                if step is not None:
                    return step
            elif opcode is PING:
                if self.state is OPEN:
                    self.outgoing.append(bytes(self.proto.pong(frame.payload)))  # type: ignore[arg-type]
            elif opcode is PONG:
                if self.pings.answered():
                    return Step.PONG
            elif opcode is CLOSE:
                return self._close_frame(frame.payload)  # type: ignore[arg-type]
        return Step.IDLE

    def _data(self, frame: Frame) -> Step | None:
        """A piece of a message as wsproto parsed it."""
        incoming = self.incoming
        if self.state is not OPEN or self.pending is not None:
            incoming.drop()  # we are closing: what still comes is dropped
            return None
        try:
            message = incoming.take(frame)
        except TooBig:
            return self._fail(TOO_BIG, "message too big", "limit")
        if incoming.inflating:
            return self._inflate()
        if message is not None:
            self._deliver(message)
        return None

    def _inflate(self) -> Step | None:
        """Inflate one piece of the compressed frame piece in hand: BUSY while more is to
        come, HELD when the message fails (over the limit: 1009; not deflate, or not
        UTF-8: 1007), None once it is all taken."""
        incoming = self.incoming
        if self.state is not OPEN or self.pending is not None:
            incoming.drop()  # we are closing: what still comes is dropped
            return None
        try:
            message = incoming.inflate()
        except TooBig:
            return self._fail(TOO_BIG, "message too big", "limit")
        except zlib.error:
            return self._fail(INVALID_DATA, "error in extension", "protocol_error")
        except UnicodeDecodeError as exc:
            return self._fail(INVALID_DATA, str(exc), "protocol_error")
        if incoming.inflating:
            return Step.BUSY
        if message is not None:
            self._deliver(message)
        return None

    def _deliver(self, message: str | bytes) -> None:
        self.counters.ws_in += 1
        if not self.app_done:
            self.inbox.append(message)

    def _fail(self, code: int, reason: str, failure: str) -> Step:
        """Fail the connection with ``code``, once the app has caught up (held as a close
        is)."""
        self.pending = (code, reason)
        self.failure = failure
        return Step.HELD

    def _close_frame(self, payload: tuple[int, str]) -> Step:
        """A close from the client, or its answer to ours."""
        if self.state is LOCAL_CLOSING:
            self.state = CLOSED
            return Step.CLOSED
        self.state = REMOTE_CLOSING
        self.pending = payload
        self.lingering = True  # RFC 6455 5.5.1: the app's answers may still go first
        return Step.HELD

    def settle(self) -> bool:
        """Act on the close held back (the app has answered what came before it, or had
        its time): answer the client's close, or fail the connection with the held code.
        True if there was one: the driver sends the answer, then half-closes."""
        held, self.pending = self.pending, None
        self.lingering = False
        if held is None:
            return False
        code, reason = held
        self.end(code, reason)
        if self.state is REMOTE_CLOSING:
            self._close(code, reason)  # the client's code and reason, back
        elif self.state is OPEN:
            self.failed = True
            self._close(code, reason)
        return True

    def end(self, code: int, reason: str) -> bool:
        """Say how the session ended (the first say is kept); True if it ends now."""
        if self.close_code is not None:
            return False
        self.close_code = code
        self.close_reason = reason
        return True

    def lost(self) -> None:
        """The connection is gone (EOF, an error): whatever did not close cleanly is 1006."""
        self.end(ABNORMAL, "")
        self.pending = None
        self.lingering = False

    # -- output -----------------------------------------------------------------------------

    def send_message(self, message: str | bytes | bytearray | memoryview) -> bool:
        """Frame a message of the app's (str: text, else binary) and queue it; False if
        the session no longer sends messages."""
        state = self.state
        if state is OPEN:
            if self.plain:
                frame = data_frame(message)
            else:
                frame = bytes(self.proto.send_data(message))  # type: ignore[arg-type]
        elif state is REMOTE_CLOSING and self.lingering:
            # RFC 6455 5.5.1: the answer to a close may wait until the message being
            # sent is sent (the app answers the messages that came before the close)
            frame = bytes(self.proto.send_data(message))  # type: ignore[arg-type]
        else:
            return False
        self.outgoing.append(frame)
        return True

    def close(self, code: int, reason: str) -> bool:
        """Start the close handshake; False if the session is closing already."""
        if self.state is not OPEN or self.pending is not None:
            return False
        self.end(code, reason)
        self._close(code, reason)
        return True

    def _close(self, code: int, reason: str) -> None:
        self.outgoing.append(bytes(self.proto.close(code, reason or None)))
        self.state = CLOSED if self.state is REMOTE_CLOSING else LOCAL_CLOSING

    def take_outgoing(self) -> bytes:
        """What was framed since the last take, in order, to be sent now."""
        outgoing = self.outgoing
        if not outgoing:
            return b""
        data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
        outgoing.clear()
        return data

    # -- deadlines --------------------------------------------------------------------------

    def schedule_ping(self, now: float) -> float:
        """The next ping is due ``--ws-ping-interval`` from ``now`` (never without pings,
        or once the session is closing)."""
        return self.pings.schedule(now, self.state is OPEN)

    def ping(self) -> bool:
        """Queue a ping; False if the session is closing (no more pings)."""
        if self.state is not OPEN:
            return False
        self.outgoing.append(bytes(self.proto.ping(b"trioherd")))
        return True

    def close_started(self, now: float) -> float:
        """Our side of the close is done at ``now``: the client has CLOSE_TIMEOUT for its
        part. The deadline (the earliest asked for)."""
        self.close_by = min(self.close_by, now + CLOSE_TIMEOUT)
        return self.close_by


def data_frame(message: str | bytes | bytearray | memoryview) -> bytes:
    """An unfragmented, unmasked (server) data frame without extensions (RFC 6455 5.2), as
    wsproto would make it, without its per-frame bookkeeping."""
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
