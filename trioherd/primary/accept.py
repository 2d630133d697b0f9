"""Accepting: the listeners' accept loops, the first half of the hand-off.

An :class:`Acceptor` accepts raw fds in bursts and gives each burst, already assigned to
workers, to the hand-off (``primary.handoff.Handoff``, seen here as a :class:`Placer`),
which passes it on and answers for it until a worker acknowledges it. When no worker has
room the acceptor stops accepting, so that new clients wait in the kernel's accept queue
(bounded by the listen backlog), not in the primary's memory.
"""

from __future__ import annotations

import socket
from typing import Protocol

import trio

from .. import _ipc
from .._listeners import Listener, accept_fd, defer_accept, queued_connections
from . import sched as _sched
from .process import WorkerProcess

ACCEPT_BURST = 256  # accepts in a row before the batch is flushed
OUT_OF_FDS_PAUSE = 0.05


class Placer(Protocol):
    """What the acceptor asks of the hand-off (``primary.handoff.Handoff``)."""

    def pick(self) -> WorkerProcess | None: ...

    def blocked(self) -> bool: ...

    def flush(
        self, batches: dict[WorkerProcess, list[int]], overflow: list[int], index: int
    ) -> None: ...

    def settle(self) -> None: ...

    async def wait_for_room(self) -> None: ...


class Acceptor:
    """The accept loops of the listeners (one task each), and the switches that act on
    the listening sockets: deferred accept, and the close of a stop."""

    def __init__(self, listeners: list[Listener], batch_primary: bool) -> None:
        self.listeners = listeners
        self.closing = False
        self._batch = batch_primary
        self._deferring = False
        self._scope = trio.CancelScope()

    async def run(self, placer: Placer) -> None:
        """Accept on every listener until closed (under ``SCHED_BATCH`` with
        ``--batch-primary``: primary.sched)."""
        with self._scope, _sched.batched(self._batch):
            async with trio.open_nursery() as accepting:
                for index, listener in enumerate(self.listeners):
                    accepting.start_soon(self._accept_loop, placer, index, listener)

    def defer(self, on: bool) -> None:
        """Accept TCP connections only once their first bytes came (``--defer-accept``,
        for an HTTP app, as a worker's ready message says). Then the worker's first read
        finds the request: no wait and wake-up per connection, and less CPU for a new
        connection (docs/performance.md, "Figures behind the code")."""
        if on != self._deferring:
            self._deferring = on
            for listener in self.listeners:
                defer_accept(listener, on)

    def close(self) -> None:
        """Stop accepting and close the listeners: a client arriving now is refused at
        once instead of waiting in a backlog nobody will accept from."""
        if self.closing:
            return
        self.closing = True
        self._scope.cancel()
        for listener in self.listeners:
            trio.lowlevel.notify_closing(listener.sock)
            listener.close()

    async def _accept_loop(self, placer: Placer, index: int, listener: Listener) -> None:
        """Accept raw fds until EAGAIN (on TCP, as many as the kernel says wait) and pass
        them on in batches; stop accepting while every worker is full, or connections
        taken back from a worker still wait for another, so that the kernel backlog, not
        our memory, holds new clients."""
        sock = listener.sock
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        while True:
            await trio.lowlevel.wait_readable(sock)
            drained = False
            while not drained:
                if placer.blocked():
                    await placer.wait_for_room()
                    continue
                if self.closing:  # closed while this task was already on its way back
                    return  # from an await: the cancel would come only at the next one
                # no await from the first accept to the flush: every fd accepted here is
                # either handed over or closed, even if we are cancelled
                batches, overflow, drained, pause = _accept_batch(placer, sock, tcp)
                placer.flush(batches, overflow, index)
                placer.settle()  # awake anyway: what the workers took meanwhile
                if pause:  # out of fds or memory: give the workers a moment
                    await trio.sleep(OUT_OF_FDS_PAUSE)
                elif not drained:  # a long burst: let the other tasks run between rounds
                    await trio.lowlevel.checkpoint()
                # (drained: the wait for readability is the round's one checkpoint)


def _accept_batch(
    placer: Placer, sock: socket.socket, tcp: bool
) -> tuple[dict[WorkerProcess, list[int]], list[int], bool, bool]:
    """Accept what is waiting, each fd assigned to the dispatcher's choice:
    (fds by worker, fds no worker could take, drained, pause). On TCP the kernel
    says how many wait: take those, and leave the rest to the next readiness,
    instead of an accept() that only says EAGAIN. Each fd counts against its
    worker's window as soon as it is assigned (Placer.pick)."""
    pick = placer.pick
    batches: dict[WorkerProcess, list[int]] = {}
    overflow: list[int] = []
    budget = ACCEPT_BURST
    if tcp:
        budget = min(queued_connections(sock), ACCEPT_BURST) or ACCEPT_BURST
    for _ in range(budget):
        fd, pause = accept_fd(sock)
        if fd is None:
            return batches, overflow, True, pause
        worker = pick()
        if worker is None:  # every worker became full during this batch
            overflow.append(fd)
            break
        fds = batches.setdefault(worker, [])
        fds.append(fd)
        if len(fds) == _ipc.MAX_FDS:  # a full packet: flush, then accept more
            break
    else:
        return batches, overflow, budget < ACCEPT_BURST, False
    return batches, overflow, False, False
