"""The primary's CPU scheduling: it gives way to busy workers (``--batch-primary``).

While the primary dispatches connections (every policy but ``shared``), the thread that
runs its Trio loop is put under Linux's ``SCHED_BATCH``: same CPU share, but its wake-ups
do not preempt a running process. A connection that arrives while every CPU runs a worker
is then accepted when one of them is done with what it has (or at the next tick), with
the others that came meanwhile, instead of pushing a worker off its CPU for one accept
and one pass each. On an idle CPU it runs at once, as before. The measurements are in
docs/performance.md.

Only a thread under the default ``SCHED_OTHER`` is switched (a policy the user chose is
left alone), and its policy is restored when the hand-off stops. Workers are started
under the policy the primary had before: they serve requests and must preempt as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

log = logging.getLogger("trioherd.primary")


class _State(threading.local):
    switched = False
    """This thread was put under SCHED_BATCH by :func:`batched` (a policy is a thread's)."""


_state = _State()


def _set_policy(policy: int) -> bool:
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:  # a sandbox that forbids it: run as we are
        log.debug("could not change the primary's scheduling policy: %s", exc)
        return False
    return True


@contextlib.contextmanager
def batched(on: bool) -> Iterator[None]:
    """Run the body with the calling thread under SCHED_BATCH, if ``on``, the platform
    has it and the thread runs under SCHED_OTHER now; restore SCHED_OTHER after."""
    batch = getattr(os, "SCHED_BATCH", None)
    if not on or batch is None or _state.switched or os.sched_getscheduler(0) != os.SCHED_OTHER:
        yield
        return
    _state.switched = _set_policy(batch)
    try:
        yield
    finally:
        if _state.switched:
            _state.switched = False
            _set_policy(os.SCHED_OTHER)


@contextlib.contextmanager
def unbatched() -> Iterator[None]:
    """Processes started in the body run under SCHED_OTHER, not the primary's SCHED_BATCH
    (a child inherits its parent thread's policy)."""
    if not _state.switched:
        yield
        return
    _set_policy(os.SCHED_OTHER)
    try:
        yield
    finally:
        _set_policy(os.SCHED_BATCH)
