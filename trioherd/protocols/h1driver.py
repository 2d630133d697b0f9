"""HTTP/1.1 over a stream, for any runtime: one coroutine per connection, none per request.

The layout: ``protocols.h1core`` is the protocol without I/O (parsing with h11, the limits,
forwarded headers, keep-alive, deadlines as numbers, one Exchange per request);
:class:`H1Driver` drives it over a :class:`Link` (the connection's stream: reads, writes,
an interrupt for a deadline), runs the app through an adapter, and turns errors into
answers. It awaits only its link's methods, so it runs on any event loop: a runtime gives
it a link and its hooks (:attr:`H1Driver.STREAM_ERRORS`, :meth:`H1Driver.yield_turn`,
:meth:`H1Driver.close`, and for adapters :meth:`H1Driver.checkpoint` and
:meth:`H1Driver.event`). ``protocols.http1.HTTPConnection`` is the Trio runtime's
connection, ``aio.connection.AioConnection`` asyncio's. ``protocols.framing`` turns a
response into bytes (sans I/O). An adapter (``apps.native``, ``apps.asgi``), chosen once per
worker, runs the app for one request and writes its response through
:meth:`H1Driver.send_complete`, or :meth:`H1Driver.head` and :meth:`H1Driver.send` with
``framing.body`` and ``framing.end``.

Timeouts, as deadlines the worker's sweeper enforces (``ServerState.sweep`` and
:meth:`H1Driver.expire`: it interrupts the connection's wait on its link):
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
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar, Protocol

import h11

from .framing import Fields, reason
from .h1core import (
    NEED_DATA,
    BodyTooLarge,
    ClientGone,
    Exchange,
    H1Core,
    RequestHead,
    bare_lf_line,
    chunk_left,
)
from .shared import APP, BODY, HEAD, IDLE, RECEIVE_SIZE, SEND, Host, SendWatch
from .sockinfo import queued_bytes, unread_bytes

__all__ = ["Adapter", "BodyReader", "H1Driver", "Link"]

log = logging.getLogger("trioherd.http")

SOON_MAX = 16384  # answers up to this size may be handed to the flusher (send_soon)
_CUT_REASONS = {HEAD: "head_timeout", BODY: "body_timeout", SEND: "send_timeout"}


class Link(Protocol):
    """A connection's stream as the driver uses it (``protocols.rawstream.RawSocketStream``
    and ``protocols.tlsstream.TLSSocketStream`` in the Trio runtime, ``aio.link.AioLink``
    in asyncio's). ``socket`` is the connection's socket, for the kernel's counts."""

    watch: SendWatch | None

    async def receive_some(self, max_bytes: int | None = None) -> bytes: ...

    async def receive_next(self, max_bytes: int | None = None) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...

    def send_soon(self, data: bytes) -> bool: ...

    async def send_final(self, data: bytes) -> None: ...

    def interrupt(self) -> bool: ...

    def resume(self) -> None: ...


class BodyReader:
    """Async iterator over the request body, reading from the connection on demand."""

    __slots__ = ("_http", "done", "received")

    def __init__(self, http: H1Driver) -> None:
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
        exchange = http.exchange
        if conn.they_are_waiting_for_100_continue and not exchange.sent_continue:
            exchange.sent_continue = True
            if not exchange.response_started:  # no 1xx once a final response has begun
                await http.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        limit = http.state.config.max_body_size
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                left = chunk_left(conn)
                if left > limit - self.received:  # never wait for what we refuse
                    raise BodyTooLarge(self.received + left)
                if not left and bare_lf_line(conn):
                    raise h11.RemoteProtocolError("chunk line ends in a bare LF", 400)
                await http.receive_body()
                continue
            kind = type(event)
            if kind is h11.Data:
                data = bytes(event.data)
                self.received += len(data)
                if self.received > limit or (
                    event.chunk_start and chunk_left(conn) > limit - self.received
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


class Adapter(Protocol):
    """An app interface (native, ASGI), chosen once per worker: runs the app for one
    request (its Exchange: the request line, fields, client) and writes its response
    through the connection; returns the status, for the counters and the access log.
    Raises what the app raised; BodyTooLarge or ClientGone from the body; ClientGone for a
    response it could not finish."""

    async def __call__(self, http: Any, request: Exchange) -> int: ...


class H1Driver(H1Core):
    """Serves the requests of one connection until it closes: the reads, writes and
    errors around the protocol core (:class:`~.h1core.H1Core`), over its :class:`Link`.
    A runtime's connection class gives the hooks (see the module docstring).

    Responses are framed by ResponseFraming, directly as bytes, with the framing HTTP/1.1
    asks for: that skips most of h11's per-event bookkeeping, which costs more than the
    parsing itself.
    """

    __slots__ = ("adapter", "send_mark", "server", "stalled_in", "stream")

    STREAM_ERRORS: ClassVar[tuple[type[BaseException], ...]] = ()
    """What the link raises once the client or our own close has ended it."""

    def __init__(
        self,
        state: Host,
        adapter: Adapter,
        stream: Link,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None = None,
        scheme: str = "http",
        tls: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(state, client, tls)
        self.state: Host = state
        self.adapter = adapter
        # a raw socket, plain or under TLS: it says when a send stalls (send_stalled), and
        # a deadline interrupts its waits (expire)
        self.stream = stream
        self.server = server
        self.send_mark = -1  # what the kernel held for the client at the last look
        self.stalled_in = APP  # the phase a stalled send came from (send_stalled)
        stream.watch = self

    def expire(self) -> bool:
        """The current phase ran out of time: end what the connection awaits (its raw
        socket's wait, see RawSocketStream.interrupt). False if the task is not waiting:
        not expired, it runs and moves on.

        Also False while bytes of the client's wait unread in the kernel (for at most a
        header timeout past the deadline): they came in time, and this worker, held up
        (a blocking app, a starved machine), has yet to read them; the task reads them at
        its next turn and sets the next deadline, or the next sweep judges again."""
        if (
            self.phase is not SEND
            and unread_bytes(self.stream)
            and self.state.now() - self.deadline < self.state.config.header_timeout
        ):
            return False
        if not self.stream.interrupt():
            return False
        self.expired = self.phase
        self.deadline = math.inf
        return True

    # -- the runtime's hooks -------------------------------------------------------------

    async def yield_turn(self) -> None:
        """Let the worker's other connections run (before a pipelined request)."""
        raise NotImplementedError

    async def close(self, linger: bool, reset: bool) -> None:
        """End the connection (see ``protocols.closing.close_stream``)."""
        raise NotImplementedError

    async def checkpoint(self) -> None:
        """A point where the task may be cancelled, and others run (for an adapter)."""
        raise NotImplementedError

    def queued(self) -> int:
        """Bytes of ours the client has yet to take (the kernel's count; a runtime whose
        transport buffers writes adds what it holds)."""
        return queued_bytes(self.stream)

    def event(self) -> Any:
        """A new event of the runtime (``set``, ``is_set``, ``await wait()``), for an
        adapter that waits for something another task does."""
        raise NotImplementedError

    # -- I/O helpers -------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Send part of the response (from now on, no other response can be given)."""
        self.exchange.response_started = True
        await self.write(data)

    async def write(self, data: bytes) -> None:
        self.state.stats.bytes_out += len(data)
        await self.stream.send_all(data)

    def send_stalled(self) -> None:
        """The raw socket's buffer is full, and the client took what it could since the
        last stall: it has ``send_timeout`` to take more (see ServerState.sweep). (An
        answer left by ``send_soon`` stalls in IDLE: that wait begins anew after it.)"""
        if self.phase != SEND:
            self.stalled_in = self.phase
        self.phase = SEND
        self.send_mark = -1
        self.deadline = self.state.now() + self.state.config.send_timeout

    def check_send(self, now: float) -> None:
        """A send is waiting: if the kernel's queue for the client changed since the last
        look, the client took some, and ``send_timeout`` starts again. (Writability alone
        would not say: it comes only once a third of the send buffer is free, which
        takes a slow reader longer than the timeout with a big buffer.)"""
        queued = self.queued()
        if queued != self.send_mark:
            self.send_mark = queued
            self.deadline = now + self.state.config.send_timeout

    def send_resumed(self) -> None:
        """The send that stalled is complete."""
        if self.stalled_in == IDLE:
            self.phase = IDLE
            self.deadline = self.state.now() + self.state.idle_wait()
        else:
            self.phase = APP
            self.deadline = math.inf

    async def receive_body(self) -> None:
        """Read more of a request body; each read must come within ``header_timeout``."""
        self.phase = BODY
        self.deadline = self.state.now() + self.state.config.header_timeout
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
            try:  # (a deadline ends a wait through the stream: see expire)
                linger = await self._serve_requests()
            except self.STREAM_ERRORS:
                if self.expired not in (HEAD, BODY):
                    raise
            if self.expired in (HEAD, BODY):
                linger = await self._answer_expired()
        except h11.RemoteProtocolError as exc:
            await self.answer_late(exc.error_status_hint, str(exc))
            linger = True
        except self.STREAM_ERRORS:
            pass
        finally:
            state.connections.discard(self)
            # a cut, counted and logged; an idle connection's end is not one (it was kept
            # alive as long as promised), or was counted when shed
            reason = _CUT_REASONS.get(self.expired) if self.expired is not None else None
            if reason is not None and self.exchange.switched:
                state.stats.cuts.add(reason, 1)  # the new protocol logged it (a WebSocket)
            elif reason is not None:
                state.cut(reason, self.peer)
            await self.close(linger, reset=self.expired == SEND)

    async def _serve_requests(self) -> bool:
        """Serve requests until the connection ends; True if its close must linger: after
        an error answer, or with bytes of the client's we leave unread (see _close)."""
        stream = self.stream
        while True:
            # the next request (h11's Request, or a RequestHead another parser read), or at
            # the end h11.ConnectionClosed or None (read here, not in a coroutine of its
            # own: this is every request's path)
            event = self.await_request()
            if event is NEED_DATA:
                # after a response on a raw socket, wait for the next request before reading
                receive = stream.receive_next if self.served else stream.receive_some
                while event is NEED_DATA:
                    event = self.head_bytes(await receive(RECEIVE_SIZE))
            else:  # pipelined: already here, but others go first
                await self.yield_turn()
            if event is None or type(event) is h11.ConnectionClosed:
                return False
            if not await self._serve_request(event):
                return True
            # usually just h11's EndOfMessage; else read and drop the rest (bounded by
            # max_body_size and header_timeout), even before a close: a client that
            # sends its whole body before it reads would meet a reset otherwise
            if (
                not self.exchange.bodyless  # else nothing to read: the usual case, no call
                and self.unread_body()
                and not await self._discard_body()
            ):
                return True  # linger: read what comes for a moment, then close
            end = self.next_request()
            if end is not None:
                return end

    async def _serve_request(self, request: RequestHead) -> bool:
        """Run the app for one request; False if the connection must end at once."""
        refusal = self.begin(request)
        if refusal is not None:
            await self._reject(*refusal)
            return False
        exchange = self.exchange
        sent_before = self.state.stats.bytes_out
        status = 500
        try:
            status = await self.adapter(self, exchange)
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
        except self.STREAM_ERRORS:
            status = 499  # the client went away under us
            raise
        except Exception:
            log.exception(
                "app raised on %s %s", exchange.method.decode(), exchange.target.decode("latin-1")
            )
            status = 500
            await self._send_error(500, None)  # unless a response began: it cannot be mended
            return False
        finally:
            expired = self.expired  # a 408 is answered and counted by run()
            if expired is None or expired == SEND:  # a client that took nothing: 499
                status = 499 if expired == SEND else status
                self.count(status, self.state.stats.bytes_out - sent_before)
        return True

    async def _discard_body(self) -> bool:
        """Read and drop an unread request body so the connection can be reused."""
        if self.conn.they_are_waiting_for_100_continue and not self.exchange.sent_continue:
            return False  # never told them to send it: closing is cheaper than reading it
        reader = BodyReader(self)
        try:
            while await reader.next_chunk():
                pass
        except (BodyTooLarge, ClientGone):
            return False
        return True

    # -- responses -------------------------------------------------------------------------

    def head(self, status: int, headers: Fields, length: int | None) -> bytes:
        """The response head (see ResponseFraming.head); the body follows through
        ``framing.body`` and ``framing.end``."""
        return self.framing.head(status, headers, length, self.closes_after_response())

    async def send_complete(self, status: int, headers: Sequence[Any], body: bytes) -> None:
        """A response whose body is known: head and body in one send_all."""
        # H1Core.closes_after_response, written out: the hot path, where a call costs
        # more than the test
        close = self.state.draining or (
            not self.exchange.bodyless and self.conn.they_are_waiting_for_100_continue
        )
        data = self.framing.complete(status, headers, body, close)
        # a small answer on a connection that goes on: the worker's flusher writes it with
        # the other answers of this pass, and this task goes straight back to waiting; the
        # connection's last answer goes at once (RawSocketStream.send_final)
        last = not self.framing.keep_alive
        raw = self.stream
        if last or (len(data) <= SOON_MAX and raw.send_soon(data)):
            self.exchange.response_started = True
            self.state.stats.bytes_out += len(data)
            if last:
                await raw.send_final(data)
            return
        await self.send(data)

    async def _reject(self, status: int, detail: str) -> None:
        """An error answer to a request the app never saw; counted and logged like any."""
        exchange = self.unread()
        if exchange.response_started:
            return
        before = self.state.stats.bytes_out
        if not exchange.started and self.state.config.access_log:
            exchange.started = time.perf_counter()
        await self._send_error(status, detail)
        self.count(status, self.state.stats.bytes_out - before)

    async def answer_late(self, status: int, detail: str) -> None:
        """An error answer after a deadline interrupted the stream (or a protocol error
        ended the loop): the stream's waits are resumed, and a send that stalls gets the
        send timeout like any (a client that does not read is reset)."""
        self.stream.resume()
        await self._reject(status, detail)

    async def _answer_expired(self) -> bool:
        """The request's head or body did not come in time: 408, unless a response has
        begun (then it is only counted). True: the close lingers."""
        if self.exchange.response_started:  # too late to say so: count it, then drop
            self.count(408, 0)
        else:
            what = "head" if self.expired == HEAD else "body"
            await self.answer_late(408, f"request {what} not received in time")
        return True

    async def _send_error(self, status: int, detail: str | None) -> None:
        if status == 413 or status == 431:
            self.state.cut("limit", self.exchange.client)
        if self.exchange.response_started:
            return
        body = b"%d %s\n" % (status, reason(status))
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        try:
            await self.send(self.framing.complete(status, headers, body, close=True))
        except self.STREAM_ERRORS:
            pass
        if detail:
            log.debug("%d to %s: %s", status, self.exchange.client, detail)
