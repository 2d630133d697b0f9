"""A reload's switch: the whole herd onto a new generation of the code, or nothing changes.

:meth:`Switch.to` starts a worker of the new generation for every active slot at once,
each under its slot's lock (a recycle of a slot runs before or after, never across). As
soon as the first of them is ready, the workers of the past generation get no new
connection (``Generations.floor``, ``Handoff.withdraw``): they serve what they have, and
new clients go to the new generation only, never to a worker that is about to be retired.
When every new worker is ready, each takes its slot over and the old workers are
disconnected, all in parallel, and the switch waits until they have exited.

If one of the new workers cannot start, dies before it is ready, or is not ready within
``boot_timeout``, nothing changes: the new ones are disconnected, the old ones get
connections again, and ``ReloadError`` says why. So after any reload the herd runs one
generation, with or without ``--preload``. The price is the memory of a second herd while
the new one boots (with ``--preload``, mostly shared between the new workers).

A slot that got a worker of the past generation while the switch ran (a scale-up, or a
respawn that finished before the take-over) is switched in a second pass.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import trio

from .._errors import ReloadError
from .handoff import Handoff
from .process import Slot, WorkerProcess, WorkerState, first_of
from .supervisor import Supervisor

log = logging.getLogger("trioherd.primary")

PASSES = 3
"""Passes at most: the first switches every slot, the others what scaled up meanwhile."""


class Switch:
    def __init__(
        self,
        supervisor: Supervisor,
        handoff: Handoff,
        disconnect: Callable[[WorkerProcess, str], Awaitable[None]],
    ) -> None:
        self.supervisor = supervisor
        self.handoff = handoff
        self.disconnect = disconnect
        self._withdrawn: list[WorkerProcess] = []  # of the past generation, by this pass

    async def to(self, generation: int) -> bool:
        """Every active slot onto ``generation``: True once done, False if a stop made it
        moot; ReloadError (nothing changed) if a new worker could not become ready."""
        for _ in range(PASSES):
            slots = [slot for slot in self.supervisor.slots if self._stale(slot, generation)]
            if not slots:
                break
            if not await self._pass(generation, slots):
                return False
        return True

    @staticmethod
    def _stale(slot: Slot, generation: int) -> bool:
        return slot.active and (slot.worker is None or slot.worker.generation != generation)

    async def _pass(self, generation: int, slots: list[Slot]) -> bool:
        async with contextlib.AsyncExitStack() as held:
            for slot in slots:  # in order: a recycle holds one lock at most
                await held.enter_async_context(slot.lock)
            new = self._start(generation, slots)
            failure = await self._wait_ready(new, generation)
            if self.supervisor.stopping:
                self.supervisor.generations.abandon(generation)
                self._withdrawn = []
                self._let_go(list(new.values()))
                return False
            if failure is not None:
                self._abort(new, generation, *failure)
            self.supervisor.generations.adopt(generation)
            self._withdrawn = []
            await self._take_over(new)
        return True

    def _start(self, generation: int, slots: list[Slot]) -> dict[Slot, WorkerProcess]:
        new: dict[Slot, WorkerProcess] = {}
        for slot in slots:
            try:
                new[slot] = self.supervisor.spawn(slot, replacing=True, generation=generation)
            except OSError as exc:
                text = f"cannot start a worker: {exc}"
                self._abort(new, generation, slot, text)
        return new

    async def _wait_ready(
        self, new: dict[Slot, WorkerProcess], generation: int
    ) -> tuple[Slot, str] | None:
        """Wait until every new worker is ready or dead; the first slot whose worker
        failed, and why, or None. The past generation gets no new connection from the
        first ready on."""
        failures: list[tuple[Slot, str]] = []
        with trio.move_on_after(self.supervisor.config.boot_timeout):
            async with trio.open_nursery() as nursery:
                for slot, worker in new.items():
                    nursery.start_soon(self._watch, slot, worker, generation, failures)
        for slot, worker in new.items():
            if worker.state is WorkerState.EXITED:  # ready, then dead before the take-over
                failures.append((slot, f"replacement worker exited: {worker.describe_exit()}"))
            elif worker.state is WorkerState.STARTING and not failures:
                worker.kill(signal.SIGKILL, "not ready in time")
                failures.append((slot, f"replacement worker {worker.id} was not ready in time"))
        return min(failures, key=lambda failure: failure[0].index) if failures else None

    async def _watch(
        self,
        slot: Slot,
        worker: WorkerProcess,
        generation: int,
        failures: list[tuple[Slot, str]],
    ) -> None:
        await first_of(worker.ready_event, worker.exited_event)
        if worker.ready_at is None:
            text = worker.boot_error or f"replacement worker exited: {worker.describe_exit()}"
            failures.append((slot, text))
        elif self.supervisor.generations.floor < generation:
            self._retire_past(generation)

    def _retire_past(self, generation: int) -> None:
        """The first worker of ``generation`` is ready: the others get no new connection."""
        self.supervisor.generations.floor = generation
        for worker in self.supervisor.workers:
            if worker.generation < generation:
                self.handoff.withdraw(worker)
                self._withdrawn.append(worker)

    def _abort(
        self, new: dict[Slot, WorkerProcess], generation: int, slot: Slot, text: str
    ) -> None:
        log.error("reload of slot %d failed; old workers keep serving:\n%s", slot.index, text)
        generations = self.supervisor.generations
        generations.abandon(generation)
        withdrawn, self._withdrawn = self._withdrawn, []
        for worker in withdrawn:  # they get connections again
            if worker.state is WorkerState.READY and worker.slot.active:
                self.handoff.admit(worker)
        self._let_go(list(new.values()))
        generations.retire(self.supervisor.workers)
        raise ReloadError(text)

    def _let_go(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if worker.state is not WorkerState.EXITED:
                self.supervisor.tasks.start_soon(self.disconnect, worker, "reload")

    async def _take_over(self, new: dict[Slot, WorkerProcess]) -> None:
        old: list[WorkerProcess] = []
        for slot, worker in new.items():
            if not slot.active:  # scaled away meanwhile
                old.append(worker)
                continue
            previous, slot.worker = slot.worker, worker
            slot.failures = 0
            if previous is not None and previous.state is not WorkerState.EXITED:
                old.append(previous)
        async with trio.open_nursery() as nursery:
            for worker in old:
                nursery.start_soon(self.disconnect, worker, "reload")
