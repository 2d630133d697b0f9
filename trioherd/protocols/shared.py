"""What the connections of one worker share, without I/O: where a connection is (:class:`Phase`),
the worker's counters (:class:`Stats`, sent with each heartbeat), and the two views other
code has of them: :class:`Watched` (a connection, as the deadline sweeper sees it) and
:class:`Shared` (the worker's state, as a protocol core reads it).

No runtime here: ``protocols.state.ServerState`` is the Trio worker's :class:`Shared`, with
its sweeper; another runtime brings its own.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, Protocol

from .._config import Config
from .forwarded import TrustedPeers


class Phase(enum.Enum):
    """Where a connection is; each phase but APP has its own deadline (ServerState.sweep)."""

    IDLE = "idle"
    """Waiting for the first byte of a request (the keep-alive timeout, or the drain's
    grace)."""
    HEAD = "head"
    """Reading a request's head (the header timeout, not reset by further bytes)."""
    BODY = "body"
    """Reading a request's body (the header timeout between two reads)."""
    APP = "app"
    """In the app: no deadline of the server's."""
    SEND = "send"
    """A send that the client does not take (the send timeout)."""


IDLE, HEAD, BODY, APP, SEND = Phase.IDLE, Phase.HEAD, Phase.BODY, Phase.APP, Phase.SEND

RECEIVE_SIZE = 65536
"""The most one read of a connection asks for."""


class SendWatch(Protocol):
    """Told when a send has to wait for the client to take data, and when it is done."""

    def send_stalled(self) -> None: ...

    def send_resumed(self) -> None: ...


class Watched(Protocol):
    """A connection as the sweeper sees it (``protocols.http1.HTTPConnection``)."""

    phase: Phase
    deadline: float
    served: int
    expired: Phase | None

    def check_send(self, now: float) -> None: ...

    def expire(self) -> bool: ...


CUT_LOG_EVERY = 1.0
"""Seconds between two log lines about cuts of one reason (a line carries a count)."""

_CUT_WHY = {
    "head_timeout": "request head not received within --header-timeout (408)",
    "body_timeout": "request body stalled for --header-timeout (408)",
    "send_timeout": "client took nothing of an answer for --send-timeout (reset)",
    "shed": "idle keep-alive connection closed near --max-connections",
    "limit": "over a size limit (431, 413, or WebSocket close 1009)",
    "ping_timeout": "WebSocket client did not answer a ping within --ws-ping-timeout",
    "close_timeout": "WebSocket client did not answer our close frame in time",
    "proxy_refused": "PROXY header from a peer not in --proxy-protocol-allow-ips",
}


class Cuts:
    """Connections the server cut, by reason (``_ipc.CUT_REASONS``; the heartbeat's
    ``cuts``), and their log lines: the first cut of a reason is logged at once, later
    ones at most once per :data:`CUT_LOG_EVERY` with their count, so a crowd that is cut
    by the thousand (slowloris) costs a line a second, not a line each."""

    __slots__ = ("counts", "logged_at", "unlogged")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.unlogged: dict[str, tuple[int, Any]] = {}  # reason: (count, last client)
        self.logged_at: dict[str, float] = {}

    def note(self, reason: str, client: Any, now: float) -> str | None:
        """Count one cut; the log line to write now, if one is due."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        count, _ = self.unlogged.get(reason, (0, None))
        self.unlogged[reason] = (count + 1, client)
        if now - self.logged_at.get(reason, -math.inf) >= CUT_LOG_EVERY:
            return self._line(reason, now)
        return None

    def add(self, reason: str, count: int) -> None:
        """Count cuts that were logged another way (shedding logs a line of its own)."""
        self.counts[reason] = self.counts.get(reason, 0) + count

    def due(self, now: float) -> list[tuple[str, str]]:
        """(reason, line) for cuts no line counted yet, once their reason's last line is
        old enough (the sweeper asks)."""
        return [
            (reason, self._line(reason, now))
            for reason in list(self.unlogged)
            if now - self.logged_at.get(reason, -math.inf) >= CUT_LOG_EVERY
        ]

    def _line(self, reason: str, now: float) -> str:
        count, client = self.unlogged.pop(reason)
        self.logged_at[reason] = now
        what = "1 connection" if count == 1 else f"{count} connections"
        peer = f"{client[0]}:{client[1]}" if isinstance(client, tuple) else client or "-"
        why = _CUT_WHY.get(reason, reason)
        return f"cut {what} ({reason}: {why}); last from {peer}"


class Stats:
    """Counters of one worker, sent to the primary with every heartbeat."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "cuts",
        "requests",
        "shed",
        "status",
        "ws_in",
        "ws_open",
        "ws_out",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.shed = 0  # idle keep-alive connections closed to make room (ServerState.shed)
        self.status = [0, 0, 0, 0, 0, 0]  # index = status // 100
        self.ws_open = 0  # WebSockets open now (protocols.websocket)
        self.ws_in = 0  # WebSocket messages received
        self.ws_out = 0  # WebSocket messages sent
        self.cuts = Cuts()  # connections the server cut, by reason

    def snapshot(self) -> dict[str, Any]:
        """The counters in the heartbeat's shape (``_ipc.COUNTERS``, ``STATUS``, ``CUTS``
        and the ``websockets`` of ``WORKER_COUNTS``; the worker adds ``open``)."""
        return {
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "shed": self.shed,
            "status": {f"{i}xx": n for i, n in enumerate(self.status) if i and n},
            "cuts": dict(self.cuts.counts),
            "websockets": self.ws_open,
            "ws_messages_in": self.ws_in,
            "ws_messages_out": self.ws_out,
        }


class Shared(Protocol):
    """What a protocol core reads of its worker's shared state (``ServerState`` in the Trio
    runtime): the config, the counters, the drain switch, whose forwarded headers count,
    and the clock its deadlines are read from."""

    config: Config
    stats: Stats
    draining: bool
    drain_grace: float  # the idle wait during a drain (idle_wait)
    trusted: TrustedPeers
    worker_id: int
    on_request: Callable[[], None] | None
    now: Callable[[], float]

    def idle_wait(self) -> float: ...


class Host(Shared, Protocol):
    """The worker's state as a connection driver uses it (``protocols.h1driver``): a
    :class:`Shared` that also knows its open connections and counts the ones it cuts."""

    connections: set[Any]

    def cut(self, reason: str, client: Any) -> None: ...
