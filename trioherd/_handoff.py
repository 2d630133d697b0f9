"""Accept, dispatch and fd passing: the one place where accepted connections travel.

:class:`Handoff` owns the listeners' accept loops, the dispatcher (which ready worker gets
the next connection), the per-worker counts of connections handed over and closed, and
every accepted fd until a worker has it. It never waits on one worker: a worker that
stopped reading its channel is skipped until it reads again.

fd ownership: an accepted fd belongs to the primary until ``sendmsg`` succeeds, then the
primary closes its copy and the worker owns the connection. An fd that could not be sent
(the worker died, its channel is full) or that a draining worker sent back (``refuse``)
is dispatched again, never dropped.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import trio

from . import _ipc
from ._config import Config
from ._listeners import Listener, accept_fd
from ._policy import Dispatcher
from ._process import WorkerProcess

log = logging.getLogger("trioherd.primary")

ACCEPT_BURST = 256  # accepts in a row before the batch is flushed
OUT_OF_FDS_PAUSE = 0.05


class Handoff:
    """Accepts connections and hands each to a ready worker by fd passing."""

    def __init__(self, listeners: list[Listener], config: Config) -> None:
        self.listeners = listeners
        self.shared = config.dispatch == "shared"
        self._dispatcher: Dispatcher[WorkerProcess] = Dispatcher(
            config.dispatch, config.max_connections
        )
        self._messages = [_ipc.encode("conn", l=index) for index in range(len(listeners))]
        self._capacity = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._closing = False

    # -- which workers get connections ----------------------------------------------------

    def admit(self, worker: WorkerProcess) -> None:
        """``worker`` is ready: give it connections."""
        self._dispatcher.add(worker)
        self.signal_capacity()

    def withdraw(self, worker: WorkerProcess) -> None:
        """No more connections for ``worker`` (it disconnects, drains or is gone)."""
        self._dispatcher.remove(worker)

    def is_dispatching_to(self, worker: WorkerProcess) -> bool:
        return worker in self._dispatcher

    def closed(self, worker: WorkerProcess, count: int) -> None:
        """``worker`` reports ``count`` connections closed: room for more."""
        worker.closed += count
        self.signal_capacity()

    def take_back(self, worker: WorkerProcess, fds: list[int], listener: int) -> None:
        """``worker`` sent fds back unopened (it is draining): give them to another."""
        worker.closed += len(fds)
        if self._nursery is None or not 0 <= listener < len(self._messages):
            _ipc.close_fds(fds)
            return
        self._nursery.start_soon(self._redispatch, fds, listener)

    def signal_capacity(self) -> None:
        """Wake everyone waiting for a worker with room; later waiters wait on a fresh
        event."""
        self._capacity.set()
        self._capacity = trio.Event()

    # -- the run -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on every listener (not for the ``shared`` policy) until :meth:`close`."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if not self.shared:
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for index, listener in enumerate(self.listeners):
                            accepting.start_soon(self._accept_loop, index, listener)
            await trio.sleep_forever()

    def close(self) -> None:
        """Stop accepting and close the listeners: a client arriving now is refused at
        once instead of waiting in a backlog nobody will accept from. Connections on
        their way to a worker are still delivered if one can take them."""
        if self._closing:
            return
        self._closing = True
        self._accept_scope.cancel()
        for listener in self.listeners:
            trio.lowlevel.notify_closing(listener.sock)
            listener.close()
        self.signal_capacity()

    # -- accepting ---------------------------------------------------------------------

    async def _accept_loop(self, index: int, listener: Listener) -> None:
        """Accept raw fds until EAGAIN and pass them on in batches; stop accepting while
        every worker is full, so that the kernel backlog, not our memory, holds clients."""
        sock = listener.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            drained = False
            while not drained:
                if not self._dispatcher.has_room():
                    await self._capacity.wait()
                    continue
                # no await from the first accept to the flush: every fd accepted here is
                # either handed over or closed, even if we are cancelled
                batches, overflow, drained, pause = self._accept_batch(sock)
                await self._flush(batches, overflow, index)
                if pause:  # out of fds or memory: give the workers a moment
                    await trio.sleep(OUT_OF_FDS_PAUSE)

    def _accept_batch(
        self, sock: socket.socket
    ) -> tuple[dict[WorkerProcess, list[int]], list[int], bool, bool]:
        """Accept what is waiting, each fd assigned to the dispatcher's choice:
        (fds by worker, fds no worker could take, drained, pause)."""
        pick = self._dispatcher.pick
        batches: dict[WorkerProcess, list[int]] = {}
        overflow: list[int] = []
        for _ in range(ACCEPT_BURST):
            fd, pause = accept_fd(sock)
            if fd is None:
                return batches, overflow, True, pause
            worker = pick()
            if worker is None:  # every worker became full during this batch
                overflow.append(fd)
                break
            worker.dispatched += 1
            fds = batches.setdefault(worker, [])
            fds.append(fd)
            if len(fds) == _ipc.MAX_FDS:  # a full packet: flush, then accept more
                break
        return batches, overflow, False, False

    async def _flush(
        self, batches: dict[WorkerProcess, list[int]], overflow: list[int], index: int
    ) -> None:
        pending = list(batches.items())
        try:
            while pending:
                worker, fds = pending[0]
                if self._pass(worker, fds, index):
                    _ipc.close_fds(fds)  # the worker has its own copies now
                else:
                    worker.dispatched -= len(fds)
                    await self._redispatch(fds, index)
                pending.pop(0)
        except BaseException:
            for _, fds in pending[1:]:
                _ipc.close_fds(fds)
            _ipc.close_fds(overflow)
            raise
        if overflow:
            await self._redispatch(overflow, index)

    # -- passing -----------------------------------------------------------------------

    def _pass(self, worker: WorkerProcess, fds: list[int], index: int) -> bool:
        """Pass fds at once if the worker's channel has room (the caller closes its
        copies); else take the worker out of dispatch until it reads again (or for good if
        its channel is broken)."""
        try:
            if worker.channel.offer(self._messages[index], fds):
                return True
        except (_ipc.ChannelClosed, OSError) as exc:
            log.warning("could not pass %d connections to worker %d: %s", len(fds), worker.id, exc)
            self._dispatcher.remove(worker)
            return False
        if worker in self._dispatcher:
            log.warning(
                "worker %d (pid %d) is not reading its channel; skipping it until it does",
                worker.id,
                worker.pid,
            )
            self._dispatcher.remove(worker)
            if self._nursery is not None:
                self._nursery.start_soon(self._readmit, worker)
        return False

    async def _readmit(self, worker: WorkerProcess) -> None:
        """Give a congested worker connections again once its channel has room."""
        with contextlib.suppress(_ipc.ChannelClosed, OSError, trio.ClosedResourceError):
            await worker.channel.wait_room()
        if worker.state == "ready" and worker.slot.active and not self._closing:
            log.info("worker %d (pid %d) reads its channel again", worker.id, worker.pid)
            self.admit(worker)

    async def _redispatch(self, fds: list[int], index: int) -> None:
        """Give fds that could not be delivered (or were refused) to another worker."""
        try:
            while fds:
                worker = self._dispatcher.pick()
                if worker is None:
                    if self._closing:
                        break
                    await self._capacity.wait()
                    continue
                worker.dispatched += len(fds)
                if self._pass(worker, fds, index):
                    return
                worker.dispatched -= len(fds)
        finally:
            _ipc.close_fds(fds)  # handed over (the worker has its own copies) or given up
