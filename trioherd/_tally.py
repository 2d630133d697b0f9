"""A worker's connection counters in memory the primary shares: no message per batch.

Three counters, written by the worker only and read by the primary whenever it needs
them:

- ``taken``: the sequence number of the last connection batch the worker took. The worker
  writes it before it reads a byte of those connections; the primary closes its copies of
  every batch up to it (``Handoff``), and after the worker exits, every batch past it goes
  to another worker. This was the ``ack`` message.
- ``opened`` and ``closed``: connections the worker started and ended, so the primary knows
  each worker's open connections at once (backpressure, ``least-busy``, metrics). This
  replaces the ``closed`` reports.

Why memory and not messages: under a new connection per request, every ``ack`` and
``closed`` packet woke the primary, which then preempted the worker on its CPU, and the
worker paid for the send: a large share of both (docs/performance.md, "Figures behind the
code"). A store into a shared page costs neither.

Ordering: the worker stores ``taken`` before the system call that first reads a taken
connection, and the primary trusts a batch as taken only from a value it read; it moves a
batch the worker received but did not mark only after the worker has exited, when every
store of the worker is visible (the exit is seen through the kernel). Each counter is one
aligned 64-bit word, read and written whole.
"""

from __future__ import annotations

import mmap
import os

_TAKEN, _OPENED, _CLOSED = range(3)


class Tally:
    """The counters of one worker, mapped from a memfd the primary creates."""

    def __init__(self, fd: int) -> None:
        """Map the counters in ``fd`` (shared with the other process). ``fd`` stays the
        caller's; the mapping keeps a copy of it (Python's mmap does) until :meth:`close`."""
        self._map: mmap.mmap | None = mmap.mmap(fd, mmap.PAGESIZE)
        self._words = memoryview(self._map).cast("Q")
        self._final = (0, 0, 0)

    @classmethod
    def create(cls) -> tuple[Tally, int]:
        """A new, zeroed tally and the fd to pass to its worker (close-on-exec; the caller
        closes it once passed)."""
        fd = os.memfd_create("trioherd-tally", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, mmap.PAGESIZE)
            return cls(fd), fd
        except BaseException:
            os.close(fd)
            raise

    def _read(self, index: int) -> int:
        if self._map is None:
            return self._final[index]
        return self._words[index]

    @property
    def taken(self) -> int:
        return self._read(_TAKEN)

    @taken.setter
    def taken(self, seq: int) -> None:
        self._words[_TAKEN] = seq

    @property
    def opened(self) -> int:
        return self._read(_OPENED)

    @property
    def closed(self) -> int:
        return self._read(_CLOSED)

    @property
    def open(self) -> int:
        """Connections opened and not closed yet."""
        return self._read(_OPENED) - self._read(_CLOSED)

    def count_open(self) -> None:
        self._words[_OPENED] += 1

    def count_close(self) -> None:
        self._words[_CLOSED] += 1

    def close(self) -> None:
        """Unmap; the counters keep their last values for readers."""
        if self._map is not None:
            self._final = (self._words[_TAKEN], self._words[_OPENED], self._words[_CLOSED])
            self._words.release()
            self._map.close()
            self._map = None
