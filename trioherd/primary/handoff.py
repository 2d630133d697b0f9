"""Accept, dispatch and fd passing: the one place where accepted connections travel.

:class:`Handoff` owns the listeners' accept loops, the dispatcher (which ready worker gets
the next connection), the per-worker counts of connections handed over and closed, and
every accepted fd until a worker has acknowledged it. It never waits on one worker.

The promise: **no accepted connection is lost**, whatever happens to a worker.
- Each batch of fds goes to a worker on its connection channel with a sequence number. The
  primary keeps its own copies until the worker acknowledges the batch: the worker writes
  the batch's number into its tally (memory it shares with the primary, ``_tally``) before
  it reads a byte of them, and the primary reads it when it settles (after each burst of
  accepts, every few ms while it holds copies, and when the worker exits).
- The primary also holds a copy of the connection channel's *receiving* end. Taking
  packets out of it (a recall) is atomic in the kernel: what the primary takes, the worker
  never gets. So the batches a worker has not taken yet can always be moved to another
  worker, while it lives (it is slow or hung), and after it died.
- A worker that dies: its tally is read first, then its queue is recalled, and every
  batch it took but never acknowledged goes to another worker too (it cannot have read
  from them).
- A worker that drains (stop, reload, recycle, scale-down, SIGTERM): the primary stops
  sending to it and queues an end marker behind its last batch; the worker serves
  everything before the marker, then stops reading.
- Back-pressure (``primary.transit``): a worker holds at most a window of connections
  unacknowledged and gets more as it acknowledges; one slow to acknowledge is paused (no
  new connections, nothing taken back) until it does; one that makes no progress at all
  for :data:`~trioherd.primary.transit.ACK_DEADLINE`, or whose heartbeat is overdue, is stalled:
  its queue is recalled and dispatched elsewhere, and it is readmitted as soon as it is
  heard from. When no worker has room the primary stops accepting: new clients wait in the
  kernel's accept queue.
- Only when the herd stops and no worker can take a recalled connection any more is it
  closed (see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import socket

import trio

from .. import _ipc
from .._config import Config
from .._errors import IPCProtocolError
from .._listeners import Listener, accept_fd, defer_accept, queued_connections
from .._policy import Dispatcher
from . import sched as _sched
from .process import WorkerProcess, WorkerState
from .transit import WINDOW, Batch, Skip, Transit

log = logging.getLogger("trioherd.primary")

ACCEPT_BURST = 256  # accepts in a row before the batch is flushed
OUT_OF_FDS_PAUSE = 0.05
WATCH_INTERVAL = 0.1
SETTLE_INTERVAL = 0.005
"""While the primary holds copies of passed connections, it reads the tallies at least
this often and closes the copies of what was taken."""
FULL_RECHECK = 0.005
"""While no worker has room, the primary looks at their tallies this often for a
connection closed or a batch acknowledged (neither sends a message)."""


class Handoff:
    """Accepts connections and hands each to a ready worker by fd passing."""

    def __init__(self, listeners: list[Listener], config: Config) -> None:
        self.listeners = listeners
        self.shared = config.dispatch == "shared"
        self._batch = config.batch_primary
        self._dispatcher: Dispatcher[WorkerProcess] = Dispatcher(
            config.dispatch, config.max_connections, WINDOW
        )
        self._transit: dict[WorkerProcess, Transit] = {}
        self._beat_overdue = max(1.0, 3 * min(1.0, config.worker_timeout / 4))
        self._capacity = trio.Event()
        self._holding = trio.Event()  # set while copies of passed connections are held
        self._accept_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._deferring = False
        self._moving = 0
        """Connections waiting in ``_redispatch`` for a worker: they go before new ones."""
        self.moved = 0
        """Connections taken back from a worker (slow, hung, dead) and passed to another."""
        self.dropped = 0
        """Connections closed unanswered: only when the herd stopped and no worker was left
        to take one that had to be moved."""

    # -- which workers get connections ----------------------------------------------------

    def admit(self, worker: WorkerProcess) -> None:
        """``worker`` is ready: give it connections."""
        transit = self._transit.setdefault(worker, Transit())
        if transit.finished:
            return
        transit.skip = None
        transit.progress_at = trio.current_time()  # a wait for progress starts anew
        self._dispatcher.add(worker)
        self.signal_capacity()

    def withdraw(self, worker: WorkerProcess) -> None:
        """No new connections for ``worker`` until it is admitted again (its channel is
        broken, it is at its request or memory limit); what it has queued stays queued.
        A pause or stall it was in ends here, so that its next acknowledgement does not
        readmit it."""
        self._dispatcher.remove(worker)
        transit = self._transit.get(worker)
        if transit is not None:
            transit.skip = None

    def finish(self, worker: WorkerProcess) -> None:
        """``worker`` drains: no more connections; it serves what is queued for it, and
        the end marker behind that tells it when it has it all."""
        self._dispatcher.remove(worker)
        transit = self._transit.setdefault(worker, Transit())
        if not transit.finished:
            transit.finished = True
            self._send_end(worker)

    def is_dispatching_to(self, worker: WorkerProcess) -> bool:
        return worker in self._dispatcher

    def settle(self) -> None:
        """Read every tally: close the copies of the batches workers acknowledged, and
        pause or stall the workers that fall behind (``primary.transit``)."""
        now = trio.current_time()
        for worker, transit in list(self._transit.items()):
            if transit.batches:
                self._settle(worker, transit, now)

    def _settle(self, worker: WorkerProcess, transit: Transit, now: float) -> None:
        """Take in ``worker``'s acknowledgements, then judge its progress."""
        if self._acknowledged(worker, transit, now):
            if transit.skip is not None:
                self.heard_from(worker)
            elif self._moving:  # room for the connections waiting to be moved
                self.signal_capacity()
            return
        verdict = transit.verdict(now)
        if verdict is Skip.STALLED and (not transit.finished or self._dispatcher.has_room()):
            # (a draining worker serves its queue within its grace unless another can)
            self._skip(worker, transit, Skip.STALLED, "acknowledges no connections")
        elif verdict is Skip.PAUSED and transit.skip is None and worker in self._dispatcher:
            self._skip(worker, transit, Skip.PAUSED, "is slow to acknowledge")

    @staticmethod
    def _acknowledged(worker: WorkerProcess, transit: Transit, now: float) -> bool:
        """``worker`` acknowledged every batch up to its tally's ``taken``: they are its
        own now, and the primary's copies are closed. True if there were any."""
        done = transit.acknowledge(worker.tally.taken, now)
        for batch in done:
            worker.unacknowledged -= len(batch.fds)
            _ipc.close_fds(batch.fds)
        return bool(done)

    def heard_from(self, worker: WorkerProcess) -> None:
        """``worker``'s loop runs (it acknowledged, its tally moved, or a heartbeat came):
        if it was skipped for falling behind, give it connections again. A heartbeat does
        not end a pause: only an acknowledgement does."""
        transit = self._transit.get(worker)
        if transit is None or transit.skip is None or not self._admissible(worker):
            return
        if (
            transit.skip is Skip.PAUSED
            and transit.batches
            and transit.verdict(trio.current_time())
        ):
            return
        if transit.skip is Skip.STALLED:
            log.info("worker %d (pid %d) keeps up again", worker.id, worker.pid)
        self.admit(worker)

    def disowned(self, worker: WorkerProcess) -> None:
        """``worker`` can no longer be trusted (it sent a malformed message), so its tally
        will not be read: take back what it has not taken, and count what it took as its
        own (the primary's copies are closed, as an acknowledgement would)."""
        self._dispatcher.remove(worker)
        transit = self._transit.get(worker)
        if transit is None:
            return
        transit.finished = True  # never admitted again
        self._recall(worker, transit, restore_end=False)
        for batch in transit.take_all():
            _ipc.close_fds(batch.fds)
        worker.unacknowledged = 0

    def gone(self, worker: WorkerProcess) -> None:
        """``worker`` exited: every connection it did not acknowledge goes to another
        worker; its channels and its tally are closed."""
        self._dispatcher.remove(worker)
        transit = self._transit.pop(worker, None)
        if transit is not None:
            # its last marks first: every store of it is visible now
            self._acknowledged(worker, transit, trio.current_time())
            self._recall(worker, transit, restore_end=False)
            lost = transit.take_all()
            self._move(worker, lost)
            if lost:
                count = sum(len(batch.fds) for batch in lost)
                log.info(
                    "%d connections worker %d never took go to other workers", count, worker.id
                )
        worker.conns.close()
        worker.recall.close()
        worker.tally.close()
        self.signal_capacity()

    def signal_capacity(self) -> None:
        """Wake everyone waiting for a worker with room; later waiters wait on a fresh
        event."""
        self._capacity.set()
        self._capacity = trio.Event()

    # -- the run -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on every listener (not for the ``shared`` policy) and watch for workers
        that fall behind, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            nursery.start_soon(self._watch)
            if not self.shared:
                nursery.start_soon(self._settle_held)
                with self._accept_scope, _sched.batched(self._batch):
                    async with trio.open_nursery() as accepting:
                        for index, listener in enumerate(self.listeners):
                            accepting.start_soon(self._accept_loop, index, listener)
            await trio.sleep_forever()

    def defer_accepts(self, on: bool) -> None:
        """Accept TCP connections only once their first bytes came (``--defer-accept``,
        for an HTTP app, as a worker's ready message says). Then the worker's first read
        finds the request: no wait and wake-up per connection, and the primary's and the
        workers' CPU for a new connection falls by about a sixth (docs/performance.md)."""
        if on != self._deferring:
            self._deferring = on
            for listener in self.listeners:
                defer_accept(listener, on)

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

    def _dispatch_later(self, fds: list[int], listener: int) -> None:
        """Give ``fds`` to another worker from a task of their own; close them if the
        hand-off no longer runs (the herd is gone)."""
        try:
            assert self._nursery is not None
            self._nursery.start_soon(self._redispatch, fds, listener)
        except (AssertionError, RuntimeError):
            _ipc.close_fds(fds)
        else:
            self._moving += len(fds)

    def _move(self, worker: WorkerProcess, batches: list[Batch]) -> None:
        """Batches taken from ``worker`` (recalled, or never taken before it exited) go
        to other workers."""
        for batch in batches:
            count = len(batch.fds)
            worker.unacknowledged -= count
            worker.dispatched -= count
            self.moved += count
            self._dispatch_later(batch.fds, batch.listener)

    # -- accepting ---------------------------------------------------------------------

    async def _accept_loop(self, index: int, listener: Listener) -> None:
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
                if self._moving or not self._dispatcher.has_room():
                    await self._wait_for_room()
                    continue
                if self._closing:  # closed while this task was already on its way back
                    return  # from an await: the cancel would come only at the next one
                # no await from the first accept to the flush: every fd accepted here is
                # either handed over or closed, even if we are cancelled
                batches, overflow, drained, pause = self._accept_batch(sock, tcp)
                self._flush(batches, overflow, index)
                self.settle()  # awake anyway: what the workers took meanwhile
                if pause:  # out of fds or memory: give the workers a moment
                    await trio.sleep(OUT_OF_FDS_PAUSE)
                elif not drained:  # a long burst: let the other tasks run between rounds
                    await trio.lowlevel.checkpoint()
                # (drained: the wait for readability is the round's one checkpoint)

    def _accept_batch(
        self, sock: socket.socket, tcp: bool
    ) -> tuple[dict[WorkerProcess, list[int]], list[int], bool, bool]:
        """Accept what is waiting, each fd assigned to the dispatcher's choice:
        (fds by worker, fds no worker could take, drained, pause). On TCP the kernel
        says how many wait: take those, and leave the rest to the next readiness,
        instead of an accept() that only says EAGAIN. Each fd counts against its
        worker's window as soon as it is assigned."""
        pick = self._dispatcher.pick
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
            worker.dispatched += 1
            worker.unacknowledged += 1
            fds = batches.setdefault(worker, [])
            fds.append(fd)
            if len(fds) == _ipc.MAX_FDS:  # a full packet: flush, then accept more
                break
        else:
            return batches, overflow, budget < ACCEPT_BURST, False
        return batches, overflow, False, False

    def _flush(
        self, batches: dict[WorkerProcess, list[int]], overflow: list[int], index: int
    ) -> None:
        """Pass each batch; what a worker cannot take goes to another from a task of its
        own (outside the accept scope: a stop must not cancel it into a closed fd)."""
        for worker, fds in batches.items():
            if not self._pass(worker, fds, index):
                self._dispatch_later(fds, index)
        if overflow:
            self._dispatch_later(overflow, index)

    # -- passing -----------------------------------------------------------------------

    def _pass(self, worker: WorkerProcess, fds: list[int], index: int) -> bool:
        """Pass fds (already counted against ``worker``) at once if it is still admitted
        and its channel has room; the primary keeps its copies until the worker
        acknowledges them. Else uncount them and, if its channel is full or broken, take
        the worker out of dispatch: False."""
        transit = self._transit.get(worker)
        sent = False
        if transit is not None and worker in self._dispatcher:
            try:
                sent = worker.conns.offer(_ipc.encode_conn(index, transit.next_seq), fds)
            except (_ipc.ChannelClosed, OSError) as exc:
                log.warning(
                    "could not pass %d connections to worker %d: %s", len(fds), worker.id, exc
                )
                self.withdraw(worker)
            else:
                if not sent:  # its channel is full: it reads nothing, whatever its tally says
                    self._skip(worker, transit, Skip.PAUSED, "is not reading its channel")
        if not sent:  # (not admitted any more: a stale batch)
            worker.dispatched -= len(fds)
            worker.unacknowledged -= len(fds)
            return False
        assert transit is not None
        transit.sent(index, fds, trio.current_time())
        self._holding.set()
        return True

    def _skip(self, worker: WorkerProcess, transit: Transit, skip: Skip, why: str) -> None:
        """No new connections for ``worker`` until it catches up; a stalled one's queue
        is taken back and moved to other workers."""
        if skip is Skip.STALLED:
            if transit.skip is not Skip.STALLED:
                log.warning("worker %d (pid %d) %s; skipping it", worker.id, worker.pid, why)
                tally = worker.tally
                transit.activity = (tally.opened, tally.closed)
            self._recall(worker, transit)
        else:
            log.debug("worker %d (pid %d) %s; pausing it", worker.id, worker.pid, why)
        transit.skip = skip
        self._dispatcher.remove(worker)

    def _admissible(self, worker: WorkerProcess) -> bool:
        return worker.state is WorkerState.READY and worker.slot.active and not self._closing

    async def _redispatch(self, fds: list[int], index: int) -> None:
        """Give fds that a worker could not take (or never took) to another worker."""
        handed = False
        try:
            while not handed:
                worker = self._dispatcher.pick()
                if worker is None:
                    if self._closing:
                        log.warning("stopping: %d connections had no worker left", len(fds))
                        self.dropped += len(fds)
                        return
                    await self._wait_for_room()
                    continue
                worker.dispatched += len(fds)
                worker.unacknowledged += len(fds)
                handed = self._pass(worker, fds, index)
        finally:
            self._moving -= len(fds)
            if not handed:
                _ipc.close_fds(fds)

    # -- taking back what a worker has not taken -------------------------------------

    def _recall(self, worker: WorkerProcess, transit: Transit, restore_end: bool = True) -> None:
        """Take every packet still queued for ``worker`` out of its channel and dispatch
        the batches again; put the end marker back if it was among them."""
        recalled: set[int] = set()
        end = False
        while True:
            try:
                data, copies = worker.recall.receive_nowait()
            except (BlockingIOError, _ipc.ChannelClosed, IPCProtocolError, OSError):
                break
            _ipc.close_fds(copies)  # the same connections as the primary's own copies
            try:
                listener, seq = _ipc.decode_conn(data)
            except IPCProtocolError:
                continue
            if listener == _ipc.END_OF_CONNS:
                end = True
            else:
                recalled.add(seq)
        if recalled:
            self._move(worker, transit.take_back(recalled))
            log.info("recalled %d batches from worker %d", len(recalled), worker.id)
        if end and restore_end:
            self._send_end(worker)

    def _send_end(self, worker: WorkerProcess) -> None:
        """Queue the end marker behind the worker's last batch (from a task if its channel
        is full)."""
        marker = _ipc.encode_conn(_ipc.END_OF_CONNS, 0)
        with contextlib.suppress(_ipc.ChannelClosed, OSError):
            if worker.conns.offer(marker):
                return
            if self._nursery is not None:
                self._nursery.start_soon(self._send_end_later, worker.conns, marker)

    @staticmethod
    async def _send_end_later(conns: _ipc.Channel, marker: bytes) -> None:
        with contextlib.suppress(_ipc.ChannelClosed, OSError, trio.ClosedResourceError):
            await conns.send(marker)

    async def _wait_for_room(self) -> None:
        """Until a worker may have room: one was admitted or went away, or, as neither a
        close nor an acknowledgement sends a message, the next look at the tallies."""
        with trio.move_on_after(FULL_RECHECK):
            await self._capacity.wait()
        self.settle()

    async def _settle_held(self) -> None:
        """While copies of passed connections are held, settle every SETTLE_INTERVAL: a
        worker's close ends its connection at once only when the primary's copy is gone,
        and a worker that falls behind is paused or stalled in time (the accept loop
        settles after every burst; this is for a quiet herd)."""
        while True:
            if not any(transit.batches for transit in self._transit.values()):
                self._holding = trio.Event()
                await self._holding.wait()
            await trio.sleep(SETTLE_INTERVAL)
            self.settle()

    async def _watch(self) -> None:
        """Stall workers whose heartbeat is overdue, and readmit stalled ones whose tally
        moved (they opened or closed a connection: their loop runs again)."""
        while True:
            await trio.sleep(WATCH_INTERVAL)
            self.settle()
            now = trio.current_time()
            for worker, transit in list(self._transit.items()):
                if transit.skip is Skip.STALLED:
                    tally = worker.tally
                    if (tally.opened, tally.closed) != transit.activity:
                        self.heard_from(worker)
                elif now - worker.last_seen > self._beat_overdue and worker in self._dispatcher:
                    self._skip(worker, transit, Skip.STALLED, "sends no heartbeat")
