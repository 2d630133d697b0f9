"""Supervision of a herd's worker processes: the slots and who fills them, one task per
process, what its messages mean, and what follows its exit.

:class:`Supervisor` spawns a worker into a slot and starts one task per process: it reads
the worker's channel (:meth:`Supervisor.handle_message` says what each message means),
watches its heartbeat, and waits for the process to exit (pidfd). After an exit,
``_policy.after_exit`` decides: respawn the slot after its back-off, let it go (a
disconnect that was asked for, a stop, a scale-down), or give up on a herd whose workers
keep dying before they become ready.

The :class:`~trioherd.primary.herd.Herd` owns the supervisor and asks it for workers; the
changes a person asks for (stop, scale, reload) stay in the herd.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from .. import _ipc
from .._config import Config
from .._errors import IPCProtocolError, WorkerBootError
from .._log import plural
from .._policy import after_exit, backoff_delay, free_indexes
from .._tls import new_ticket_keys
from .events import EventHub
from .handoff import Handoff
from .molds import Generations
from .process import Slot, WorkerProcess, WorkerState, spawn, worker_env
from .recycle import Recycler

log = logging.getLogger("trioherd.primary")

BOOT_POLL = 0.5


class Supervisor:
    """The worker processes of one herd, by slot.

    ``replace`` is the herd's rolling replacement of a slot (recycling uses it);
    ``give_up`` is called once when workers keep dying before they become ready (the herd
    stops, and :attr:`fatal` says why)."""

    def __init__(
        self,
        config: Config,
        handoff: Handoff,
        hub: EventHub,
        replace: Callable[[Slot, str], Awaitable[bool]],
        give_up: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.handoff = handoff
        self.hub = hub
        self.slots: list[Slot] = []
        self.workers: list[WorkerProcess] = []  # live ones, in spawn order
        self.respawns: dict[str, int] = {}  # by cause
        self.started = False  # every slot had a ready worker once; the herd was handed out
        self.stopping = False  # set by the herd: no respawn, no new worker admitted
        self.fatal: WorkerBootError | None = None  # why the herd gave up, if it did
        self.recycler = Recycler(config, handoff, replace, self.count_respawn)
        self.nursery: trio.Nursery | None = None  # the herd's, set while it runs
        self._give_up_herd = give_up
        self._exited_totals = _ipc.total_stats(())  # counters of workers that exited
        self._next_id = 1
        self._progress = trio.Event()
        self._boot_failures = 0
        self._last_boot_error = ""
        self._env = worker_env()
        self.generations = Generations(config, self._env)
        self._ticket_keys = new_ticket_keys() if config.tls else b""  # kept across reloads

    @property
    def tasks(self) -> trio.Nursery:
        """The herd's nursery, where respawns, supervisions and disconnects run."""
        if self.nursery is None:
            raise RuntimeError("the herd is not running")
        return self.nursery

    def totals(self) -> dict[str, Any]:
        """Counters of the whole herd, exited workers included (metrics, status)."""
        totals = _ipc.total_stats([self._exited_totals, *(w.stats for w in self.workers)])
        totals["connections"] = sum(w.open_connections for w in self.workers)
        return totals

    def count_respawn(self, cause: str) -> None:
        self.respawns[cause] = self.respawns.get(cause, 0) + 1

    def publish(self, kind: str, worker: WorkerProcess, data: Any = None) -> None:
        self.hub.publish(worker.event(kind, data))

    async def boot(self, count: int) -> None:
        """Fill ``count`` new slots; return when every slot has a ready worker, or the
        herd is stopping (a stop came, or it gave up)."""
        for slot in self.new_slots(count):
            with contextlib.suppress(OSError):  # logged; the slot retries later
                self.start(slot)
        while not self.stopping:
            if all(
                slot.worker is not None and slot.worker.state is WorkerState.READY
                for slot in self.slots
            ):
                return
            with trio.move_on_after(BOOT_POLL):
                await self._progress.wait()
            self._progress = trio.Event()

    def new_slots(self, count: int) -> list[Slot]:
        new = [Slot(index) for index in free_indexes([s.index for s in self.slots], count)]
        self.slots.extend(new)
        return new

    async def kill_all(self) -> None:
        """The herd's end: no worker outlives it, nor a mold."""
        for worker in list(self.workers):
            worker.kill(signal.SIGKILL, "shutdown")
        for worker in list(self.workers):
            with trio.move_on_after(5):
                await worker.wait()
        await self.generations.close()

    # -- spawning ----------------------------------------------------------------------

    def start(self, slot: Slot) -> WorkerProcess:
        """Spawn a worker for an empty slot; on OSError (out of fds or memory) the slot
        retries later, and the error is raised."""
        try:
            return self.spawn(slot)
        except OSError as exc:
            log.error("could not start a worker for slot %d: %s", slot.index, exc)
            slot.failures += 1
            delay = max(0.5, backoff_delay(slot.failures, self.config.backoff_max))
            self.tasks.start_soon(self._respawn, slot, delay)
            raise

    def spawn(
        self, slot: Slot, *, replacing: bool = False, generation: int | None = None
    ) -> WorkerProcess:
        """Start a worker process for ``slot`` (of the current generation, unless told)
        and the task that supervises it. A replacement (``replacing``) takes the slot over
        only once the herd says so."""
        if generation is None:
            generation = self.generations.current
        launch = self.generations.launcher(generation)
        worker_id = self._next_id
        self._next_id += 1
        listeners, keys = self.handoff.listeners, self._ticket_keys
        worker = spawn(
            worker_id, slot, self.config, listeners, self._env, keys, generation, launch
        )
        self.workers.append(worker)
        if not replacing:
            slot.worker = worker
        slot.backoff_until = None
        self.publish("online", worker)
        log.debug("spawned worker %d (pid %d) in slot %d", worker.id, worker.pid, slot.index)
        self.tasks.start_soon(self._supervise, worker)
        return worker

    async def _respawn(self, slot: Slot, delay: float) -> None:
        slot.backoff_until = trio.current_time() + delay
        log.info("respawning slot %d in %.1fs", slot.index, delay)
        await trio.sleep(delay)
        slot.backoff_until = None
        if slot.active and not self.stopping and slot.worker is None:
            with contextlib.suppress(OSError):  # logged; the slot retries later
                self.start(slot)

    # -- one task per process ----------------------------------------------------------

    async def _supervise(self, worker: WorkerProcess) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_channel, worker)
                nursery.start_soon(
                    worker.watchdog, self.config.boot_timeout, self.config.worker_timeout
                )
                await worker.wait()
                nursery.cancel_scope.cancel()
            worker.drain_channel(partial(self.handle_message, worker))
        finally:
            with trio.CancelScope(shield=True):
                if worker.alive:  # the herd itself is being cancelled
                    worker.kill(signal.SIGKILL, "shutdown")
                    await worker.wait()
                worker.channel.close()
                self._on_exit(worker)

    async def _read_channel(self, worker: WorkerProcess) -> None:
        try:
            await worker.read_channel(partial(self.handle_message, worker))
        except IPCProtocolError as exc:
            self._protocol_error(worker, exc)

    def handle_message(
        self, worker: WorkerProcess, message: dict[str, Any], fds: list[int]
    ) -> None:
        """What a (decoded, checked) message from ``worker`` means. Raises
        IPCProtocolError for one a worker may not send."""
        kind = message["t"]
        if kind == "beat":
            worker.stats = message["stats"]
            self.handoff.heard_from(worker)
            self.recycler.check(worker)
        elif kind == "msg":
            self.publish("message", worker, data=message["data"])
        elif kind == "ready":
            if message["v"] != _ipc.PROTOCOL_VERSION:
                raise IPCProtocolError(f"worker speaks protocol v{message['v']}")
            self._on_ready(worker)
            self.handoff.defer_accepts(self.config.defer_accept and message.get("http") is True)
        elif kind == "boot_error":
            worker.boot_error = message["text"]
        elif kind == "draining":  # the worker drains on its own (SIGTERM): let it go
            worker.drained_itself = True
            if worker.state in (WorkerState.STARTING, WorkerState.READY):
                worker.state = WorkerState.DISCONNECTING
                self.handoff.finish(worker)
                self.publish("disconnect", worker)
                self.tasks.start_soon(worker.tell_disconnect, self.config.graceful_timeout)
        else:
            raise IPCProtocolError(f"a worker may not send {kind!r}")

    def _protocol_error(self, worker: WorkerProcess, exc: Exception) -> None:
        worker.protocol_error = True
        log.error(
            "worker %d (pid %d) sent a malformed message (%s); replacing it",
            worker.id,
            worker.pid,
            exc,
        )
        self.handoff.disowned(worker)
        self.recycler.recycle(worker, "protocol error")

    def _on_ready(self, worker: WorkerProcess) -> None:
        if worker.ready_at is not None:
            return
        worker.ready_at = trio.current_time()
        if worker.state is WorkerState.STARTING:  # not if a stop or scale-down already reached it
            worker.state = WorkerState.READY
        self._boot_failures = 0
        admissible = worker.state is WorkerState.READY and worker.slot.active
        # (not a worker a reload is about to replace: a respawn of the past generation)
        if admissible and not self.stopping and worker.generation >= self.generations.floor:
            self.handoff.admit(worker)
        self._progress.set()
        worker.ready_event.set()
        self.publish("ready", worker)
        _log_ready(worker, self.started)

    # -- after an exit -----------------------------------------------------------------

    def _on_exit(self, worker: WorkerProcess) -> None:
        worker.record_exit()
        self.handoff.gone(worker)
        if worker in self.workers:
            self.workers.remove(worker)
        self.generations.retire(self.workers)
        self._exited_totals = _ipc.total_stats([self._exited_totals, worker.stats])
        worker.exited_event.set()
        worker.ready_event.set()  # nobody waits forever on a worker that is gone
        self._progress.set()
        self.publish("exit", worker)
        _log_exit(worker, self.started)
        slot = worker.slot
        if slot.worker is not worker:
            return  # a replacement that never took over, or a replaced worker
        slot.worker = None
        wanted = not (
            worker.requested_disconnect
            or self.stopping
            or not slot.active
            or self.tasks.cancel_scope.cancel_called
        )
        others = sum(1 for w in self.workers if w.state is WorkerState.READY)
        facts = worker.exit_facts(wanted, self._boot_failures, others)
        decision = after_exit(facts, self.config)
        self._boot_failures = decision.boot_failures
        if not facts.was_ready and (decision.penalised or decision.action == "give-up"):
            self._last_boot_error = worker.boot_error or f"worker {worker.id} {worker.died_how()}"
        if decision.action == "give-up":
            self._give_up()
        elif decision.action == "respawn":
            assert decision.cause is not None
            self.count_respawn(decision.cause)
            slot.failures = decision.slot_failures
            if decision.penalised:
                slot.restarts += 1
            self.tasks.start_soon(self._respawn, slot, decision.delay)

    def _give_up(self) -> None:
        log.critical(
            "%s in a row died before they became ready; giving up",
            plural(self._boot_failures, "worker"),
        )
        self.fatal = WorkerBootError(self._last_boot_error)
        self.tasks.start_soon(self._give_up_herd)


def _about(worker: WorkerProcess) -> dict[str, int]:
    """The ``extra=`` of a log line about a worker (fields of a JSON log line)."""
    return {"worker": worker.id, "worker_pid": worker.pid}


def _log_ready(worker: WorkerProcess, started: bool) -> None:
    # during the first boot at debug: ``listening on`` is the first line at info, and the
    # command line logs the ready lines of the first workers after it
    level = logging.INFO if started else logging.DEBUG
    log.log(level, "worker %d (pid %d) ready", worker.id, worker.pid, extra=_about(worker))


def _log_exit(worker: WorkerProcess, started: bool) -> None:
    about = _about(worker)
    if worker.drained_itself and not worker.requested_disconnect:
        log.info(
            "worker %d (pid %d) in slot %d drained on its own (SIGTERM) and exited (%s)",
            worker.id,
            worker.pid,
            worker.slot.index,
            worker.describe_exit(),
            extra=about,
        )
    elif worker.requested_disconnect:
        log.info(
            "worker %d (pid %d) exited after disconnect (%s)",
            worker.id,
            worker.pid,
            worker.describe_exit(),
            extra=about,
        )
    else:
        log.warning(
            "worker %d (pid %d) in slot %d died: %s",
            worker.id,
            worker.pid,
            worker.slot.index,
            worker.describe_exit(),
            extra=about,
        )
    if worker.boot_error and worker.ready_at is None and worker.slot.worker is worker:
        # A replacement's error is its reload's (logged there). During the first boot it is
        # at debug: the give-up message prints it, so the user reads it once, not N times.
        level = logging.ERROR if started else logging.DEBUG
        log.log(
            level,
            "worker %d (pid %d) could not boot:\n%s",
            worker.id,
            worker.pid,
            worker.boot_error.rstrip(),
            extra=about,
        )
