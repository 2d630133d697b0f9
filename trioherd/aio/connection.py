"""HTTP/1.1 in the asyncio worker: the driver of ``protocols.h1driver`` over an
:class:`~.link.AioLink`, with asyncio's hooks. Nothing of the protocol is here: the
requests, limits, deadlines and answers are the driver's, the same as on Trio.

:func:`serve_connection` takes one accepted socket: its addresses (after a PROXY header,
with ``--proxy-protocol``), the transport of the event loop over it (TLS when the
listener is), and the connection's task.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

from .._config import Config, http_parser
from ..protocols.h1driver import Adapter, H1Driver
from .link import AioLink, LinkClosed

log = logging.getLogger("trioherd.http")


class AioConnection(H1Driver):
    """One connection of the asyncio worker."""

    __slots__ = ()

    STREAM_ERRORS = (LinkClosed, ConnectionError)

    stream: AioLink

    async def yield_turn(self) -> None:
        await asyncio.sleep(0)

    async def close(self, linger: bool, reset: bool) -> None:
        await self.stream.close_link(linger, reset)

    async def checkpoint(self) -> None:
        await asyncio.sleep(0)

    def event(self) -> asyncio.Event:
        return asyncio.Event()


def connection_class(config: Config) -> type[AioConnection]:
    """The request parser (``--http``), chosen once per worker."""
    if http_parser(config) == "httptools":
        from ..protocols.httptools import HttptoolsParsing

        class AioHttptoolsConnection(HttptoolsParsing, AioConnection):
            __slots__ = ()

        return AioHttptoolsConnection
    return AioConnection


def tls_facts(transport: asyncio.BaseTransport) -> dict[str, Any]:
    """What the app is told of a TLS connection (``trioherd.tls`` of the scope), as
    ``_tls.secure`` tells it on Trio."""
    from .._tls import facts

    ssl_object = transport.get_extra_info("ssl_object")
    return facts(ssl_object) if ssl_object is not None else {}


async def serve_connection(
    sock: socket.socket,
    addresses: tuple[Any, Any],
    state: Any,
    adapter: Adapter,
    connection: type[AioConnection],
    ssl_context: ssl.SSLContext | None,
) -> None:
    """Serve one accepted connection until it closes."""
    loop = asyncio.get_running_loop()
    link = AioLink()
    config: Config = state.config
    try:
        if ssl_context is None:
            await loop.connect_accepted_socket(lambda: link, sock)
        else:
            await loop.connect_accepted_socket(
                lambda: link,
                sock,
                ssl=ssl_context,
                ssl_handshake_timeout=config.tls_handshake_timeout,
            )
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
        log.debug("connection from %s ended before HTTP: %s", addresses[0], exc)
        sock.close()
        return
    assert link.transport is not None
    tls = tls_facts(link.transport) if ssl_context is not None else None
    scheme = "https" if tls is not None else "http"
    await connection(state, adapter, link, addresses[0], addresses[1], scheme, tls).run()
