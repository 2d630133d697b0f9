"""WebSocket (RFC 6455) in the worker: the Trio driver of one session.

The layout, one request that asks for a WebSocket (``Connection: upgrade`` and
``Upgrade: websocket``; ``HTTPConnection.upgrade`` flags a request with an ``Upgrade`` field
while its head is checked, so other requests pay nothing):

- ``protocols.ws_handshake.read_handshake`` reads the handshake from the request head
  (None: not a WebSocket request, or ``--ws none``: plain HTTP); a malformed one is
  refused before the app runs (400, 426 with ``Sec-WebSocket-Version: 13``; 503 while
  the worker drains);
- the app interface (``apps.websocket``: ``serve_asgi``, ``serve_native``) runs the app
  with an :class:`Upgrade` (here), which the app accepts (the 101 response, then a
  :class:`WebSocket`) or refuses (403, or a full HTTP response: ASGI's
  ``websocket.http.response`` extension, a native ``Response``);
- the protocol is ``protocols.ws_session.Session``, without I/O: frames in and out,
  messages, the close handshake, size limits, deadlines as data (messages assembled
  and measured by ``protocols.ws_incoming``; permessage-deflate is
  ``protocols.ws_inflate``, inflated there in bounded pieces);
- a :class:`WebSocket` (here) is the app's object; under it, ``protocols.ws_driver``
  drives the session on Trio: the app's task reads while it waits in ``receive``, a
  watcher task while it does not; a keepalive task pings the client; one writer sends
  what the session framed, one turn at a time.

Closing: whoever closes first, the other side answers, then the server half-closes and
waits a moment (``CLOSE_TIMEOUT``) for the client to close its side. A protocol error
from the client (1002, 1007) or a message over ``--ws-max-size`` (1009) closes with that
code. A worker that drains closes each open WebSocket with 1001 (Going Away) and the app
gets ``websocket.disconnect``; a client that does not answer a ping within
``--ws-ping-timeout`` is dropped, and one that takes none of what we send for
``--send-timeout`` is reset (``HTTPConnection``'s send deadline). An app that raises after
accepting closes with 1011 and one log line. Every WebSocket the server cuts is noted
once, by :func:`note_cut`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import trio

from .http1 import HTTPConnection
from .shared import Stats
from .ws_driver import Keepalive, Reader, Writer, abort
from .ws_handshake import Handshake
from .ws_session import (
    ABNORMAL,
    CLOSE_TIMEOUT,
    GOING_AWAY,
    INTERNAL_ERROR,
    NORMAL,
    Session,
)
from .ws_session import WebSocketClosed as WebSocketClosed

log = logging.getLogger("trioherd.http")

COUNTED = frozenset(("limit", "ping_timeout", "close_timeout"))
"""The reasons a WebSocket cut is counted under here (``_ipc.CUT_REASONS``): the connection
counts ``send_timeout``; ``protocol_error`` and ``drain`` are the client's fault or our
stop, not cuts of a client that did its part, and are only logged."""


def note_cut(reason: str, client: tuple[str, int] | None, stats: Stats, detail: str) -> None:
    """The one place a WebSocket the server cuts is noted: one log line (INFO) with the
    reason and the client's address, once per WebSocket (``WebSocket.cut`` sees to it),
    and the worker's count of cuts by reason (``stats.cuts``, the heartbeat's ``cuts``,
    ``trioherd_connections_cut_total``) for the reasons in :data:`COUNTED`.

    The reasons (the names of ``_ipc.CUT_REASONS`` where it has them):

    - ``"send_timeout"``: the client took none of what we send for ``--send-timeout``
      (a client that stopped reading): the connection is reset. Counted by the
      connection itself when it ends (``HTTPConnection.run``: the count only, since
      ``Exchange.switched`` says this line is its log line);
    - ``"ping_timeout"``: no pong within ``--ws-ping-timeout`` of a ping going out: the
      connection is dropped (no close frame);
    - ``"limit"``: a message over ``--ws-max-size`` (after decompression): closed with
      1009;
    - ``"close_timeout"``: after a close frame of ours, the client did not answer it within
      ``CLOSE_TIMEOUT``: the connection is dropped;
    - ``"protocol_error"``: a frame that breaks RFC 6455 or RFC 7692, or text that is not
      UTF-8: closed with 1002 or 1007;
    - ``"drain"``: the worker drains (stop, reload, recycle, scale down): closed with 1001.

    (Idle-connection shedding never picks a WebSocket: it closes only connections that
    wait for their next request.)
    """
    if reason in COUNTED:
        stats.cuts.add(reason, 1)  # the line below is its log line
    address = f"{client[0]}:{client[1]}" if client else "-"
    log.info("WebSocket %s cut (%s): %s", address, reason, detail)


class WebSocket:
    """One open WebSocket: what ``await request.accept_websocket()`` gives a native app
    (the ASGI interface drives the same object).

    Messages are ``str`` (text) or ``bytes`` (binary). :meth:`receive` raises
    :class:`WebSocketClosed` once the connection is closed, whoever closed it, and
    ``async for message in websocket`` just ends there; :meth:`send` raises it too.
    When the app answers a message while more are already read, its answers are held
    and sent together with its next send, its next wait for a message, or once it
    yields (``protocols.ws_driver.Reader``).
    """

    __slots__ = (
        "_cut",
        "_http",
        "_keepalive",
        "_leaving",
        "_nursery",
        "_reader",
        "_session",
        "_stats",
        "_writer",
        "client",
        "subprotocol",
    )

    def __init__(
        self,
        http: HTTPConnection,
        session: Session,
        subprotocol: str | None,
        nursery: trio.Nursery,
        client: tuple[str, int] | None,
    ) -> None:
        self._http = http
        self._session = session
        self._nursery = nursery
        self._stats = http.state.stats
        self._writer = Writer(http, session, self._broken)
        self._keepalive = Keepalive(session, self._writer, self._ping_timeout)
        self._reader = Reader(http, session, self._writer, self._keepalive, self.cut)
        self._leaving = False
        self._cut = False
        self.client = client
        """The client's address (as a trusted proxy may report it), or None."""
        self.subprotocol = subprotocol
        """The subprotocol chosen when it was accepted (None: none)."""

    @property
    def closed(self) -> bool:
        return self._session.close_code is not None

    @property
    def close_code(self) -> int | None:
        """How it closed, once it has (see :class:`WebSocketClosed`)."""
        return self._session.close_code

    @property
    def close_reason(self) -> str:
        return self._session.close_reason

    @property
    def done(self) -> trio.Event:
        """Set when the connection is over: close handshake done, or connection lost."""
        return self._reader.done

    # -- the app's side -------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next message; raises WebSocketClosed once the connection is closed."""
        inbox = self._session.inbox
        if inbox:
            return inbox.popleft()
        return await self._reader.next_message()

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                message = await self.receive()
            except WebSocketClosed:
                return
            yield message

    async def send(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message."""
        if not isinstance(message, str | bytes | bytearray | memoryview):
            raise TypeError(f"a WebSocket message is str or bytes, not {type(message).__name__}")
        session = self._session
        if not session.send_message(message):
            raise WebSocketClosed(session.close_code or ABNORMAL, session.close_reason)
        if self._reader.corked():
            self._reader.wake()  # the app answers more at once: sent together
        elif not await self._writer.flush():
            raise WebSocketClosed(ABNORMAL)
        self._stats.ws_out += 1

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Start the close handshake (a no-op once the connection is closing). The client
        has CLOSE_TIMEOUT seconds to answer; messages that arrive meanwhile are dropped."""
        if not self._session.close(code, reason):
            return
        self._reader.wake()
        await self._writer.flush()
        self._reader.wait_for_client()

    # -- the connection's side ------------------------------------------------------------

    def start(self) -> None:
        self._nursery.start_soon(self._reader.watch)
        if self._session.pings.interval > 0:
            self._nursery.start_soon(self._keepalive.run)

    def going_away(self) -> None:
        """The worker drains: close with 1001, which the app sees as a disconnect."""
        if not self._leaving and self._session.open and self._session.pending is None:
            self._leaving = True
            self.cut("drain", "the worker drains: closing with 1001")
            self._nursery.start_soon(self.close, GOING_AWAY, "server shutting down")

    async def finish(self, error: BaseException | None) -> None:
        """After the app is done: close if it did not (1011 if it raised), then give the
        client a moment to finish the close handshake."""
        session = self._session
        session.app_done = True
        session.inbox.clear()
        self._reader.app_returned()
        with trio.move_on_after(CLOSE_TIMEOUT):
            if session.pending is not None:
                await self._reader.settle()
            await self.close(INTERNAL_ERROR if error is not None else NORMAL)
        # the watcher ends the connection at the close deadline (CLOSE_TIMEOUT after our
        # close) at the latest, and notes the cut: this wait only backs it up
        backstop = min(session.close_by, trio.current_time() + CLOSE_TIMEOUT) + CLOSE_TIMEOUT
        with trio.move_on_at(backstop):
            await self.done.wait()

    def cut(self, reason: str, detail: str) -> None:
        """Note (once) that the server cuts this WebSocket: see :func:`note_cut`."""
        if not self._cut:
            self._cut = True
            note_cut(reason, self.client, self._stats, detail)

    def _broken(self) -> None:
        """A send failed: the connection is gone (the send timeout, if its deadline cut
        it: during a WebSocket no other deadline of the connection's runs)."""
        if self._http.expired is not None:
            timeout = self._http.state.config.send_timeout
            self.cut("send_timeout", f"the client took nothing for {timeout:g} s: reset")
        if self._session.end(ABNORMAL, ""):
            self._reader.wake()

    def _ping_timeout(self) -> None:
        timeout = self._session.pings.timeout
        self.cut("ping_timeout", f"no pong within {timeout:g} s of a ping: dropped")
        if self._session.end(ABNORMAL, "ping timeout"):
            self._reader.wake()
        abort(self._http.stream)


# -- the app's answer to a handshake --------------------------------------------------------


class Upgrade:
    """A request that asks for a WebSocket, until the app accepts it or answers with HTTP.
    A native ``Request`` holds it (``request.accept_websocket()``)."""

    __slots__ = ("client", "handshake", "http", "nursery", "websocket")

    def __init__(
        self, http: HTTPConnection, handshake: Handshake, client: tuple[str, int] | None
    ) -> None:
        self.http = http
        self.handshake = handshake
        self.client = client  # as a trusted proxy may report it
        self.nursery: trio.Nursery | None = None
        self.websocket: WebSocket | None = None

    @property
    def subprotocols(self) -> list[str]:
        return self.handshake.subprotocols

    async def accept(
        self, subprotocol: str | None = None, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> WebSocket:
        """Answer 101 Switching Protocols; from now on the connection is a WebSocket."""
        http = self.http
        if self.websocket is not None or http.exchange.response_started:
            raise RuntimeError("the WebSocket handshake was answered already")
        assert self.nursery is not None
        config = http.state.config
        head, extensions = self.handshake.response(
            subprotocol, headers, config.ws_per_message_deflate
        )
        session = Session(
            extensions,
            config.ws_max_size,
            http.state.stats,
            ping_interval=config.ws_ping_interval,
            ping_timeout=config.ws_ping_timeout,
            early=http.conn.trailing_data[0],  # frames that came right behind the request
        )
        websocket = WebSocket(http, session, subprotocol, self.nursery, self.client)
        await http.send(head)
        http.exchange.switched = True  # its cuts are logged here (note_cut), not twice
        self.websocket = websocket
        http.state.websockets.add(websocket)
        http.state.stats.ws_open += 1
        websocket.start()
        return websocket

    async def run(self, app: Callable[[], Awaitable[Any]], target: bytes) -> None:
        """Run the app; after it accepted, close when it is done (1011 if it raised: one
        log line). An error before it accepted propagates (a 500, if nothing was sent)."""
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    await app()
                except Exception as exc:
                    error = exc
                websocket = self.websocket
                if websocket is not None:
                    if isinstance(error, WebSocketClosed):  # the app did not catch it: no error
                        error = None
                    elif error is not None:
                        log.error(
                            "app raised on WebSocket %s", target.decode("latin-1"), exc_info=error
                        )
                    await websocket.finish(error)
                nursery.cancel_scope.cancel()
        finally:
            websocket = self.websocket
            if websocket is not None:
                if self.http.expired is not None:  # over TLS, the send timeout cancels all
                    timeout = self.http.state.config.send_timeout
                    websocket.cut("send_timeout", f"the client took nothing for {timeout:g} s")
                self.http.state.websockets.discard(websocket)
                self.http.state.stats.ws_open -= 1
        if error is not None and self.websocket is None:
            raise error
