"""A worker forked by a mold (``--preload``), as the primary holds it: through a pidfd.

Such a worker is the mold's child, not the primary's, so the primary cannot ``waitpid``
it. The mold sends a pidfd of it with its pid, opened before anyone could reap the child,
so it names that process and no other even once the pid is reused: the primary signals
the worker with ``pidfd_send_signal`` and knows it has ended when the pidfd is readable.
How it ended (its exit code, or minus the signal that killed it) comes from the mold,
which reaps it (``exited``, read by ``primary.molds.Mold.run``).

:class:`ForkedProcess` answers what the herd asks of a ``subprocess.Popen`` (``pid``,
``returncode``, ``poll``, ``send_signal``), so a forked worker is supervised exactly like a
spawned one.
"""

from __future__ import annotations

import os
import signal

import trio

REPORT_WAIT = 2.0
"""Seconds the primary waits, once a forked worker has ended, for its mold to say how. A
mold that says nothing died itself, and its workers were killed with it (SIGKILL)."""


class ForkedProcess:
    """A process the primary did not start but holds a pidfd of."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._reported = trio.Event()
        self._ended = trio.Event()
        self._watched = False

    def poll(self) -> int | None:
        """The exit code (minus the signal) once the mold has told it; None until then."""
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal this very process (ProcessLookupError once it has been reaped)."""
        if self._pidfd < 0:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, signum)

    def report(self, code: int) -> None:
        """The mold reaped it: how it ended."""
        if self.returncode is None:
            self.returncode = code
        self._reported.set()

    def orphaned(self) -> None:
        """Its mold is gone without a word about it: it was killed with the mold."""
        self.report(-signal.SIGKILL)

    async def wait(self) -> int:
        """Wait until it has ended and the mold has said how; its exit code."""
        if self._watched:
            await self._ended.wait()
        else:
            self._watched = True
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
            except BaseException:
                self._watched = False  # a cancelled wait: the next one watches
                raise
            with trio.move_on_after(REPORT_WAIT):
                await self._reported.wait()
            self.orphaned()  # (no-op if the mold told)
            self.close()
            self._ended.set()
        assert self.returncode is not None
        return self.returncode

    def close(self) -> None:
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
