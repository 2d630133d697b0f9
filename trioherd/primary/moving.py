"""Moving connections from one worker to another: the hand-off's second chance.

Connections a worker will not take in time (stalled), cannot take (its channel is full or
broken) or never took (it died) are taken back and passed to another worker by a
:class:`Mover`, each group from a task of its own that waits for a worker with room. The
hand-off (``primary.handoff.Handoff``, seen here as a :class:`Passer`) picks the worker and
passes the fds; moved connections go before new ones (the acceptor waits while any are on
their way). Also here: the end marker that tells a draining worker it has had everything,
which a recall may take out of the channel and must put back.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

import trio

from .. import _ipc
from .process import WorkerProcess
from .transit import Batch, Transit

log = logging.getLogger("trioherd.primary")


class Passer(Protocol):
    """What the mover asks of the hand-off."""

    @property
    def closing(self) -> bool: ...

    def pick(self, count: int = 1) -> WorkerProcess | None: ...

    def offer(self, worker: WorkerProcess, fds: list[int], index: int) -> bool: ...

    async def wait_for_room(self) -> None: ...


class Mover:
    """Connections on their way from one worker to another, and their counts."""

    def __init__(self, passer: Passer) -> None:
        self.passer = passer
        self.nursery: trio.Nursery | None = None  # the hand-off's, while it runs
        self.waiting = 0
        """Connections waiting for a worker (in ``_redispatch``): they go before new ones."""
        self.moved = 0
        """Connections taken back from a worker (slow, hung, dead) and passed to another."""
        self.dropped = 0
        """Connections closed unanswered: only when the herd stopped and no worker was left
        to take one that had to be moved."""

    def later(self, fds: list[int], listener: int) -> None:
        """Give ``fds`` to another worker from a task of their own; close them if the
        hand-off no longer runs (the herd is gone)."""
        try:
            assert self.nursery is not None
            self.nursery.start_soon(self._redispatch, fds, listener)
        except (AssertionError, RuntimeError):
            _ipc.close_fds(fds)
        else:
            self.waiting += len(fds)

    def move(self, worker: WorkerProcess, batches: list[Batch]) -> None:
        """Batches taken from ``worker`` (recalled, or never taken before it exited) go
        to other workers."""
        for batch in batches:
            count = len(batch.fds)
            worker.unacknowledged -= count
            worker.dispatched -= count
            self.moved += count
            self.later(batch.fds, batch.listener)

    def recall(self, worker: WorkerProcess, transit: Transit, restore_end: bool = True) -> None:
        """Take every packet still queued for ``worker`` out of its channel and dispatch
        the batches again; put the end marker back if it was among them."""
        recalled, end = worker.take_back_queued()
        if recalled:
            self.move(worker, transit.take_back(recalled))
            log.info("recalled %d batches from worker %d", len(recalled), worker.id)
        if end and restore_end:
            self.send_end(worker)

    def send_end(self, worker: WorkerProcess) -> None:
        """Queue the end marker behind the worker's last batch (from a task if its channel
        is full)."""
        marker = _ipc.encode_conn(_ipc.END_OF_CONNS, 0)
        with contextlib.suppress(_ipc.ChannelClosed, OSError):
            if worker.conns.offer(marker):
                return
            if self.nursery is not None:
                self.nursery.start_soon(_send_end_later, worker.conns, marker)

    async def _redispatch(self, fds: list[int], index: int) -> None:
        """Give fds that a worker could not take (or never took) to another worker."""
        passer = self.passer
        handed = False
        try:
            while not handed:
                worker = passer.pick(len(fds))
                if worker is None:
                    if passer.closing:
                        log.warning("stopping: %d connections had no worker left", len(fds))
                        self.dropped += len(fds)
                        return
                    await passer.wait_for_room()
                    continue
                handed = passer.offer(worker, fds, index)
        finally:
            self.waiting -= len(fds)
            if not handed:
                _ipc.close_fds(fds)


async def _send_end_later(conns: _ipc.Channel, marker: bytes) -> None:
    with contextlib.suppress(_ipc.ChannelClosed, OSError, trio.ClosedResourceError):
        await conns.send(marker)
