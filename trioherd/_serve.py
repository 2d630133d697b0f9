"""``serve()``: a herd with everything around it, composed through public methods.

The pieces, each in its own module: the listeners (``_listeners``), the hand-off of
accepted connections (``primary.handoff``), the herd that supervises the workers
(``primary.herd``), the control socket (``primary.control``), Prometheus metrics
(``primary.metrics``), signals (here) and systemd's notify socket (``primary.systemd``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import trio

from . import _tls
from ._config import Config
from ._errors import ReloadError, StoppedBeforeReady, WorkerBootError
from ._listeners import open_listeners, raise_open_files_limit
from .primary import reload as _reload
from .primary.control import start_control_server
from .primary.handoff import Handoff
from .primary.herd import Herd
from .primary.metrics import serve_metrics
from .primary.systemd import Notifier
from .worker import aio as _aio
from .worker import bridge as _bridge

log = logging.getLogger("trioherd.primary")

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


async def serve(
    config: Config,
    *,
    task_status: trio.TaskStatus[Herd] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a herd until it is stopped. ``await nursery.start(serve, config)`` returns the
    :class:`Herd` once every worker is ready. Raises WorkerBootError if workers keep dying
    before they become ready, ConfigError for a bad listener."""
    _tls.check(config)
    _reload.check(config)  # --reload and --asyncio need their extras: exit 2 without them
    _aio.check(config)
    _bridge.check(config)
    raise_open_files_limit()  # workers inherit it
    listeners = open_listeners(config)
    herd = Herd(config, Handoff(listeners, config))
    herd.on_state_change = Notifier(os.environ.get("NOTIFY_SOCKET"))
    failure: WorkerBootError | StoppedBeforeReady | None = None
    async with contextlib.AsyncExitStack() as cleanup:
        for listener in listeners:
            cleanup.callback(listener.close)
        async with trio.open_nursery() as services:
            # all before any worker: a busy control name or metrics port is a usage error
            if config.control:
                cleanup.callback((await start_control_server(herd, services)).close)
            if config.handle_signals:
                services.start_soon(handle_signals, herd, services)
            if config.metrics_bind:
                herd.metrics_url = await services.start(serve_metrics, herd)
            if config.reload:  # watching from before the workers import the app
                services.start_soon(_reload.watch, herd)
            try:
                await herd.run(task_status=task_status)
            except (WorkerBootError, StoppedBeforeReady) as exc:
                failure = exc
            services.cancel_scope.cancel()
    if failure is not None:
        raise failure
    log.info("stopped")


async def handle_signals(herd: Herd, nursery: trio.Nursery) -> None:
    """INT/TERM: graceful stop (again: stop at once); HUP: rolling reload; TTIN/TTOU: one
    worker more or less."""
    with trio.open_signal_receiver(*_SIGNALS) as received:
        async for signum in received:
            name = signal.Signals(signum).name
            if signum in (signal.SIGINT, signal.SIGTERM):
                if herd.stopping:
                    log.warning("%s again: stopping now", name)
                    herd.force_stop()
                else:
                    log.info("%s: stopping gracefully (again to stop at once)", name)
                    nursery.start_soon(herd.stop)
            elif signum == signal.SIGHUP:
                nursery.start_soon(_reload_logged, herd)
            elif signum == signal.SIGTTIN:
                nursery.start_soon(herd.scale, herd.size + 1)
            elif signum == signal.SIGTTOU and herd.size > 1:
                nursery.start_soon(herd.scale, herd.size - 1)


async def _reload_logged(herd: Herd) -> None:
    with contextlib.suppress(ReloadError):  # logged by the herd; old workers serve on
        await herd.reload()
