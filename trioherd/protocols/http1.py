"""HTTP/1.1 in the Trio worker: the driver of ``protocols.h1driver`` on Trio's streams.

:class:`HTTPConnection` is :class:`~.h1driver.H1Driver` over a raw non-blocking socket
(``protocols.rawstream``), plain or under TLS (``protocols.tlsstream``), with Trio's hooks:
the errors a Trio stream raises once it has ended, a turn for the other tasks before a
pipelined request, the close (``protocols.closing``), a checkpoint and an event. Everything else a
connection does (the requests, the limits, the deadlines, the answers) is the driver's,
the same on every runtime.
"""

from __future__ import annotations

import trio

from .closing import STREAM_ERRORS, close_stream
from .h1core import BodyTooLarge, ClientGone, RequestHead
from .h1driver import SOON_MAX, Adapter, BodyReader, H1Driver
from .rawstream import RawSocketStream
from .state import ServerState
from .tlsstream import TLSSocketStream

__all__ = [
    "SOON_MAX",
    "Adapter",
    "BodyReader",
    "BodyTooLarge",
    "ClientGone",
    "HTTPConnection",
    "RequestHead",
]


class HTTPConnection(H1Driver):
    """One connection of the Trio worker (see the module docstring)."""

    __slots__ = ()

    STREAM_ERRORS = STREAM_ERRORS

    state: ServerState
    stream: RawSocketStream | TLSSocketStream

    async def yield_turn(self) -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def close(self, linger: bool, reset: bool) -> None:
        await close_stream(self.stream, linger, reset)

    async def checkpoint(self) -> None:
        await trio.lowlevel.checkpoint()

    def event(self) -> trio.Event:
        return trio.Event()
