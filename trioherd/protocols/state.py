"""What every HTTP connection of one worker shares (:class:`ServerState`): its config, its
counters (:class:`Stats`, sent with each heartbeat), the drain switch, and the one
sweeper task that enforces every connection's deadline and thins out idle crowds. A
connection is anything :class:`Watched`: the sweeper needs its phase and deadline only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from .._config import Config
from .forwarded import TrustedPeers
from .rawstream import EdgeWaiter
from .shared import IDLE, SEND, Stats, Watched

log = logging.getLogger("trioherd.http")

DRAIN_GRACE = 1.0
# cuts are logged at INFO, but a PROXY header from a stranger: a forgery, or a balancer
# missing from --proxy-protocol-allow-ips
_CUT_LEVELS = {"proxy_refused": logging.WARNING}


class ServerState:
    """What every connection of one worker shares: config, stats, the drain switch."""

    def __init__(self, config: Config, worker_id: int = 0) -> None:
        self.config = config
        self.worker_id = worker_id
        self.stats = Stats()
        self.draining = False
        self.drain_grace = min(DRAIN_GRACE, config.graceful_timeout)
        self.connections: set[Watched] = set()
        self.asgi_state: dict[str, Any] = {}
        self.on_request: Callable[[], None] | None = None
        self.websockets: set[Any] = set()  # open WebSockets (protocols.websocket.WebSocket)
        self.trusted = TrustedPeers(config.forwarded_allow_ips, config.forwarded_headers)
        self.edge: EdgeWaiter | None = None  # plain connections wait on it (the worker's)
        # trio.current_time, or once the sweeper runs the run's clock's own method: the
        # same time, without the two calls in between (it is read for every request)
        self.now: Callable[[], float] = trio.current_time
        shortest = min(
            config.keep_alive_timeout or 1.0, config.header_timeout, config.send_timeout, 1.0
        )
        self.sweep_interval = max(0.01, shortest / 4)
        # idle crowds: from 90 % of max_connections open, close idle ones until below 80 %
        self.shed_at = (9 * config.max_connections + 9) // 10
        self.shed_below = (8 * config.max_connections + 9) // 10

    def cut(self, reason: str, client: Any) -> None:
        """The server cut a connection (see ``_ipc.CUT_REASONS``): counted by reason for
        the heartbeat, and logged (one line a second per reason at most, with a count)."""
        line = self.stats.cuts.note(reason, client, self.now())
        if line is not None:
            log.log(_CUT_LEVELS.get(reason, logging.INFO), "%s", line)

    def idle_wait(self) -> float:
        """How long a connection waits for its next request: the keep-alive timeout, or
        during a drain the short drain grace."""
        return self.drain_grace if self.draining else self.config.keep_alive_timeout

    def start_draining(self) -> None:
        """From now on responses carry ``Connection: close``; idle connections get the
        short drain grace for a request that may already be on its way, then close."""
        self.draining = True
        deadline = self.now() + self.drain_grace
        for connection in self.connections:
            if connection.phase == IDLE:
                connection.deadline = min(connection.deadline, deadline)
        for websocket in list(self.websockets):
            websocket.going_away()  # close frame 1001, websocket.disconnect to the app

    async def sweep(self) -> None:
        """Enforce every connection's phase deadline (idle, head, body, send), and thin
        out idle crowds (see :meth:`shed`).

        One timer task per worker instead of a cancel scope per read: the hot path only
        writes a number. A deadline is enforced within ``sweep_interval`` of passing.
        """
        self.now = trio.lowlevel.current_clock().current_time
        while True:
            await trio.sleep(self.sweep_interval)
            self.sweep_once(self.now())

    def sweep_once(self, now: float) -> None:
        """One pass of the sweeper (any runtime's: see ``aio.state``)."""
        connections = self.connections
        for connection in connections:
            if connection.phase == SEND:
                connection.check_send(now)
            if connection.deadline <= now:
                connection.expire()
        if len(connections) >= self.shed_at and not self.draining:
            self.shed()
        if self.stats.cuts.unlogged:
            for reason, line in self.stats.cuts.due(now):
                log.log(_CUT_LEVELS.get(reason, logging.INFO), "%s", line)

    def shed(self) -> int:
        """Close idle keep-alive connections (waiting for their next request, after at
        least one), the longest idle first, until fewer than 80 % of ``max_connections``
        are open: a crowd of idle clients must not keep new ones out. One log line."""
        connections = self.connections
        excess = len(connections) - self.shed_below + 1
        idle = [
            connection
            for connection in connections
            if connection.phase == IDLE and connection.served and connection.expired is None
        ]
        idle.sort(key=_idle_since)  # the same wait for all: the first deadline idled first
        # as if their keep-alive timeout had run out
        closing = [connection for connection in idle[:excess] if connection.expire()]
        if closing:
            self.stats.shed += len(closing)
            self.stats.cuts.add("shed", len(closing))
            log.warning(
                "%d of max %d connections open: closed %d idle keep-alive connections",
                len(connections),
                self.config.max_connections,
                len(closing),
            )
        return len(closing)


def _idle_since(connection: Watched) -> float:
    return connection.deadline
