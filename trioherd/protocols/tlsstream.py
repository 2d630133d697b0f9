"""TLS in the Trio worker: :class:`~.tlslink.TLSLink` (OpenSSL's records on memory BIOs)
over the worker's raw socket stream, with Trio's hooks. Why TLS is done this way, and what
it does not do, is in ``protocols.tlslink``.
"""

from __future__ import annotations

import socket
import ssl

import trio

from .rawstream import EdgeWaiter, RawSocketStream
from .tlslink import PIECE, TLSLink

__all__ = ["PIECE", "TLSSocketStream"]


class TLSSocketStream(TLSLink, trio.abc.Stream):
    """The server's side of a TLS connection over a raw non-blocking socket (see
    :class:`~.tlslink.TLSLink`); ``transport_stream`` is the raw stream under it."""

    __slots__ = ()

    transport_stream: RawSocketStream

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, waiter: EdgeWaiter | None = None
    ) -> None:
        """``sock``: an accepted TCP socket (TCP_NODELAY inherited from the listener);
        ``waiter``: the worker's EdgeWaiter, for receive_next."""
        super().__init__(RawSocketStream(sock, nodelay=False, waiter=waiter), context)

    def broken(self, message: str) -> Exception:
        return trio.BrokenResourceError(message)

    async def fair_turn(self) -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the socket now, without a close_notify (see send_close_notify)."""
        self.transport_stream.close()
        await trio.lowlevel.checkpoint()
