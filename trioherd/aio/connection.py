"""HTTP/1.1 in the asyncio worker: the driver of ``protocols.h1driver`` over an
:class:`~.link.AioLink`, with asyncio's hooks. Nothing of the protocol is here: the
requests, limits, deadlines and answers are the driver's, the same as on Trio.

:func:`serve_connection` takes one accepted socket: its addresses (after a PROXY header,
with ``--proxy-protocol``), the transport of the event loop over it (TLS when the
listener is), and the connection's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any

from .._config import Config, http_parser
from ..protocols.h1driver import Adapter, H1Driver
from ..protocols.tlslink import HandshakeWatch
from .link import AioLink, AioTLSLink, LinkClosed

log = logging.getLogger("trioherd.http")


class AioConnection(H1Driver):
    """One connection of the asyncio worker."""

    __slots__ = ()

    STREAM_ERRORS = (LinkClosed, ConnectionError)

    stream: AioLink | AioTLSLink

    async def yield_turn(self) -> None:
        await asyncio.sleep(0)

    async def close(self, linger: bool, reset: bool) -> None:
        await self.stream.close_link(linger, reset)

    async def checkpoint(self) -> None:
        await asyncio.sleep(0)

    def event(self) -> asyncio.Event:
        return asyncio.Event()

    def queued(self) -> int:
        return super().queued() + self.stream.held()


class AioWaits:
    """How the asyncio runtime waits for a socket to be readable, by a deadline on its
    loop's clock (``protocols.proxyproto.Waits``, for the PROXY header)."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def readable(self, sock: socket.socket, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, ready.set_result, None)
        try:
            async with asyncio.timeout_at(deadline):
                await ready
        finally:
            loop.remove_reader(fd)


def connection_class(config: Config) -> type[AioConnection]:
    """The request parser (``--http``), chosen once per worker."""
    if http_parser(config) == "httptools":
        from ..protocols.httptools import HttptoolsParsing

        class AioHttptoolsConnection(HttptoolsParsing, AioConnection):
            __slots__ = ()

        return AioHttptoolsConnection
    return AioConnection


async def secure(
    link: AioLink, context: ssl.SSLContext, state: Any
) -> tuple[AioTLSLink, dict[str, Any]] | None:
    """The handshake of an HTTP connection, within the handshake timeout (enforced by the
    worker's sweeper), as ``_tls.secure`` does it on Trio: its TLS link and the facts
    the app is told, or None (closed) if the client fails, goes or stalls. A client that
    OpenSSL refuses gets the alert that says why, within ALERT_TIMEOUT."""
    from .._tls import ALERT_TIMEOUT, facts

    tls = AioTLSLink(link, context)
    watch = HandshakeWatch(tls, state.now() + state.config.tls_handshake_timeout)
    state.connections.add(watch)
    try:
        await tls.do_handshake()
    except ssl.SSLError as exc:
        log.debug("TLS handshake failed: %s", exc)
        with contextlib.suppress(TimeoutError, LinkClosed, OSError):
            async with asyncio.timeout(ALERT_TIMEOUT):
                await tls.send_alert()
        await link.close_link(linger=False, reset=False)
        return None
    except (LinkClosed, OSError) as exc:
        why = "timed out" if watch.expired is not None else f"failed: {exc}"
        log.debug("TLS handshake %s", why)
        await link.close_link(linger=False, reset=False)
        return None
    finally:
        state.connections.discard(watch)
    return tls, facts(tls.ssl_object)


async def serve_connection(
    sock: socket.socket,
    addresses: tuple[Any, Any],
    state: Any,
    adapter: Adapter,
    connection: type[AioConnection],
    ssl_context: ssl.SSLContext | None,
) -> None:
    """Serve one accepted connection until it closes."""
    link = AioLink()
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: link, sock)
    except OSError as exc:
        log.debug("connection from %s ended before HTTP: %s", addresses[0], exc)
        return
    try:
        if ssl_context is None:
            await connection(state, adapter, link, *addresses).run()
            return
        secured = await secure(link, ssl_context, state)
        if secured is not None:
            tls_link, tls = secured
            await connection(state, adapter, tls_link, *addresses, "https", tls).run()
    finally:
        link.close()  # if the task was cancelled (the drain's end): no transport outlives it
