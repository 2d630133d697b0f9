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

import logging

import trio

from .. import _ipc
from .._config import Config
from .._listeners import Listener
from .._policy import Dispatcher
from .accept import Acceptor
from .moving import Mover
from .process import WorkerProcess, WorkerState
from .transit import WINDOW, Skip, Transit

log = logging.getLogger("trioherd.primary")

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
        self.acceptor = Acceptor(listeners, config.batch_primary)
        self._dispatcher: Dispatcher[WorkerProcess] = Dispatcher(
            config.dispatch, config.max_connections, WINDOW
        )
        self._transit: dict[WorkerProcess, Transit] = {}
        self._beat_overdue = max(1.0, 3 * min(1.0, config.worker_timeout / 4))
        self._capacity = trio.Event()
        self._holding = trio.Event()  # set while copies of passed connections are held
        self.mover = Mover(self)

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
            self.mover.send_end(worker)

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
            elif self.mover.waiting:  # room for the connections waiting to be moved
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
        self.mover.recall(worker, transit, restore_end=False)
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
            self.mover.recall(worker, transit, restore_end=False)
            lost = transit.take_all()
            self.mover.move(worker, lost)
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
            self.mover.nursery = nursery
            task_status.started()
            nursery.start_soon(self._watch)
            if not self.shared:
                nursery.start_soon(self._settle_held)
                await self.acceptor.run(self)
            await trio.sleep_forever()

    def defer_accepts(self, on: bool) -> None:
        """See Acceptor.defer (``--defer-accept``)."""
        self.acceptor.defer(on)

    def close(self) -> None:
        """Stop accepting and close the listeners (Acceptor.close). Connections on their
        way to a worker are still delivered if one can take them."""
        if not self.acceptor.closing:
            self.acceptor.close()
            self.signal_capacity()

    # -- what the acceptor hands over ----------------------------------------------------

    @property
    def closing(self) -> bool:
        """The listeners are closed: the herd stops."""
        return self.acceptor.closing

    @property
    def moved(self) -> int:
        """Connections taken back from a worker (slow, hung, dead) and passed to another."""
        return self.mover.moved

    @property
    def dropped(self) -> int:
        """Connections closed unanswered: only when the herd stopped and no worker was left
        to take one that had to be moved."""
        return self.mover.dropped

    def pick(self, count: int = 1) -> WorkerProcess | None:
        """The worker the next ``count`` connections go to (None: all are full); they
        count against it from now on (``dispatched``, ``unacknowledged``)."""
        worker = self._dispatcher.pick()
        if worker is not None:
            worker.dispatched += count
            worker.unacknowledged += count
        return worker

    def blocked(self) -> bool:
        """No new connection should be accepted now: every worker is full, or connections
        taken back from a worker still wait for another (they go first)."""
        return bool(self.mover.waiting) or not self._dispatcher.has_room()

    def flush(
        self, batches: dict[WorkerProcess, list[int]], overflow: list[int], index: int
    ) -> None:
        """Pass each batch; what a worker cannot take goes to another from a task of its
        own (outside the accept scope: a stop must not cancel it into a closed fd)."""
        for worker, fds in batches.items():
            if not self.offer(worker, fds, index):
                self.mover.later(fds, index)
        if overflow:
            self.mover.later(overflow, index)

    # -- passing -----------------------------------------------------------------------

    def offer(self, worker: WorkerProcess, fds: list[int], index: int) -> bool:
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
            self.mover.recall(worker, transit)
        else:
            log.debug("worker %d (pid %d) %s; pausing it", worker.id, worker.pid, why)
        transit.skip = skip
        self._dispatcher.remove(worker)

    def _admissible(self, worker: WorkerProcess) -> bool:
        ready = worker.state is WorkerState.READY and worker.slot.active
        return ready and not self.acceptor.closing

    async def wait_for_room(self) -> None:
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
