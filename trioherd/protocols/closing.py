"""How a connection ends: a close that lingers so that the client reads what was sent, a
TLS close with ``close_notify``, a reset for a client that stopped reading, and what the
kernel still holds for the client. No protocol here: only the stream and its socket.
"""

from __future__ import annotations

import trio

from .rawstream import RECEIVE_SIZE, RawSocketStream
from .sockinfo import queued_bytes, reset_on_close, unread_bytes
from .tlsstream import TLSSocketStream

LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)
"""What a trio stream raises once the client or our own close has ended it."""
CLOSE_ERRORS = (OSError, trio.BusyResourceError, *STREAM_ERRORS)
"""What closing a stream may meet and need not report."""

__all__ = ["close_stream", "queued_bytes", "reset_on_close", "unread_bytes"]


async def close_stream(stream: trio.abc.Stream, linger: bool, reset: bool) -> None:
    """Close a connection. ``linger``: first half-close and read what the client still
    sends, for a moment, so that the kernel does not answer it with a reset that would
    destroy what we sent before the client reads it. Over TLS a ``close_notify`` comes
    first, always. ``reset``: the client stopped taking our data (send timeout)."""
    if reset:
        reset_on_close(stream)
        await trio.aclose_forcefully(stream)
        return
    if isinstance(stream, TLSSocketStream):
        await close_tls(stream, linger)
        return
    if isinstance(stream, RawSocketStream):
        if stream.pending:  # an answer the flusher has not written yet: it goes first
            with trio.CancelScope(shield=True, deadline=trio.current_time() + LINGER_SECONDS):
                await stream.flush_pending()
        if linger:
            await drain_client(stream)
        stream.close()
        return
    if linger and isinstance(stream, trio.SocketStream):
        await drain_client(stream)
    await trio.aclose_forcefully(stream)


async def drain_client(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close, then read and drop what the client still sends: until it closes too,
    for at most LINGER_SECONDS and LINGER_BYTES."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + LINGER_SECONDS):
        try:
            await stream.send_eof()
            drained = 0
            while drained < LINGER_BYTES:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                drained += len(data)
        except CLOSE_ERRORS:
            pass


async def close_tls(stream: TLSSocketStream, linger: bool) -> None:
    """Send our ``close_notify`` (after any answer the flusher still holds), within
    LINGER_SECONDS, then close the TCP connection, lingering if asked as a plain one
    does: the client's own close_notify, if it sends one, is read and dropped there.
    Usually it went with the last answer, or the kernel takes it at once: then no
    cancel scope is entered (a few microseconds of a connection's time)."""
    if not stream.close_notify_nowait():
        with trio.CancelScope(shield=True, deadline=trio.current_time() + LINGER_SECONDS):
            try:
                await stream.send_close_notify()
            except CLOSE_ERRORS:
                pass
    if linger:
        await drain_client(stream.transport_stream)
    stream.close()
