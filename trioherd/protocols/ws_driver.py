"""The Trio machinery under one WebSocket: it owns the stream, the tasks and the timers
around a session without I/O (``protocols.ws_session.Session``).

- :class:`Writer`: the writer's turn. Every frame the session makes is queued in the
  order it was made; one task at a time sends what is queued (a compressed frame must
  follow the ones made before it).
- :class:`Keepalive`: a task that pings the client at the session's ``ping_at`` and
  drops it if the pong is not there at ``by``.
- :class:`Reader`: who reads, and what follows from what is read. The app's task reads
  while it waits for a message; a watcher task reads for it while it does not, answers
  pings, sees a close, settles a close held behind messages, and gives the client
  ``CLOSE_TIMEOUT`` to finish a close.

``protocols.websocket.WebSocket`` (the app's object) puts the three together. An asyncio
driver would put its own three around the same session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from .closing import STREAM_ERRORS
from .http1 import HTTPConnection
from .rawstream import RECEIVE_SIZE, RawSocketStream
from .ws_session import CLOSE_TIMEOUT, Session, Step, WebSocketClosed

INBOX = 16
"""Messages the watcher reads ahead for an app that is away; then it stops reading."""
AWAY = 0.5
"""Seconds an app may spend away from receive() before the watcher reads for it."""


class Writer:
    """The writer's turn: what the session framed goes out in the order it was framed,
    one send at a time."""

    __slots__ = ("_http", "_on_broken", "_session", "_turns", "_writing", "broken")

    def __init__(self, http: HTTPConnection, session: Session, on_broken: Callable[[], None]):
        self._http = http
        self._session = session
        self._on_broken = on_broken  # called once, when a send fails
        self._writing = False
        self._turns = trio.lowlevel.ParkingLot()
        self.broken = False

    async def flush(self) -> bool:
        """Send what the session queued; False if the connection is broken (now or
        before: what was queued is lost)."""
        while self._writing:  # (the turn taken here, not in _take_turn: it is every send's)
            await self._turns.park()
        self._writing = True
        try:
            data = self._session.take_outgoing()
            if data and not self.broken:
                await self._http.write(data)
        except STREAM_ERRORS:
            self.broken = True
            self._on_broken()
        finally:
            self._end_turn()
        return not self.broken

    async def send_eof(self) -> None:
        """Send what is queued, then half-close a plain connection (in the same turn)."""
        await self._take_turn()
        try:
            data = self._session.take_outgoing()
            if data and not self.broken:
                await self._http.write(data)
            stream = self._http.stream
            if isinstance(stream, trio.abc.HalfCloseableStream) and not self.broken:
                await stream.send_eof()
        except (OSError, *STREAM_ERRORS):
            pass  # the reader sees the end
        finally:
            self._end_turn()

    @property
    def busy(self) -> bool:
        """A send is under way (it may be one the client does not take)."""
        return self._writing

    async def wait_turn(self) -> None:
        """Until the sends under way now are over (the turn passes on)."""
        await self._take_turn()
        self._end_turn()

    async def _take_turn(self) -> None:
        while self._writing:
            await self._turns.park()
        self._writing = True

    def _end_turn(self) -> None:
        self._writing = False
        if self._turns:
            self._turns.unpark()


class Keepalive:
    """The pings: one every ``--ws-ping-interval``; a client whose pong does not come
    within ``--ws-ping-timeout`` of its ping going out is dropped (``on_timeout``).

    A client that does not read cannot answer: while a send of ours is under way (the
    client may not be taking it), the send timeout decides, not the ping's. A ping that
    waits for its turn to go out is not timed; a pong overdue while a send is under way
    is waited for until that send is over, then for ``--ws-ping-timeout`` more (the
    ping reaches the client behind what was sent)."""

    __slots__ = ("_on_timeout", "_pong", "_session", "_writer")

    def __init__(self, session: Session, writer: Writer, on_timeout: Callable[[], None]):
        self._session = session
        self._writer = writer
        self._on_timeout = on_timeout
        self._pong = trio.Event()

    def pong(self) -> None:
        """The client answered."""
        self._pong.set()

    async def run(self) -> None:
        session = self._session
        pings = session.pings
        while session.schedule_ping(trio.current_time()) < float("inf"):
            await trio.sleep_until(pings.at)
            if not session.ping():
                return  # closing: no more pings
            self._pong = trio.Event()
            if not await self._writer.flush() or not await self._answered():
                return

    async def _answered(self) -> bool:
        """Wait for the pong of the ping just sent; False if the pings are over (no
        pong in time: the client is dropped; or the session is closing, or broken)."""
        pings, writer = self._session.pings, self._writer
        deadline = pings.sent(trio.current_time())
        while True:
            with trio.move_on_at(deadline):
                await self._pong.wait()
            if self._pong.is_set():
                return True
            if not self._session.open or writer.broken:
                return False  # closing: the close has its own deadline
            if not writer.busy:
                self._on_timeout()
                return False
            await writer.wait_turn()  # a send under way: the send timeout decides
            deadline = pings.sent(trio.current_time())


class Reader:
    """Who reads for the session, and what follows from what is read.

    The app's task reads from the connection itself while it waits in
    :meth:`next_message`, so a message costs one trip through Trio's scheduler; the
    watcher (:meth:`watch`, a task) reads for it while it does not (away for AWAY
    seconds, done, or the connection is closing), so that pings are answered and a close
    is seen. A close (or a failure) that comes behind messages waits until the app has
    answered them, at most CLOSE_TIMEOUT. Answers the app held back (corked) are sent by
    the watcher once the app yields, if nothing sent them before.
    """

    __slots__ = (
        "_alarm",
        "_caught_up",
        "_cut",
        "_http",
        "_in_receive",
        "_keepalive",
        "_receives",
        "_session",
        "_sock",
        "_stats",
        "_waiting",
        "_watch_lot",
        "_watch_scope",
        "_writer",
        "done",
        "reading",
    )

    def __init__(
        self,
        http: HTTPConnection,
        session: Session,
        writer: Writer,
        keepalive: Keepalive,
        cut: Callable[[str, str], None],
    ) -> None:
        self._http = http
        self._session = session
        self._writer = writer
        self._keepalive = keepalive
        self._cut = cut  # notes a cut (the WebSocket's, once: see note_cut)
        stream = http.stream
        self._sock = stream.lend_socket() if isinstance(stream, RawSocketStream) else None
        self._stats = http.state.stats
        self.reading = False  # a task is reading (the app, or the watcher)
        self._in_receive = False  # the app waits in receive(): it answered what it got
        self._receives = 0  # receive() calls that had to wait: the app is not away
        self._waiting: trio.lowlevel.Task | None = None  # the app, waiting for the watcher
        self._caught_up = trio.lowlevel.ParkingLot()  # a held close, until the app caught up
        self._watch_lot = trio.lowlevel.ParkingLot()  # the watcher, while the app reads
        self._alarm = trio.lowlevel.ParkingLot()  # the watcher, until a close or the end
        self._watch_scope = trio.CancelScope()
        self.done = trio.Event()
        """Set when the connection is over: close handshake done, or connection lost."""

    # -- the app's side ---------------------------------------------------------------------

    async def next_message(self) -> str | bytes:
        """Wait for the next message (the inbox is empty); raises WebSocketClosed once
        the session is closed."""
        session = self._session
        inbox = session.inbox
        self._in_receive = True
        self._receives += 1
        try:
            if session.outgoing:
                await self._writer.flush()  # answers held back go first
            while not inbox:
                if session.pending is not None:  # the app answered what came before it
                    await self.settle()
                if session.close_code is not None:
                    raise WebSocketClosed(session.close_code, session.close_reason)
                if self.reading:  # the watcher reads: wait for what it finds
                    self._waiting = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(self._abort_waiting)
                else:
                    await self._read_some()
            return inbox.popleft()
        finally:
            self._in_receive = False
            if self._watch_lot:
                self._watch_lot.unpark()  # the watcher waits for the app to go away

    def corked(self) -> bool:
        """Whether an answer of the app's may be held back: more messages are already
        read (it will answer them too: sent together), nobody reads, no close waits."""
        session = self._session
        return bool(session.inbox) and not self.reading and session.pending is None

    def wake(self) -> None:
        """Something changed for the watcher and a waiting app: the session ended (the app's
        receive says how, at once; the watcher reads from now on), the app returned, or
        answers are held back (sent once the app yields, at the latest)."""
        self._wake_app()
        self._watch_lot.unpark_all()
        self._alarm.unpark_all()

    def app_returned(self) -> None:
        self.wake()
        self._caught_up.unpark_all()

    def wait_for_client(self) -> None:
        """From now on the watcher waits at most CLOSE_TIMEOUT for the client's part."""
        self._watch_scope.deadline = self._session.close_started(trio.current_time())

    def _abort_waiting(self, _: Any) -> trio.lowlevel.Abort:
        self._waiting = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_app(self) -> None:
        """Wake the app if it waits for what the watcher reads (once)."""
        task, self._waiting = self._waiting, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    # -- reading ----------------------------------------------------------------------------

    async def _read_some(self) -> None:
        """Read once from the client (or take what came with the handshake) and act on
        it. (A read of the app's is not cut short by our close: the client's answer, or
        the watcher's deadline, ends it.)"""
        self.reading = True
        session = self._session
        try:
            if not session.unread:
                try:
                    data = await self._receive_data()
                except (OSError, *STREAM_ERRORS):
                    data = b""
                if not data:
                    self.lost()
                    return
                self._stats.bytes_in += len(data)
                if not session.receive_data(data):
                    return  # closing: read and dropped until EOF
            await self._act()
        finally:
            self.reading = False
            self._wake_app()  # if it waits for what the watcher read
            if self._alarm and (session.close_code is not None or session.app_done):
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

    async def _act(self) -> None:
        """Act on what the session parsed: let other tasks run between the pieces of a big
        compressed message, wake the ping's waiter, send the answers to pings, and answer
        a close (now, or once the app has answered the messages before it)."""
        session = self._session
        while True:
            step = session.step()
            if step is Step.BUSY:
                await trio.lowlevel.checkpoint()
            elif step is Step.PONG:
                self._keepalive.pong()
            else:
                break
        if session.outgoing:
            await self._writer.flush()
        if step is Step.CLOSED:  # the client answered our close
            await self._half_close()
        elif step is Step.HELD:
            if session.app_done or (self._in_receive and not session.inbox):
                await self.settle()

    def lost(self) -> None:
        """The read side is over (EOF, error): whatever did not close cleanly is 1006."""
        self._session.lost()
        self.wake()
        self.done.set()
        self._caught_up.unpark_all()

    async def settle(self) -> None:
        """Act on the close held back: answer the client's close, or fail the connection
        with the protocol error's code (1002, 1007) or 1009."""
        session = self._session
        settled = session.settle()
        self._caught_up.unpark_all()
        if not settled:
            return
        self.wake()
        if session.failed and session.failure is not None:
            detail = f"closed with {session.close_code}: {session.close_reason}"
            self._cut(session.failure, detail)
        await self._half_close()

    async def _half_close(self) -> None:
        """Our side is done (RFC 6455 7.1.1: the server closes the TCP connection first):
        send what is queued, half-close a plain connection, and let the watcher wait a
        moment for the client's end. Over TLS the connection closes (close_notify first)
        once the app is done."""
        self.wait_for_client()
        self._alarm.unpark_all()
        await self._writer.send_eof()
        if not isinstance(self._http.stream, trio.abc.HalfCloseableStream):
            self.done.set()  # TLS: the connection's close is the end: no waiting

    # -- the watcher ------------------------------------------------------------------------

    async def watch(self) -> None:
        """Read for the app while it does not: when it is away (AWAY seconds without
        waiting in receive), done, or the connection is closing; until the end."""
        session = self._session
        with self._watch_scope:
            while not self.done.is_set():
                if session.outgoing:
                    await self._writer.flush()  # answers held back
                if session.pending is not None and not session.app_done:
                    with trio.move_on_after(CLOSE_TIMEOUT):  # the app answers, then settles
                        await self._caught_up.park()
                    if session.pending is not None:
                        await self.settle()
                elif session.close_code is not None or session.app_done:
                    if not self.reading:
                        await self._read_some()
                    else:
                        await self._alarm.park()  # until the app's read is over
                elif self._in_receive:
                    await self._watch_lot.park()  # until the app takes a message
                else:
                    await self._watch_away()
        if self._watch_scope.cancelled_caught:  # the client took too long to close
            if session.awaiting_close:
                self._cut("close_timeout", f"no answer to our close in {CLOSE_TIMEOUT:g} s")
            abort(self._http.stream)
            self.lost()

    async def _watch_away(self) -> None:
        """The app is busy with a message: if it stays away AWAY seconds, read for it."""
        session = self._session
        seen = self._receives
        with trio.move_on_after(AWAY):
            await self._alarm.park()  # a close, the app's end, or answers held back
        if session.outgoing:
            return  # sent first (see watch)
        if seen == self._receives and not self._in_receive and not self.reading:
            if len(session.inbox) < INBOX and session.close_code is None and not session.app_done:
                await self._read_some()


def abort(stream: trio.abc.Stream) -> None:
    """Close the socket under ``stream`` now: whatever waits on it is woken with
    ClosedResourceError (the connection's own close follows later)."""
    transport = getattr(stream, "transport_stream", stream)
    if isinstance(transport, RawSocketStream):
        transport.close()
    elif isinstance(transport, trio.SocketStream):
        transport.socket.close()
