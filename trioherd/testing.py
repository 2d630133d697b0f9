"""Test an app on a real herd: ``async with open_herd(app) as herd: ... herd.url ...``.

For pytest-trio and any Trio code (see docs/testing.md). A herd made here:

- listens on a free port of 127.0.0.1 (``bind=["127.0.0.1:0"]``): ``herd.url`` is
  ``http://127.0.0.1:PORT``;
- has a name of its own (``test-<random>``) and its control socket in a private temporary
  directory (``Config.control_dir``), so two herds in one test, two test runs at once, or
  a herd in production on the same machine never collide; nothing in ``os.environ`` is
  changed;
- has 2 workers and a graceful timeout of 5 s unless told otherwise;
- is handed over once every worker is ready, and on the way out is stopped gracefully
  and checked: no worker process it started may be left, nor its control socket.
  Otherwise :class:`LeftoverError` (an AssertionError) names what is left.

Errors are not wrapped in exception groups: an app that cannot boot raises
``trioherd.WorkerBootError`` from ``async with``, and an assertion that fails in the body
comes out as it is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from ._config import make_config
from ._serve import serve
from .primary.events import HerdEvent
from .primary.herd import Herd

__all__ = ["LeftoverError", "open_herd"]

DEFAULTS: dict[str, Any] = {"workers": 2, "graceful_timeout": 5.0}
STOP_MARGIN = 10.0
"""Seconds past the graceful timeout a stop may take before the herd is stopped at once."""


class LeftoverError(AssertionError):
    """Something a test herd started outlived it (a worker process, its control socket)."""


@contextlib.asynccontextmanager
async def open_herd(
    app: str | Callable[..., Any] | None = None, /, **config: Any
) -> AsyncIterator[Herd]:
    """Start a herd serving ``app`` (an import string such as ``"myapp:app"``, or the
    app itself, which the workers import by its module and name) with ``config`` (any
    :class:`trioherd.Config` field), wait until every worker is ready, and yield the
    :class:`~trioherd.Herd`. On exit: stop it gracefully and check nothing is left."""
    options: dict[str, Any] = {
        **DEFAULTS,
        "bind": ["127.0.0.1:0"],
        "name": f"test-{uuid.uuid4().hex[:12]}",
    }
    options.update(config)
    if app is None:  # open_herd(app="myapp:app") too
        app = options.pop("app", None)
    own_dir = None
    if options.get("control", True) and options.get("control_dir") is None:
        own_dir = options["control_dir"] = tempfile.mkdtemp(prefix="trioherd-test-")
    failure: BaseException | None = None
    pids: set[int] = set()
    herd: Herd | None = None
    stopped = True
    try:
        herd_config = make_config(app=app, **options)
        async with trio.open_nursery() as nursery:
            try:
                herd = await nursery.start(serve, herd_config)
            except BaseException as exc:  # a boot error: raised as it is, below
                failure = exc
            if herd is not None:
                pids.update(worker.pid for worker in herd.workers)
                herd.hub.observe(_online(pids))
                try:
                    yield herd
                except BaseException as exc:  # the test's own error: raised as it is
                    failure = exc
                finally:
                    with trio.CancelScope(shield=True):
                        stopped = await _stop(herd)
    finally:
        if own_dir is not None:
            leftover = _leftover_files(own_dir)
            shutil.rmtree(own_dir, ignore_errors=True)
        else:
            leftover = []
    if failure is not None:
        raise failure
    if not stopped:
        raise LeftoverError(
            "the test herd did not stop within "
            f"{options.get('drain_delay', 0) + options['graceful_timeout'] + STOP_MARGIN:g}s "
            "of its graceful stop; its workers were killed"
        )
    _check_nothing_left(pids, leftover)


def _online(pids: set[int]) -> Callable[[HerdEvent], None]:
    def note(event: HerdEvent) -> None:
        if event.kind == "online":
            pids.add(event.pid)

    return note


async def _stop(herd: Herd) -> bool:
    """Stop gracefully (after ``--drain-delay``, if one is set); False if that took too
    long and the workers were killed."""
    config = herd.config
    with trio.move_on_after(config.drain_delay + config.graceful_timeout + STOP_MARGIN):
        await herd.stop()
        return True
    herd.force_stop()
    return False


def _leftover_files(directory: str) -> list[str]:
    try:
        return [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
    except OSError:
        return []


def _alive_child(pid: int) -> bool:
    """Whether ``pid`` is still a live (not zombie) child of this process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != b"Z" and int(fields[1]) == os.getpid()


def _check_nothing_left(pids: set[int], files: list[str]) -> None:
    left = [f"worker process {pid}" for pid in sorted(pids) if _alive_child(pid)]
    left += [f"control socket {path}" for path in files]
    if left:
        raise LeftoverError(f"left behind by the test herd: {', '.join(left)}")
