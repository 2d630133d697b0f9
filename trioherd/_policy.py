"""Sans-IO decisions of the primary: which worker gets a connection, when to respawn.

Nothing here touches a socket, a process or a clock: callers pass the facts in, so every
rule is tested synchronously.
"""

from __future__ import annotations

import random
from typing import Generic, Protocol, TypeVar

import attrs

from ._config import Config


class Loaded(Protocol):
    @property
    def open_connections(self) -> int: ...

    @property
    def unacknowledged(self) -> int: ...


W = TypeVar("W", bound=Loaded)


class Dispatcher(Generic[W]):
    """Chooses a ready worker for each accepted connection.

    ``round-robin``: the next worker in turn (Node's SCHED_RR). ``least-busy``: the worker
    with the fewest open connections, ties broken by turn. Either way a worker holding
    ``limit`` open connections, or ``window`` connections it has not acknowledged yet, is
    skipped; :meth:`pick` returns None when all are full, and the caller stops accepting
    until one has room.
    """

    def __init__(self, policy: str, limit: int, window: int) -> None:
        self.policy = policy
        self.limit = limit
        self.window = window
        self._workers: list[W] = []
        self._turn = 0

    def __contains__(self, worker: object) -> bool:
        return worker in self._workers

    def add(self, worker: W) -> None:
        if worker not in self._workers:
            self._workers.append(worker)

    def remove(self, worker: W) -> None:
        try:
            index = self._workers.index(worker)
        except ValueError:
            return
        del self._workers[index]
        if index < self._turn:
            self._turn -= 1
        if self._turn >= len(self._workers):
            self._turn = 0

    def has_room(self) -> bool:
        limit, window = self.limit, self.window
        return any(w.open_connections < limit and w.unacknowledged < window for w in self._workers)

    def pick(self) -> W | None:
        workers = self._workers
        count = len(workers)
        if not count:
            return None
        limit, window = self.limit, self.window
        start = self._turn % count
        chosen = -1
        if self.policy == "least-busy":
            best = limit
            for step in range(count):
                index = (start + step) % count
                worker = workers[index]
                load = worker.open_connections
                if load < best and worker.unacknowledged < window:
                    best = load
                    chosen = index
        else:
            for step in range(count):
                index = (start + step) % count
                worker = workers[index]
                if worker.open_connections < limit and worker.unacknowledged < window:
                    chosen = index
                    break
        if chosen < 0:
            return None
        self._turn = (chosen + 1) % count
        return workers[chosen]


def backoff_delay(consecutive_failures: int, cap: float, base: float = 0.1) -> float:
    """Delay before respawning a slot whose worker died ``consecutive_failures`` times in a row.

    0.1 s, 0.2 s, 0.4 s, ... doubling, never more than ``cap``.
    """
    if consecutive_failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(consecutive_failures - 1, 30)))


def request_limit(max_requests: int, jitter: int, rng: random.Random | None = None) -> int:
    """Requests this worker may serve before it is recycled (0 = no limit)."""
    if max_requests <= 0:
        return 0
    return max_requests + (rng or random).randint(0, jitter) if jitter > 0 else max_requests


def free_indexes(used: list[int], count: int) -> list[int]:
    """The ``count`` lowest slot indexes not in ``used``."""
    taken = set(used)
    return [index for index in range(len(taken) + count) if index not in taken][:count]


def recycle_threshold(limit: int) -> int:
    """Requests after which a worker's successor is started: three quarters of its limit,
    so that the successor is usually ready when the worker reaches it."""
    return max(1, limit - limit // 4)


def should_recycle(requests: int, limit: int, rss_bytes: int, max_memory_mib: int) -> str | None:
    """The reason to start replacing a worker now, or None."""
    if limit and requests >= recycle_threshold(limit):
        return "max-requests"
    if max_memory_mib and rss_bytes > max_memory_mib * 1024 * 1024:
        return "max-memory"
    return None


READY_DEATH_BACKOFF_MAX = 1.0
"""Cap of the respawn back-off after the death of a worker that had become ready: such
deaths are not an app that cannot boot, and the herd must keep its capacity."""


@attrs.frozen
class ExitFacts:
    """What the primary knows when a worker process has exited."""

    successor_wanted: bool
    """The worker still held its slot, the slot is active, the herd is not stopping and
    nobody asked the worker to disconnect: the slot needs a new worker."""
    drained_itself: bool
    """The worker drained on its own (SIGTERM sent to it from outside)."""
    was_ready: bool
    uptime: float
    killed_for: str | None
    boot_failures: int
    """Workers in a row, herd-wide, that died before they were ready (before this one)."""
    slot_failures: int
    """Consecutive failures of this slot (before this one)."""
    others_ready: int = 1
    """Other workers of the herd that are ready and serving."""


@attrs.frozen
class ExitDecision:
    """What to do about a worker's exit: ``action`` is ``none``, ``respawn`` or
    ``give-up`` (the app cannot boot: stop the herd with the worker's error)."""

    action: str
    delay: float = 0.0
    cause: str | None = None
    """The respawn counter it adds to (crash, boot, timeout, signal, ...)."""
    boot_failures: int = 0
    slot_failures: int = 0
    penalised: bool = False
    """The slot's restart count goes up (a death, not a replacement)."""


def after_exit(facts: ExitFacts, config: Config) -> ExitDecision:
    """Decide what a worker's exit means for its slot (``min_uptime``, ``backoff_max``
    and ``max_boot_failures`` come from ``config``)."""
    if not facts.successor_wanted:
        return ExitDecision("none", boot_failures=facts.boot_failures)
    if facts.drained_itself:  # SIGTERM sent to the worker: replace it, no penalty
        return ExitDecision(
            "respawn",
            cause="signal",
            boot_failures=facts.boot_failures,
            slot_failures=facts.slot_failures,
        )
    boot_failures = facts.boot_failures
    if not facts.was_ready:
        boot_failures += 1
        if boot_failures >= config.max_boot_failures:
            return ExitDecision("give-up", boot_failures=boot_failures)
    failures = 0 if facts.uptime >= config.min_uptime else facts.slot_failures
    failures += 1
    if not facts.was_ready:  # the app may not boot at all: back off, up to backoff_max
        delay = backoff_delay(failures, config.backoff_max)
    elif facts.others_ready:  # it served, then died (killed from outside, or a crash)
        delay = backoff_delay(failures, min(config.backoff_max, READY_DEATH_BACKOFF_MAX))
    else:  # and no other worker serves: never leave the herd empty
        delay = 0.0
    return ExitDecision(
        "respawn",
        delay=delay,
        cause=facts.killed_for or ("crash" if facts.was_ready else "boot"),
        boot_failures=boot_failures,
        slot_failures=failures,
        penalised=True,
    )
