"""The tally: counters one process writes and another reads, through a shared memfd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from trioherd._tally import Tally


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_what_one_mapping_writes_another_reads_at_once() -> None:
    primary, fd = Tally.create()
    try:
        worker = Tally(fd)
    finally:
        os.close(fd)
    assert (primary.taken, primary.opened, primary.closed) == (0, 0, 0)
    worker.taken = 41
    worker.count_open()
    worker.count_open()
    worker.count_close()
    assert (primary.taken, primary.opened, primary.closed) == (41, 2, 1)
    assert primary.open == worker.open == 1
    worker.taken = 2**64 - 1  # a whole 64-bit word
    assert primary.taken == 2**64 - 1
    worker.close()
    primary.close()


def test_a_closed_tally_keeps_its_last_values_and_holds_no_fd() -> None:
    before = _fd_count()
    primary, fd = Tally.create()
    worker = Tally(fd)
    os.close(fd)
    worker.taken = 7
    worker.count_close()
    worker.close()
    primary.close()
    primary.close()  # twice is harmless
    assert (primary.taken, primary.closed) == (7, 1)
    assert _fd_count() == before  # each mapping's own copy of the fd is closed with it


def test_another_process_writes_through_the_passed_fd() -> None:
    """The way a worker gets it: an inherited fd, mapped in a new interpreter; what it
    wrote is still there after it exited."""
    primary, fd = Tally.create()
    os.set_inheritable(fd, True)
    code = textwrap.dedent(
        f"""
        import os
        from trioherd._tally import Tally
        tally = Tally({fd})
        os.close({fd})
        tally.taken = 12
        for _ in range(5):
            tally.count_open()
        for _ in range(3):
            tally.count_close()
        """
    )
    try:
        subprocess.run([sys.executable, "-c", code], pass_fds=[fd], check=True, timeout=60)
    finally:
        os.close(fd)
    assert (primary.taken, primary.opened, primary.closed) == (12, 5, 3)
    primary.close()
