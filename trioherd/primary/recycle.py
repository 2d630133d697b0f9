"""Recycling: replacing workers that served their ``--max-requests`` or grew past
``--max-memory``, the rolling way, without the herd losing capacity or a request.

A worker's successor is started at three quarters of its request limit, so it is usually
ready when the limit comes. At the limit (or past the memory limit) the worker gets no new
connection, and answers what it has with ``Connection: close``; if no other worker can
take connections then, they wait in the kernel's backlog until a successor is ready (as
with gunicorn). A successor that cannot boot gives the old worker its connections back.
Each slot is replaced under its own lock, so recycles of different slots overlap.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

from .._config import Config
from .._errors import ReloadError
from .handoff import Handoff
from .process import Slot, WorkerProcess, WorkerState

log = logging.getLogger("trioherd.primary")

MEMORY_SAMPLE = 0.1
"""Seconds between two reads of every worker's RSS when --max-memory is set."""


class Recycler:
    def __init__(
        self,
        config: Config,
        handoff: Handoff,
        replace: Callable[[Slot, str], Awaitable[bool]],
        replaced: Callable[[str], None],
    ) -> None:
        self.config = config
        self.stopping = False
        self._handoff = handoff
        self._replace = replace
        self._replaced = replaced
        self._nursery: trio.Nursery | None = None

    async def run(
        self,
        workers: Callable[[], list[WorkerProcess]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Host the recycle tasks; with --max-memory, read every worker's RSS often, so
        that a fast leak overshoots the limit by little (a heartbeat comes once a second)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while self.config.max_memory:
                await trio.sleep(MEMORY_SAMPLE)
                for worker in workers():
                    self.check(worker)
            await trio.sleep_forever()

    def check(self, worker: WorkerProcess) -> None:
        """Start replacing ``worker`` near its max-requests (or past max-memory); at its
        limit it gets no new connection."""
        if self.stopping:
            return
        max_memory = self.config.max_memory
        rss = worker.rss() if max_memory else 0  # one read of /proc for both questions
        failed_lately = trio.current_time() < worker.recycle_after
        if worker.over_limit(rss, max_memory) and not failed_lately:
            self._handoff.withdraw(worker)  # (after a failed successor: it serves on)
        reason = worker.recycle_reason(rss, max_memory)
        if reason is not None and not worker.slot.lock.locked():
            self.recycle(worker, reason)

    def recycle(self, worker: WorkerProcess, reason: str) -> None:
        if worker.recycling or self._nursery is None:
            return
        worker.recycling = reason
        self._nursery.start_soon(self._recycle, worker, reason)

    async def _recycle(self, worker: WorkerProcess, reason: str) -> None:
        async with worker.slot.lock:
            if (
                worker.state is WorkerState.EXITED
                or self.stopping
                or worker.slot.worker is not worker
            ):
                return
            log.info("recycling worker %d (pid %d): %s", worker.id, worker.pid, reason)
            try:
                if await self._replace(worker.slot, reason):
                    self._replaced(reason)
            except ReloadError:
                if reason == "protocol error":
                    worker.kill(signal.SIGKILL)
                    return
                worker.recycling = None
                worker.recycle_after = trio.current_time() + max(1.0, self.config.backoff_max)
                if (
                    worker.state is WorkerState.READY
                ):  # better over its limit than no worker at all
                    self._handoff.admit(worker)
