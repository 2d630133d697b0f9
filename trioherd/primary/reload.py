"""``--reload``: watch the app's files and do a rolling reload when one changes.

The primary watches (watchfiles' ``awatch``, which runs on Trio through anyio: the watching
itself is in a thread, in Rust). A burst of changes (an editor's save, a ``git checkout``)
is one reload: watchfiles groups changes until none came for ``QUIET_MS``, and changes that
come while a reload runs make one more reload after it. The reload is the herd's own
rolling reload, and ``--reload`` implies ``--preload``: each reload is one import of the
files, in a new mold, and the whole herd switches to it or not at all. So an edit that
breaks the app (a syntax error) fails the mold's import: the error is logged, the workers
that run the last good code keep serving, and the next change is tried again. An edit
saved while a reload runs waits for the next one (the running one keeps the code its mold
imported), so the herd never serves two versions.

What counts: files under the ``--reload-dir`` directories (default: the current directory)
whose path matches a ``--reload-include`` glob (default ``*.py``) and neither it nor a
directory on its way matches a ``--reload-exclude`` glob. Globs match from the right, as
``pathlib.PurePath.match``: ``*.py``, ``templates/*.html``, ``build``. watchfiles' default
filter comes first (``__pycache__``, ``.git``, ``.venv``, editor swap files, ...).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import aclosing
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import trio

from .._config import Config
from .._errors import ConfigError, ReloadError

if TYPE_CHECKING:
    from .herd import Herd

log = logging.getLogger("trioherd.reload")

QUIET_MS = 200
"""A burst of changes ends when none came for this long (watchfiles' ``step``)."""
MAX_BURST_MS = 1600
"""... or when it has lasted this long (watchfiles' ``debounce``)."""
BOOT_POLL = 0.1


def check(config: Config) -> None:
    """Raise ConfigError (exit 2) if ``--reload`` cannot work: no watchfiles, or a
    ``--reload-dir`` that is not a directory."""
    if not config.reload:
        return
    if importlib.util.find_spec("watchfiles") is None:
        raise ConfigError("reload", "needs the watchfiles package: pip install 'trioherd[reload]'")
    for directory in directories(config):
        if not os.path.isdir(directory):
            raise ConfigError("reload_dir", f"{directory}: no such directory")


def directories(config: Config) -> list[str]:
    """The directories to watch, absolute (relative ones are the primary's cwd's)."""
    return [os.path.abspath(d) for d in config.reload_dir] or [os.getcwd()]


def matches(
    path: str, roots: Sequence[str], include: Sequence[str], exclude: Sequence[str]
) -> bool:
    """Whether a change of ``path`` counts (see the module's docstring)."""
    full = PurePath(path)
    relative = full
    for root in roots:
        if full.is_relative_to(root):
            relative = full.relative_to(root)
            break
    parts = relative.parts
    for end in range(1, len(parts) + 1):
        if any(PurePath(*parts[:end]).match(pattern) for pattern in exclude):
            return False
    return any(relative.match(pattern) for pattern in include)


def make_filter(config: Config, roots: Sequence[str]) -> Callable[[Any, str], bool]:
    """A watchfiles ``watch_filter``: its default filter, then the globs."""
    from watchfiles import DefaultFilter

    default = DefaultFilter()
    include, exclude = config.reload_include, config.reload_exclude

    def accept(change: Any, path: str) -> bool:
        return default(change, path) and matches(path, roots, include, exclude)

    return accept


class _Changes:
    """Paths changed since the last reload began, and an event set when there are any."""

    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.event = trio.Event()

    def add(self, paths: set[str]) -> None:
        self.paths |= paths
        self.event.set()

    async def take(self) -> set[str]:
        await self.event.wait()
        self.event = trio.Event()
        paths, self.paths = self.paths, set()
        return paths


async def watch(herd: Herd) -> None:
    """Watch until cancelled; reload the herd after each burst of changes."""
    import anyio

    roots = directories(herd.config)
    changes = _Changes()
    stop = anyio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_files, roots, make_filter(herd.config, roots), changes, stop)
        nursery.start_soon(_reload_on_change, herd, changes, roots)
        try:
            await trio.sleep_forever()
        finally:
            # the watching thread sees this within QUIET_MS: a cancelled watch ends that soon
            # (awatch's thread cannot be abandoned, and only sets its own stop event after)
            stop.set()


async def _watch_files(
    roots: list[str], accept: Callable[[Any, str], bool], changes: _Changes, stop: Any
) -> None:
    from watchfiles import awatch

    watching = awatch(
        *roots, watch_filter=accept, debounce=MAX_BURST_MS, step=QUIET_MS, stop_event=stop
    )
    async with aclosing(watching):
        async for batch in watching:
            changes.add({path for _, path in batch})


async def _reload_on_change(herd: Herd, changes: _Changes, roots: list[str]) -> None:
    # the files are watched from the start; a change during the first boot makes one
    # reload once it is done (and the `listening on` line stays the first one)
    while not herd.started:
        if herd.stopping:
            return
        await trio.sleep(BOOT_POLL)
    log.info(
        "watching %s for changes to %s", ", ".join(roots), " ".join(herd.config.reload_include)
    )
    while True:
        paths = await changes.take()
        if herd.stopping:
            return
        names = sorted(os.path.basename(path) for path in paths)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        log.info("%s changed: reloading", shown)
        try:
            await herd.reload()
        except ReloadError:  # the herd logged the worker's error
            log.error("the new code could not boot; the last good code keeps serving")
