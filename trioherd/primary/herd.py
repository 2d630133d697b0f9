"""The herd: supervision of the worker processes, their replacement, and their events.

Task layout (all in the herd's own nursery, opened by :meth:`Herd.run`):
- one supervising task per worker process: it reads the worker's channel, watches its
  heartbeat, waits for the process to exit (pidfd), and asks ``_policy.after_exit`` what
  happens next;
- the hand-off (``primary.handoff``): accept loops and fd passing, started once every slot has a
  ready worker;
- respawn tasks sleeping through a slot's back-off, recycle tasks.

Replacement (reload, recycle) goes one slot at a time under one lock: start the new
worker, wait until it is ready, then disconnect the old one, so capacity never drops.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import trio

from .. import _ipc
from .._config import Config
from .._errors import IPCProtocolError, ReloadError, StoppedBeforeReady, WorkerBootError
from .._log import plural
from .._policy import after_exit, backoff_delay, free_indexes
from .._tls import new_ticket_keys
from .events import EventHub, HerdEvent
from .handoff import Handoff
from .process import Slot, WorkerProcess, WorkerState, spawn, worker_env
from .recycle import Recycler

log = logging.getLogger("trioherd.primary")

BOOT_POLL = 0.5


class Herd:
    """A running herd. Get one from ``await nursery.start(trioherd.serve, config)``."""

    def __init__(self, config: Config, handoff: Handoff) -> None:
        self.config = config
        self.handoff = handoff
        self.addresses: list[str] = [listener.url for listener in handoff.listeners]
        self.pid = os.getpid()
        self.reloads = 0  # rolling reloads that succeeded
        self.reloads_failed = 0
        self.started = False  # every slot had a ready worker once; the herd was handed out
        self.respawns: dict[str, int] = {}
        self.forced = False
        self.metrics_url: str | None = None
        self.on_state_change: Callable[[str], None] | None = None
        self._slots: list[Slot] = []
        self._workers: list[WorkerProcess] = []
        self._exited_totals = _ipc.total_stats(())  # counters of workers that exited
        self._next_id = 1
        self._nursery: trio.Nursery | None = None
        self._progress = trio.Event()
        self.hub = EventHub()  # its events: subscribe (as events() does) or observe
        self._stopping = False
        self._stopped = trio.Event()
        self._boot_failures = 0
        self._last_boot_error = ""
        self._fatal: WorkerBootError | None = None
        self._rolling = trio.Lock()
        replace = partial(self._replace, wait=False)  # a slot may recycle again at once
        self._recycler = Recycler(config, handoff, replace, self._count_respawn)
        self._env = worker_env()
        self._ticket_keys = new_ticket_keys() if config.tls else b""  # kept across reloads

    # -- public API --------------------------------------------------------------------

    @property
    def workers(self) -> list[WorkerProcess]:
        """Live workers, by slot."""
        return sorted(self._workers, key=lambda w: (w.slot.index, w.id))

    @property
    def slots(self) -> list[Slot]:
        """The herd's slots (a copy of the list)."""
        return list(self._slots)

    @property
    def size(self) -> int:
        """How many worker slots the herd keeps."""
        return sum(1 for slot in self._slots if slot.active)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def url(self) -> str:
        """The first listener's address, such as ``http://127.0.0.1:8000``."""
        return self.addresses[0]

    def events(self, kind: str | None = None) -> AsyncIterator[HerdEvent]:
        """Every worker event (of ``kind``, if given) from this call on; messages that no
        earlier subscriber took come first (see primary.events). A reader 1000 events behind
        misses the newest."""
        return self.hub.subscribe(kind)

    def messages(self) -> AsyncIterator[HerdEvent]:
        """What workers sent with ``send_to_primary()``: events whose ``data`` is the object."""
        return self.events("message")

    async def broadcast(self, obj: Any) -> None:
        """Send ``obj`` to every ready worker (``trioherd.receive_from_primary()``)."""
        data = _ipc.encode("msg", data=obj)
        for worker in self.workers:
            if worker.state is WorkerState.READY:
                with contextlib.suppress(_ipc.ChannelClosed):
                    await worker.channel.send(data)

    async def stop(self) -> None:
        """Graceful stop: stop accepting, disconnect every worker in parallel, wait."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = self._recycler.stopping = True
        self._notify("stopping")
        log.info("stopping: disconnecting %s", plural(len(self._workers), "worker"))
        self.handoff.close()
        for slot in self._slots:
            slot.active = False
        async with trio.open_nursery() as nursery:
            for worker in list(self._workers):
                nursery.start_soon(self._disconnect, worker, "stop")
        self._stopped.set()

    def force_stop(self) -> None:
        """Stop at once: kill every worker."""
        self.forced = True
        self._stopping = self._recycler.stopping = True
        for worker in self._workers:
            worker.kill(signal.SIGKILL, "stop at once")
        self._stopped.set()

    async def scale(self, count: int) -> None:
        """Keep ``count`` workers: spawn and wait for the new ones, or disconnect the oldest."""
        if count < 1:
            raise ValueError("a herd needs at least one worker")
        if self._stopping:
            return
        active = [slot for slot in self._slots if slot.active]
        if count > len(active):
            log.info("scaling up to %s", plural(count, "worker"))
            workers = []
            for slot in self._new_slots(count - len(active)):
                with contextlib.suppress(OSError):  # logged; the slot retries later
                    workers.append(self._start(slot))
            for worker in workers:
                await _first(worker.ready_event, worker.exited_event)
        elif count < len(active):
            log.info("scaling down to %s", plural(count, "worker"))
            by_age = sorted(active, key=lambda s: s.worker.started_at if s.worker else math.inf)
            leaving = by_age[: len(active) - count]
            for slot in leaving:
                slot.active = False
            async with trio.open_nursery() as nursery:
                for slot in leaving:
                    if slot.worker is not None:
                        nursery.start_soon(self._disconnect, slot.worker, "scale down")
            self._slots = [slot for slot in self._slots if slot.active]
        self._notify("scaled")

    async def reload(self) -> None:
        """Rolling reload: per slot, start a replacement, wait until it is ready, then
        disconnect the old worker. One extra worker at a time; capacity never drops. If a
        replacement fails to boot, stop and raise ReloadError; old workers keep serving."""
        async with self._rolling:
            if self._stopping:
                return
            self._notify("reloading")
            log.info("reloading %s", plural(self.size, "worker"))
            began = time.monotonic()
            try:
                for slot in list(self._slots):
                    async with slot.lock:  # after a recycle of this slot, if one runs
                        fresh = slot.worker is not None and slot.worker.started_at > began
                        if slot.active and not self._stopping and not fresh:
                            await self._replace(slot, "reload")
            except ReloadError:
                self.reloads_failed += 1
                raise
            finally:
                if not self._stopping:
                    self._notify("ready")
            self.reloads += 1
            log.info("reload complete")

    def totals(self) -> dict[str, Any]:
        """Counters of the whole herd, exited workers included (metrics, status)."""
        totals = _ipc.total_stats([self._exited_totals, *(w.stats for w in self._workers)])
        totals["connections"] = sum(w.open_connections for w in self._workers)
        return totals

    # -- the run ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Herd] = trio.TASK_STATUS_IGNORED) -> None:
        """Boot the workers, hand the herd to ``task_status`` once every slot has a ready
        worker, and supervise until stopped. Raises WorkerBootError if workers keep dying
        before they become ready, StoppedBeforeReady if a stop came first."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._recycler.run, lambda: self._workers)
                await self._boot()
                if not self._stopping:
                    await nursery.start(self.handoff.run)
                    self._notify("ready")
                    task_status.started(self)
                    self.started = True
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._kill_all()
        if self._fatal is not None:
            raise self._fatal
        if not self.started:
            stopped = StoppedBeforeReady("the herd was stopped before every worker was ready")
            stopped.forced = self.forced
            raise stopped

    async def _kill_all(self) -> None:
        """The herd's end: no worker outlives it, no subscriber waits on it."""
        for worker in list(self._workers):
            worker.kill(signal.SIGKILL, "shutdown")
        for worker in list(self._workers):
            with trio.move_on_after(5):
                await worker.wait()
        self.handoff.close()
        self.hub.close()

    @property
    def _tasks(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("the herd is not running")
        return self._nursery

    async def _boot(self) -> None:
        for slot in self._new_slots(self.config.workers):
            with contextlib.suppress(OSError):  # logged; the slot retries later
                self._start(slot)
        # ready when every slot has a ready worker, or the herd gave up
        while not self._stopping:
            if all(
                slot.worker is not None and slot.worker.state is WorkerState.READY
                for slot in self._slots
            ):
                return
            with trio.move_on_after(BOOT_POLL):
                await self._progress.wait()
            self._progress = trio.Event()

    def _new_slots(self, count: int) -> list[Slot]:
        new = [Slot(index) for index in free_indexes([s.index for s in self._slots], count)]
        self._slots.extend(new)
        return new

    # -- spawning and supervision -----------------------------------------------------

    def _start(self, slot: Slot) -> WorkerProcess:
        """Spawn a worker for an empty slot; on OSError (out of fds or memory) the slot
        retries later, and the error is raised."""
        try:
            return self._spawn(slot)
        except OSError as exc:
            log.error("could not start a worker for slot %d: %s", slot.index, exc)
            slot.failures += 1
            delay = max(0.5, backoff_delay(slot.failures, self.config.backoff_max))
            self._tasks.start_soon(self._respawn, slot, delay)
            raise

    def _spawn(self, slot: Slot, *, replacing: bool = False) -> WorkerProcess:
        worker_id = self._next_id
        self._next_id += 1
        listeners, keys = self.handoff.listeners, self._ticket_keys
        worker = spawn(worker_id, slot, self.config, listeners, self._env, keys)
        self._workers.append(worker)
        if not replacing:
            slot.worker = worker
        slot.backoff_until = None
        self._publish("online", worker)
        log.debug("spawned worker %d (pid %d) in slot %d", worker.id, worker.pid, slot.index)
        self._tasks.start_soon(self._supervise, worker)
        return worker

    async def _supervise(self, worker: WorkerProcess) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_channel, worker)
                nursery.start_soon(
                    worker.watchdog, self.config.boot_timeout, self.config.worker_timeout
                )
                await worker.wait()
                nursery.cancel_scope.cancel()
            worker.drain_channel(partial(self._handle_message, worker))
        finally:
            with trio.CancelScope(shield=True):
                if worker.alive:  # the herd itself is being cancelled
                    worker.kill(signal.SIGKILL, "shutdown")
                    await worker.wait()
                worker.channel.close()
                self._on_exit(worker)

    async def _read_channel(self, worker: WorkerProcess) -> None:
        try:
            await worker.read_channel(partial(self._handle_message, worker))
        except IPCProtocolError as exc:
            self._protocol_error(worker, exc)

    def _handle_message(
        self, worker: WorkerProcess, message: dict[str, Any], fds: list[int]
    ) -> None:
        kind = message["t"]
        if kind == "beat":
            worker.stats = message["stats"]
            self.handoff.heard_from(worker)
            self._recycler.check(worker)
        elif kind == "msg":
            self._publish("message", worker, data=message["data"])
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
                self._publish("disconnect", worker)
                self._tasks.start_soon(worker.tell_disconnect, self.config.graceful_timeout)
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
        self._recycler.recycle(worker, "protocol error")

    def _on_ready(self, worker: WorkerProcess) -> None:
        if worker.ready_at is not None:
            return
        worker.ready_at = trio.current_time()
        if worker.state is WorkerState.STARTING:  # not if a stop or scale-down already reached it
            worker.state = WorkerState.READY
        self._boot_failures = 0
        if worker.state is WorkerState.READY and not self._stopping and worker.slot.active:
            self.handoff.admit(worker)
        self._progress.set()
        worker.ready_event.set()
        self._publish("ready", worker)
        _log_ready(worker, self.started)

    def _on_exit(self, worker: WorkerProcess) -> None:
        worker.record_exit()
        self.handoff.gone(worker)
        if worker in self._workers:
            self._workers.remove(worker)
        self._exited_totals = _ipc.total_stats([self._exited_totals, worker.stats])
        worker.exited_event.set()
        worker.ready_event.set()  # nobody waits forever on a worker that is gone
        self._progress.set()
        self._publish("exit", worker)
        _log_exit(worker, self.started)
        slot = worker.slot
        if slot.worker is not worker:
            return  # a replacement that never took over, or a replaced worker
        slot.worker = None
        wanted = not (
            worker.requested_disconnect
            or self._stopping
            or not slot.active
            or self._tasks.cancel_scope.cancel_called
        )
        others = sum(1 for w in self._workers if w.state is WorkerState.READY)
        facts = worker.exit_facts(wanted, self._boot_failures, others)
        decision = after_exit(facts, self.config)
        self._boot_failures = decision.boot_failures
        if not facts.was_ready and (decision.penalised or decision.action == "give-up"):
            self._last_boot_error = worker.boot_error or f"worker {worker.id} {worker.died_how()}"
        if decision.action == "give-up":
            self._give_up()
        elif decision.action == "respawn":
            assert decision.cause is not None
            self._count_respawn(decision.cause)
            slot.failures = decision.slot_failures
            if decision.penalised:
                slot.restarts += 1
            self._tasks.start_soon(self._respawn, slot, decision.delay)

    def _give_up(self) -> None:
        log.critical(
            "%s in a row died before they became ready; giving up",
            plural(self._boot_failures, "worker"),
        )
        self._fatal = WorkerBootError(self._last_boot_error)
        self._tasks.start_soon(self.stop)

    async def _respawn(self, slot: Slot, delay: float) -> None:
        slot.backoff_until = trio.current_time() + delay
        log.info("respawning slot %d in %.1fs", slot.index, delay)
        await trio.sleep(delay)
        slot.backoff_until = None
        if slot.active and not self._stopping and slot.worker is None:
            with contextlib.suppress(OSError):  # logged; the slot retries later
                self._start(slot)

    def _count_respawn(self, cause: str) -> None:
        self.respawns[cause] = self.respawns.get(cause, 0) + 1

    # -- replacement: reload, recycling -----------------------------------------------

    async def _replace(self, slot: Slot, reason: str, wait: bool = True) -> bool:
        """Start a worker for ``slot``, wait until it is ready, then disconnect the old one
        (and wait until it exited, if ``wait``). True if the replacement took over; False
        if a stop or scale-down made it moot. Raises ReloadError if it could not start or
        become ready."""
        try:
            new = self._spawn(slot, replacing=True)
        except OSError as exc:
            log.error("%s of slot %d failed: cannot start a worker: %s", reason, slot.index, exc)
            raise ReloadError(f"cannot start a worker: {exc}") from None
        with trio.move_on_after(self.config.boot_timeout) as waited:
            await _first(new.ready_event, new.exited_event)
        if self._stopping or not slot.active:
            # a stop or a scale-down came meanwhile: the replacement is not wanted
            if new.state is not WorkerState.EXITED:
                await self._disconnect(new, reason)
            return False
        if new.state is not WorkerState.READY:
            if new.exited_event.is_set():
                text = new.boot_error or f"replacement worker exited: {new.describe_exit()}"
            else:
                if waited.cancelled_caught:
                    new.kill(signal.SIGKILL, "not ready in time")
                text = f"replacement worker {new.id} was not ready in time"
            log.error(
                "%s of slot %d failed; old workers keep serving:\n%s", reason, slot.index, text
            )
            raise ReloadError(text)
        previous = slot.worker
        slot.worker = new
        slot.failures = 0
        if previous is not None and previous.state is not WorkerState.EXITED:
            if wait:
                await self._disconnect(previous, reason)
            else:
                self._tasks.start_soon(self._disconnect, previous, reason)
        return True

    async def _disconnect(self, worker: WorkerProcess, reason: str) -> None:
        """Graceful disconnect: no more connections, finish in-flight work within
        graceful_timeout; SIGTERM past it plus a margin, then SIGKILL."""
        if worker.state is WorkerState.EXITED:
            return
        worker.requested_disconnect = True  # even if it was already draining on its own
        tell = worker.state is not WorkerState.DISCONNECTING
        if tell:
            worker.state = WorkerState.DISCONNECTING
            self.handoff.finish(worker)
            self._publish("disconnect", worker)
            log.debug("disconnecting worker %d (pid %d): %s", worker.id, worker.pid, reason)
        await worker.disconnect(self.config.graceful_timeout, tell)

    # -- events ------------------------------------------------------------------------

    def _publish(self, kind: str, worker: WorkerProcess, data: Any = None) -> None:
        self.hub.publish(worker.event(kind, data))

    def _notify(self, state: str) -> None:
        if self.on_state_change is not None:
            self.on_state_change(state)


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


async def _first(*events: trio.Event) -> None:
    """Wait until any of the events is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)
