"""What the connections of one worker share, without I/O: where a connection is (:class:`Phase`),
the worker's counters (:class:`Stats`, sent with each heartbeat), and the two views other
code has of them: :class:`Watched` (a connection, as the deadline sweeper sees it) and
:class:`Shared` (the worker's state, as a protocol core reads it).

No runtime here: ``protocols.state.ServerState`` is the Trio worker's :class:`Shared`, with
its sweeper; another runtime brings its own.
"""

from __future__ import annotations

import enum
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


class Watched(Protocol):
    """A connection as the sweeper sees it (``protocols.http1.HTTPConnection``)."""

    phase: Phase
    deadline: float
    served: int
    expired: Phase | None

    def check_send(self, now: float) -> None: ...

    def expire(self) -> bool: ...


class Stats:
    """Counters of one worker, sent to the primary with every heartbeat."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
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

    def snapshot(self) -> dict[str, Any]:
        """The counters in the heartbeat's shape (``_ipc.COUNTERS``, ``STATUS`` and the
        ``websockets`` of ``WORKER_COUNTS``; the worker adds ``open``)."""
        return {
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "shed": self.shed,
            "status": {f"{i}xx": n for i, n in enumerate(self.status) if i and n},
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
    trusted: TrustedPeers
    worker_id: int
    on_request: Callable[[], None] | None
    now: Callable[[], float]

    def idle_wait(self) -> float: ...
