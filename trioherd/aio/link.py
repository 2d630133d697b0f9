"""A connection's stream in the asyncio runtime: an :class:`asyncio.Protocol` that the
connection's one task reads from and writes to as the driver asks
(``protocols.h1driver.Link``).

The event loop's transport does the socket I/O (uvloop's in C when it is the loop, and
the TLS records when the listener is TLS); the protocol callbacks only keep what came
and wake the task that waits for it. A task waits on one future at a time: for bytes
(:meth:`AioLink.receive_some`) or for the transport to take more (:meth:`AioLink.send_all`
once its buffer is over the high-water mark: the client does not read). A deadline ends
either wait with :class:`LinkInterrupted` (:meth:`AioLink.interrupt`, from the sweeper),
as ``RawSocketStream.interrupt`` does on Trio.

What the task does not read stays here, up to :data:`READ_AHEAD` bytes: past that the
transport stops reading from the socket until the task catches up (a request body that
the app reads slowly is paced by TCP, not held in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..protocols.shared import SendWatch
from ..protocols.sockinfo import reset_on_close
from ..protocols.tlslink import TLSLink

READ_AHEAD = 256 * 1024
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024


class LinkClosed(Exception):
    """The connection has ended: the client closed or reset it, or we closed it."""


class LinkInterrupted(LinkClosed):
    """A deadline ended the wait (see :meth:`AioLink.interrupt`)."""


class AioLink(asyncio.Protocol):
    """One connection's bytes (see the module docstring)."""

    __slots__ = (
        "buffer",
        "closed",
        "eof",
        "gone",
        "interrupted",
        "lost",
        "paused",
        "reading_paused",
        "socket",
        "transport",
        "waiter",
        "watch",
    )

    def __init__(self) -> None:
        self.transport: Any = None  # asyncio's Transport, or uvloop's (not a subclass)
        self.socket: Any = None  # for the kernel's counts (protocols.sockinfo)
        self.buffer = b""  # received, not read by the task yet
        self.eof = False  # the client will send no more
        self.gone: BaseException | None = None  # the connection is lost (and why)
        self.lost: asyncio.Future[None] | None = None  # made by a close that waits for it
        self.waiter: asyncio.Future[None] | None = None  # the task's wait, if it waits
        self.paused = False  # the transport's buffer is over its high-water mark
        self.reading_paused = False
        self.interrupted = False
        self.closed = False  # close_link or close was called
        self.watch: SendWatch | None = None

    # -- the transport's callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.socket = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if len(self.buffer) > READ_AHEAD and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep our side open: the answer may still be on its way

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.gone = exc or LinkClosed("connection closed")
        self._wake()
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        if self.interrupted:
            raise LinkInterrupted()
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    # -- reading -----------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """What the client sent next (at most ``max_bytes``); b"" once it sent its end."""
        while not self.buffer:
            if self.eof or self.gone is not None:
                if self.interrupted:
                    raise LinkInterrupted()
                return b""
            await self._wait()
        data = self.buffer
        if max_bytes is not None and len(data) > max_bytes:
            self.buffer = data[max_bytes:]
            data = data[:max_bytes]
        else:
            self.buffer = b""
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()
        return data

    receive_next = receive_some  # (the Trio link waits for a next request its own way)

    # -- writing -----------------------------------------------------------------------

    def send_soon(self, data: bytes) -> bool:
        """Hand ``data`` to the transport now, if it is taking data; False if not."""
        if not self.can_send_soon:
            return False
        self.transport.write(data)
        return True

    async def send_all(self, data: bytes) -> None:
        """Send ``data``; if the client does not take it, wait until it does (told to the
        watch: the send timeout runs meanwhile)."""
        if self.gone is not None or self.interrupted:
            raise LinkClosed("connection closed")
        self.transport.write(data)
        if self.paused:
            watch = self.watch
            if watch is not None:
                watch.send_stalled()
            while self.paused:
                if self.gone is not None:
                    raise LinkClosed("connection closed")
                await self._wait()
            if watch is not None:
                watch.send_resumed()

    async def send_final(self, data: bytes) -> None:
        """The connection's last bytes: sent as :meth:`send_all` does, but returns only
        once the kernel has all of them (the transport holds nothing), as a Trio send
        does; a close then loses nothing, however long the client takes to read what the
        kernel holds (the send timeout watches it meanwhile)."""
        if self.gone is None:
            self.transport.set_write_buffer_limits(0)  # paused until the buffer is empty
        await self.send_all(data)

    # what TLS asks of the link under it (protocols.tlslink.Carrier): the transport
    # buffers every write, so nothing waits here to be flushed

    @property
    def can_send_soon(self) -> bool:
        return not (self.paused or self.gone is not None or self.interrupted)

    @property
    def pending(self) -> bool:
        return False

    def send_nowait(self, data: bytes) -> bytes:
        """Hand ``data`` to the transport; what is left of it (nothing)."""
        if self.gone is None and data:
            self.transport.write(data)
        return b""

    async def flush_pending(self) -> None:
        pass

    def held(self) -> int:
        """Bytes the transport holds, not yet given to the kernel (the send timeout counts
        a client's progress by them too: see H1Driver.check_send)."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self) -> None:
        """Close at once (what the transport holds is dropped)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    # -- deadlines ---------------------------------------------------------------------

    def interrupt(self) -> bool:
        """End the task's wait (a deadline passed): it raises LinkInterrupted, and so does
        every wait after it until :meth:`resume`. False if the task is not waiting."""
        waiter = self.waiter
        if waiter is None or waiter.done():
            return False
        self.interrupted = True
        self.waiter = None
        waiter.set_exception(LinkInterrupted())
        return True

    def resume(self) -> None:
        """Waits work again (to answer 408 after an interrupt)."""
        self.interrupted = False

    # -- the end -----------------------------------------------------------------------

    async def close_link(self, linger: bool, reset: bool) -> None:
        """Close the connection: at once with a reset (a client that does not read),
        else once the transport has sent what it holds, within LINGER_SECONDS; with
        ``linger``, half-closed first while what the client still sends is read and
        dropped, as ``protocols.closing.close_stream`` does on Trio."""
        transport = self.transport
        if transport is None or self.gone is not None or self.closed:
            return
        self.closed = True
        if reset:
            reset_on_close(self)
            transport.abort()
            return
        self.interrupted = False
        if not linger:  # the usual close: the kernel has everything already (send_final)
            transport.close()
            if not transport.get_write_buffer_size():
                return
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                if linger and transport.can_write_eof():
                    transport.write_eof()
                    drained = 0
                    while drained < LINGER_BYTES:
                        data = await self.receive_some()
                        if not data:
                            break
                        drained += len(data)
                transport.close()
                if transport.get_write_buffer_size():
                    self.lost = asyncio.get_running_loop().create_future()
                    await self.lost
                return
        except (TimeoutError, LinkClosed, OSError):
            pass
        transport.abort()  # what is left goes: the client had its time


class AioTLSLink(TLSLink):
    """TLS over an :class:`AioLink` (OpenSSL's records on memory BIOs, as on Trio: see
    ``protocols.tlslink``), with asyncio's hooks."""

    __slots__ = ()

    transport_stream: AioLink

    def broken(self, message: str) -> Exception:
        return LinkClosed(message)

    async def fair_turn(self) -> None:
        await asyncio.sleep(0)

    def held(self) -> int:
        return self.transport_stream.held()

    async def close_link(self, linger: bool, reset: bool) -> None:
        """Our close_notify (unless the connection is reset, or it went with the last
        answer), then the TCP connection's close (:meth:`AioLink.close_link`)."""
        if not reset and not self.close_notify_nowait():
            with contextlib.suppress(TimeoutError, LinkClosed, OSError):
                async with asyncio.timeout(LINGER_SECONDS):
                    await self.send_close_notify()
        await self.transport_stream.close_link(linger, reset)
