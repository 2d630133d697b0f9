"""TLS for the HTTP hot path: OpenSSL's record layer on memory BIOs, over the worker's own
link (the Trio runtime's :class:`~.rawstream.RawSocketStream`, the asyncio runtime's
``aio.link.AioLink``). No event loop here: :class:`TLSLink` awaits only its link, and a
runtime gives it two hooks (``protocols.tlsstream.TLSSocketStream`` is Trio's).

trio's SSLStream drives the same ``ssl.SSLObject``, but through layers that each cost on
every request: a trio SocketStream under it, a conflict detector and two locks, a generic
retry loop, and a scheduling round around every read and write. Here a request costs one
``recv`` into the incoming BIO and one ``read`` of plaintext, and an answer one ``write``
and one ``send``; the waits are the raw stream's, so TLS connections get what plain ones
get: the edge-triggered wait for the next request, the flusher for small answers
(``send_soon``), send stalls reported to the connection (``watch``), and deadlines through
``interrupt`` instead of a cancel scope.

Why not ``SSLContext.wrap_socket`` on the non-blocking socket (OpenSSL reading and writing
the fd itself)? Python gives no way to turn on OpenSSL's read-ahead, so every record is two
``recv`` calls (its header, then its body), and since OpenSSL reads no further, a reader
woken by the edge-triggered wait must try once more (an EAGAIN and an exception) to know
that the kernel holds nothing else. With a memory BIO the stream reads the socket itself:
one ``recv`` of up to 64 KiB, which tells at once whether more may wait. What each route
measured is in docs/performance.md ("TLS").

What this stream does not do, and need not for HTTP: two tasks sending at once (a
connection sends from one task, a WebSocket's writers take turns), a half-close (TLS has
none: like trio's SSLStream this is not a HalfCloseableStream), renegotiation (TLS 1.3 has
none; OpenSSL refuses a client's in 1.2). ``aclose`` closes the socket without a
``close_notify``; the polite close is :meth:`TLSSocketStream.send_close_notify`, which
``protocols.closing`` sends on every close of an HTTP connection.

Bytes OpenSSL makes while it reads (a KeyUpdate's answer, a refusal of renegotiation) are
sent at once, unless a send is under way (then they leave ahead of the next answer); the
session tickets the handshake made wait for the first answer.
"""

from __future__ import annotations

import math
import ssl
from typing import Any, Protocol

from .shared import HEAD, RECEIVE_SIZE, Phase, SendWatch


class Carrier(Protocol):
    """The link under TLS, which carries its records (a runtime's raw link)."""

    watch: SendWatch | None

    @property
    def can_send_soon(self) -> bool: ...

    @property
    def pending(self) -> bool: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes: ...

    async def receive_next(self, max_bytes: int | None = None) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...

    async def send_final(self, data: bytes) -> None: ...

    def send_soon(self, data: bytes) -> bool: ...

    def send_nowait(self, data: bytes) -> bytes: ...

    async def flush_pending(self) -> None: ...

    def interrupt(self) -> bool: ...

    def resume(self) -> None: ...

    def close(self) -> None: ...


PIECE = 262144
"""A larger send is encrypted and sent this much at a time: the ciphertext of a 100 MB
body is never in memory at once, and a send that stalls holds at most this much."""


class TLSLink:
    """The server's side of a TLS connection over a link that carries its records: the
    handshake (:meth:`do_handshake`), then a link of plaintext with the same methods
    (``receive_next``, ``send_soon``, ``send_final``, ``interrupt``, ``resume``,
    ``watch``), which a connection uses the same way. ``transport_stream`` is the link
    under it. A runtime gives two hooks: :meth:`broken` (the error of a connection that
    cannot go on) and :meth:`fair_turn` (a turn for the others after a read that needed
    no wait)."""

    __slots__ = (
        "_broken",
        "_busy",
        "_edge_next",
        "_incoming",
        "_left",
        "_more",
        "_notified",
        "_outgoing",
        "ssl_object",
        "transport_stream",
    )

    transport_stream: Carrier

    def __init__(self, transport: Carrier, context: ssl.SSLContext) -> None:
        """``transport``: the link of the TCP connection (the runtime's)."""
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._more = False  # plaintext may be ready without a read of the socket
        self._edge_next = False  # the next receive_some waits on the EdgeWaiter first
        self._broken = False  # a record went out in part: no close_notify can follow it
        self._busy = False  # a send is under way (a WebSocket's writer, say)
        self._notified = False  # our close_notify is made: nothing can follow it
        self._left = b""  # what close_notify_nowait could not send at once

    def broken(self, message: str) -> Exception:
        """The runtime's error for a connection that cannot go on."""
        raise NotImplementedError

    async def fair_turn(self) -> None:
        """Let the others run (after a read that needed no wait)."""
        raise NotImplementedError

    # -- the handshake ------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """The server's side of the handshake. Raises ssl.SSLError if OpenSSL refuses the
        client (then :meth:`send_alert` sends the alert that says why), the runtime's
        error (:meth:`broken`, or the link's own) if the client goes. Records the client
        sent behind its Finished (its first request, often) stay for the first read.

        With TLS 1.3 what OpenSSL writes once the handshake is done, the session tickets,
        waits for the first answer and goes in its send: the client reads both at once,
        and a send (and a wake-up of the client) is saved. In TLS 1.2 the server's
        Finished is among it, and the client waits for it: it goes at once."""
        transport = self.transport_stream
        outgoing = self._outgoing
        tls = self.ssl_object
        receive = transport.receive_some  # the client's first flight is often here already
        on_edge = False
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if outgoing.pending and not (done and tls.version() == "TLSv1.3"):
                await transport.send_final(outgoing.read())
                # its answer cannot be here yet: wait first, on the worker's EdgeWaiter
                # (RawSocketStream.receive_next), which spares a recv that would fail
                receive, on_edge = transport.receive_next, True
            if done:
                self._more = self._incoming.pending > 0
                # the first request: unless it came with the client's Finished, it is on
                # its way; wait for it where the handshake waited, no failing recv first
                self._edge_next = on_edge and not self._more
                return
            data = await receive(RECEIVE_SIZE)
            if not data:
                raise self.broken("the client closed during the TLS handshake")
            self._incoming.write(data)

    async def send_alert(self) -> None:
        """Send what OpenSSL queued when the handshake failed: the alert that tells the
        client why (protocol_version, certificate_required, unknown_ca, ...)."""
        if self._outgoing.pending:
            await self.transport_stream.send_final(self._outgoing.read())

    # -- reading --------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Plaintext, up to ``max_bytes``; b"" at the end (the client's close_notify, or
        its EOF without one: HTTP clients need not send it)."""
        size = max_bytes or RECEIVE_SIZE
        outgoing = self._outgoing
        if self._more:
            made = outgoing.pending
            data = self._decrypt(size)
            if data is not None:
                if outgoing.pending > made:
                    await self._answer()
                await self.fair_turn()  # fairness: as a raw stream's
                return data
        transport = self.transport_stream
        receive = transport.receive_some
        if self._edge_next:
            self._edge_next = False
            receive = transport.receive_next
        while True:
            cipher = await receive(RECEIVE_SIZE)
            if not cipher:
                return b""
            self._incoming.write(cipher)
            made = outgoing.pending
            data = self._decrypt(size)
            if outgoing.pending > made:
                await self._answer()
            if data is not None:
                return data

    async def receive_next(self, max_bytes: int | None = None) -> bytes:
        """Like receive_some, but for the next request of a keep-alive connection: waits
        on the worker's EdgeWaiter (RawSocketStream.receive_next)."""
        size = max_bytes or RECEIVE_SIZE
        outgoing = self._outgoing
        if self._more:
            made = outgoing.pending
            data = self._decrypt(size)
            if data is not None:
                if outgoing.pending > made:
                    await self._answer()
                await self.fair_turn()
                return data
        transport = self.transport_stream
        while True:
            cipher = await transport.receive_next(RECEIVE_SIZE)
            if not cipher:
                return b""
            self._incoming.write(cipher)
            made = outgoing.pending
            data = self._decrypt(size)
            if outgoing.pending > made:
                await self._answer()
            if data is not None:
                return data

    def _decrypt(self, size: int) -> bytes | None:
        """The plaintext of the records received, up to ``size`` bytes; None if no whole
        record is here yet; b"" after the client's close_notify."""
        read = self.ssl_object.read
        incoming = self._incoming
        try:
            data = read(size)
            if incoming.pending and 0 < len(data) < size:  # more records: as many as fit
                parts = [data]
                got = len(data)
                while got < size and incoming.pending:
                    try:
                        part = read(size - got)
                    except ssl.SSLWantReadError:  # the rest of a record is still to come
                        break
                    if not part:
                        break  # a close_notify: the next read says so
                    parts.append(part)
                    got += len(part)
                data = b"".join(parts)
        except ssl.SSLWantReadError:
            self._more = False
            return None
        except ssl.SSLZeroReturnError:  # the client's close_notify, after ours
            self._more = False
            return b""
        except ssl.SSLError as exc:
            self._broken = True
            raise self.broken(f"TLS error: {exc}") from exc
        # a read that filled ``size`` may leave the rest of its record in OpenSSL
        self._more = len(data) == size or incoming.pending > 0
        return data

    # -- writing --------------------------------------------------------------------------

    def _encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        """The records of ``data``, after what OpenSSL wrote before them (the session
        tickets of TLS 1.3, a KeyUpdate's answer)."""
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            self._broken = True
            raise self.broken(f"TLS error: {exc}") from exc
        return self._outgoing.read()

    @property
    def watch(self) -> SendWatch | None:
        """Told when a send stalls and when it is done (the raw stream's watch)."""
        return self.transport_stream.watch

    @watch.setter
    def watch(self, watch: SendWatch | None) -> None:
        self.transport_stream.watch = watch

    def send_soon(self, data: bytes) -> bool:
        """Encrypt a small answer and hand it to the worker's flusher
        (RawSocketStream.send_soon); False, and nothing encrypted, if it cannot take it."""
        transport = self.transport_stream
        if not transport.can_send_soon:
            return False
        return transport.send_soon(self._encrypt(data))  # True: it could, just now

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) <= PIECE:
            await self._sending(self.transport_stream.send_all, self._encrypt(data))
        else:
            await self.fair_turn()  # as RawSocketStream.send_all
            await self._send_pieces(data)

    async def send_final(self, data: bytes | bytearray | memoryview) -> None:
        """The connection's last answer, written now, without send_all's yield (see
        RawSocketStream.send_final), and our close_notify in the same send: the client
        reads both at once, and closing costs no send of its own. Nothing can be sent
        after it."""
        if len(data) > PIECE:
            await self._send_pieces(data)
            data = b""
        cipher = self._encrypt(data) if data else b""
        if not self._broken:
            cipher += self._close_notify()
        await self._sending(self.transport_stream.send_final, cipher)

    async def _send_pieces(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        send = self.transport_stream.send_final
        for start in range(0, len(view), PIECE):
            await self._sending(send, self._encrypt(view[start : start + PIECE]))

    async def _sending(self, send: Any, cipher: bytes) -> None:
        self._busy = True
        try:
            await send(cipher)
        except BaseException:
            self._broken = True  # some of the record may have left: nothing may follow it
            raise  # (and nothing is sent after it: _busy may stay set)
        self._busy = False

    async def _answer(self) -> None:
        """Send what OpenSSL wrote as it read (not what the handshake left for the first
        answer): its refusal of a client's renegotiation, a KeyUpdate's answer. The client
        may be waiting for it (testssl.sh's renegotiation check is). If another task's send
        is under way (a WebSocket's writer), it leaves ahead of the next answer instead."""
        if not self._busy:
            await self._sending(self.transport_stream.send_all, self._outgoing.read())

    # -- the end ----------------------------------------------------------------------------

    def close_notify_nowait(self) -> bool:
        """Our close_notify, sent at once if the kernel takes it (no wait, no cancel
        scope: the usual case); True if nothing is left to send before the close, else
        :meth:`send_close_notify` finishes it. Nothing is made if it went with the last
        answer (send_final) already, or if a send broke off mid-record, since the client
        could not read it anyway. The client's own close_notify is not awaited."""
        transport = self.transport_stream
        if not self._broken and not self._notified:
            self._left = transport.send_nowait(self._close_notify())
        return not self._left and not transport.pending

    async def send_close_notify(self) -> None:
        """Send what is left before the close: an answer the flusher holds, then our
        close_notify (or what close_notify_nowait left of it)."""
        transport = self.transport_stream
        await transport.flush_pending()
        if not self._broken and not self._notified:
            self._left = self._close_notify()
        left, self._left = self._left, b""
        if left:
            await transport.send_final(left)

    def _close_notify(self) -> bytes:
        """Our close_notify's record, after what OpenSSL still held (b"" if OpenSSL
        refuses: the connection is broken)."""
        self._notified = True
        try:
            self.ssl_object.unwrap()
        except ssl.SSLWantReadError:
            pass  # made; the client's answer is not awaited
        except ssl.SSLError:
            return b""
        return self._outgoing.read()

    def interrupt(self) -> bool:
        """A deadline passed: end the wait the connection's task is in (the raw stream's
        interrupt)."""
        return self.transport_stream.interrupt()

    def resume(self) -> None:
        self.transport_stream.resume()

    def close(self) -> None:
        self.transport_stream.close()


class HandshakeWatch:
    """A connection in its TLS handshake as the worker's sweeper sees it (``Watched``):
    at the handshake timeout it interrupts the handshake's wait, as it ends a waiting
    HTTP connection's, so the handshake needs no cancel scope of its own."""

    __slots__ = ("deadline", "expired", "phase", "served", "stream")

    def __init__(self, stream: TLSLink, deadline: float) -> None:
        self.stream = stream
        self.deadline = deadline
        self.phase = HEAD
        self.served = 0
        self.expired: Phase | None = None

    def check_send(self, now: float) -> None:
        pass  # never in SEND

    def expire(self) -> bool:
        if not self.stream.interrupt():
            return False  # not waiting: it runs, and the next sweep looks again
        self.expired = HEAD
        self.deadline = math.inf
        return True
