"""The herd: the running whole a program holds, and the changes asked of it.

:class:`Herd` is what ``await nursery.start(trioherd.serve, config)`` returns: its workers
and events, and the changes a person or a program asks for: a graceful stop, scaling, a
rolling reload (and, through the recycler, the replacement of one worker). Its workers'
processes are supervised by ``primary.supervisor`` (spawning, what their messages mean,
respawns after a death); accepted connections reach them through the hand-off
(``primary.handoff``), started once every slot has a ready worker.

Task layout (all in the herd's own nursery, opened by :meth:`Herd.run`): one supervising
task per worker process, the hand-off's accept loops, respawn tasks sleeping through a
slot's back-off, and recycle tasks.

Replacement (reload, recycle) goes one slot at a time under one lock: start the new
worker, wait until it is ready, then disconnect the old one, so capacity never drops.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import trio

from .. import _ipc
from .._config import Config
from .._errors import ReloadError, StoppedBeforeReady, WorkerBootError
from .._log import plural
from .events import EventHub, HerdEvent
from .handoff import Handoff
from .molds import MoldProcess
from .process import Slot, WorkerProcess, WorkerState, first_of
from .supervisor import Supervisor
from .switch import Switch

log = logging.getLogger("trioherd.primary")


class Herd:
    """A running herd. Get one from ``await nursery.start(trioherd.serve, config)``."""

    def __init__(self, config: Config, handoff: Handoff) -> None:
        self.config = config
        self.handoff = handoff
        self.addresses: list[str] = [listener.url for listener in handoff.listeners]
        self.pid = os.getpid()
        self.reloads = 0  # rolling reloads that succeeded
        self.reloads_failed = 0
        self.forced = False
        self.metrics_url: str | None = None
        self.on_state_change: Callable[[str], None] | None = None
        self.hub = EventHub()  # its events: subscribe (as events() does) or observe
        replace = partial(self._replace, wait=False)  # a slot may recycle again at once
        give_up = partial(self._stop, drain_delay=0.0)  # what boots never reaches a balancer
        self.supervisor = Supervisor(config, handoff, self.hub, replace, give_up)
        self.generations = self.supervisor.generations
        self.generations.lost = self._mold_lost
        self.switch = Switch(self.supervisor, handoff, self._disconnect)
        self._booting = trio.CancelScope()  # the first import (--preload): a stop cancels it
        self._stop_asked = False
        self._stopped = trio.Event()
        self._rolling = trio.Lock()

    # -- public API --------------------------------------------------------------------

    @property
    def workers(self) -> list[WorkerProcess]:
        """Live workers, by slot."""
        return sorted(self.supervisor.workers, key=lambda w: (w.slot.index, w.id))

    @property
    def slots(self) -> list[Slot]:
        """The herd's slots (a copy of the list)."""
        return list(self.supervisor.slots)

    @property
    def size(self) -> int:
        """How many worker slots the herd keeps."""
        return sum(1 for slot in self.supervisor.slots if slot.active)

    @property
    def stopping(self) -> bool:
        """A stop was asked for: ``/readyz`` answers 503, and the herd takes no reload or
        scale (its listeners may still serve, through ``--drain-delay``)."""
        return self._stop_asked

    @property
    def started(self) -> bool:
        """Every slot had a ready worker once: the herd was handed out."""
        return self.supervisor.started

    @property
    def respawns(self) -> dict[str, int]:
        """Workers replaced after an exit nobody asked for, or recycled, by cause."""
        return self.supervisor.respawns

    @property
    def generation(self) -> int:
        """The generation of the code the herd runs: 1 from its boot, one more for each
        reload (with --preload, each is one import of the app, in a mold)."""
        return self.generations.current

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
        """Graceful stop: ``stopping`` at once (``/readyz`` answers 503), then, after
        ``--drain-delay`` seconds in which the listeners accept and the workers serve as
        before, stop accepting, disconnect every worker in parallel, and wait."""
        delay = self.config.drain_delay if self.started else 0.0  # nobody sent traffic yet
        await self._stop(drain_delay=delay)

    async def _stop(self, drain_delay: float) -> None:
        if self._stop_asked:
            await self._stopped.wait()
            return
        self._stop_asked = True
        self._booting.cancel()
        self._notify("stopping")
        if drain_delay > 0:
            log.info(
                "stopping: /readyz answers 503; serving on for %gs (--drain-delay), then "
                "closing the listeners",
                drain_delay,
            )
            with trio.move_on_after(drain_delay):
                await self._stopped.wait()  # a stop at once ends the delay
            if self._stopped.is_set():
                return
        self.supervisor.stopping = self.supervisor.recycler.stopping = True
        workers = self.supervisor.workers
        log.info("stopping: disconnecting %s", plural(len(workers), "worker"))
        self.handoff.close()
        for slot in self.supervisor.slots:
            slot.active = False
        async with trio.open_nursery() as nursery:
            for worker in list(workers):
                nursery.start_soon(self._disconnect, worker, "stop")
        self._stopped.set()

    def force_stop(self) -> None:
        """Stop at once: kill every worker."""
        self.forced = self._stop_asked = True
        self.supervisor.stopping = self.supervisor.recycler.stopping = True
        for worker in self.supervisor.workers:
            worker.kill(signal.SIGKILL, "stop at once")
        self._stopped.set()

    async def scale(self, count: int) -> None:
        """Keep ``count`` workers: spawn and wait for the new ones, or disconnect the oldest."""
        if count < 1:
            raise ValueError("a herd needs at least one worker")
        if self.stopping:
            return
        active = [slot for slot in self.supervisor.slots if slot.active]
        if count > len(active):
            log.info("scaling up to %s", plural(count, "worker"))
            workers = []
            for slot in self.supervisor.new_slots(count - len(active)):
                with contextlib.suppress(OSError):  # logged; the slot retries later
                    workers.append(self.supervisor.start(slot))
            for worker in workers:
                await first_of(worker.ready_event, worker.exited_event)
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
            self.supervisor.slots = [slot for slot in self.supervisor.slots if slot.active]
        self._notify("scaled")

    async def reload(self) -> None:
        """Reload: a new generation of the code (with --preload, a mold imports the files
        on disk now), then every worker replaced by one of it, the new ones all started at
        once (``primary.switch``). Capacity never drops, and the herd never runs two
        generations after it: if the code cannot be imported, or a new worker cannot
        become ready, nothing changes and ReloadError says why."""
        async with self._rolling:
            if self.stopping:
                return
            self._notify("reloading")
            log.info("reloading %s", plural(self.size, "worker"))
            try:
                if await self._reload():
                    self.reloads += 1
                    log.info("reload complete")
            except ReloadError:
                self.reloads_failed += 1
                raise
            finally:
                if not self.stopping:
                    self._notify("ready")

    async def _reload(self) -> bool:
        try:
            generation = await self.generations.make()
        except WorkerBootError as exc:
            if self.stopping:
                return False
            log.error(
                "reload failed: the app could not be imported; generation %d serves on:\n%s",
                self.generation,
                exc.text.rstrip(),
            )
            raise ReloadError(exc.text) from None
        return await self.switch.to(generation)

    def totals(self) -> dict[str, Any]:
        """Counters of the whole herd, exited workers included (metrics, status)."""
        return self.supervisor.totals()

    # -- the run ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Herd] = trio.TASK_STATUS_IGNORED) -> None:
        """Boot the workers, hand the herd to ``task_status`` once every slot has a ready
        worker, and supervise until stopped. Raises WorkerBootError if workers keep dying
        before they become ready, StoppedBeforeReady if a stop came first."""
        supervisor = self.supervisor
        try:
            # the molds' news is read outside the herd's nursery: how its workers ended
            # still comes while they are killed at the end
            async with trio.open_nursery() as molds:
                self.generations.nursery = molds
                try:
                    async with trio.open_nursery() as nursery:
                        supervisor.nursery = nursery
                        await nursery.start(supervisor.recycler.run, lambda: supervisor.workers)
                        if await self._first_generation():
                            await supervisor.boot(self.config.workers)
                        if not self.stopping:
                            await nursery.start(self.handoff.run)
                            self._notify("ready")
                            task_status.started(self)
                            supervisor.started = True
                        await self._stopped.wait()
                        nursery.cancel_scope.cancel()
                finally:
                    with trio.CancelScope(shield=True):
                        await supervisor.kill_all()
        finally:
            self.handoff.close()
            self.hub.close()  # no subscriber waits on a herd that is gone
        if supervisor.fatal is not None:
            raise supervisor.fatal
        if not self.started:
            stopped = StoppedBeforeReady("the herd was stopped before every worker was ready")
            stopped.forced = self.forced
            raise stopped

    # -- generations --------------------------------------------------------------------

    async def _first_generation(self) -> bool:
        """Generation 1 (with --preload, the mold's import of the app). False if a stop
        came, or if the app cannot be imported: then the herd gives up (exit 3)."""
        failure = None
        with self._booting:
            try:
                self.generations.adopt(await self.generations.make())
                return True
            except WorkerBootError as exc:
                failure = exc
        if failure is not None and not self.stopping:
            self.supervisor.fatal = failure
            await self._stop(drain_delay=0.0)
        return False

    def _mold_lost(self, mold: MoldProcess) -> None:
        if mold.generation == self.generations.current and not self.stopping:
            self.supervisor.tasks.start_soon(self._remold)

    async def _remold(self) -> None:
        """The current mold died, and its workers with it: a new generation from the files
        on disk fills the slots again. If the app cannot be imported any more, the herd
        gives up (exit 3): it has no worker left, and no way to make one."""
        async with self._rolling:
            if self.stopping:
                return
            try:
                generation = await self.generations.make()
            except WorkerBootError as exc:
                if not self.stopping:
                    log.critical("a new mold could not import the app; giving up")
                    self.supervisor.fatal = exc
                    await self._stop(drain_delay=0.0)
                return
            self.generations.adopt(generation)
            with contextlib.suppress(ReloadError):  # logged; respawns go on trying
                await self.switch.to(generation)

    # -- replacement: reload, recycling -----------------------------------------------

    async def _replace(self, slot: Slot, reason: str, wait: bool = True) -> bool:
        """Start a worker for ``slot``, wait until it is ready, then disconnect the old one
        (and wait until it exited, if ``wait``). True if the replacement took over; False
        if a stop or scale-down made it moot. Raises ReloadError if it could not start or
        become ready."""
        try:
            new = self.supervisor.spawn(slot, replacing=True)
        except OSError as exc:
            log.error("%s of slot %d failed: cannot start a worker: %s", reason, slot.index, exc)
            raise ReloadError(f"cannot start a worker: {exc}") from None
        with trio.move_on_after(self.config.boot_timeout) as waited:
            await first_of(new.ready_event, new.exited_event)
        if self.supervisor.stopping or not slot.active:
            # a stop (past its drain delay) or a scale-down came meanwhile: the replacement
            # is not wanted
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
                self.supervisor.tasks.start_soon(self._disconnect, previous, reason)
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
            self.supervisor.publish("disconnect", worker)
            log.debug("disconnecting worker %d (pid %d): %s", worker.id, worker.pid, reason)
        await worker.disconnect(self.config.graceful_timeout, tell)

    def _notify(self, state: str) -> None:
        if self.on_state_change is not None:
            self.on_state_change(state)
