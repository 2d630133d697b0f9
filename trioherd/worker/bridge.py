"""``--asyncio --loop trio-asyncio``: an asyncio ASGI app inside a Trio worker, through
trio-asyncio, for what the asyncio runtime (``aio/``) does not serve yet: WebSockets.

The worker opens one asyncio event loop hosted by its Trio run
(``trio_asyncio.open_loop()``) for its whole life and calls the app in it: every call of
the app (each request, each WebSocket, and lifespan) is an asyncio task of that loop
(``aio_as_trio``), and the app's ``receive`` and ``send`` are the worker's Trio ones,
callable from asyncio (``trio_as_aio``). It costs a crossing of the bridge per call and per
message: the asyncio runtime serves the same apps several times faster
(docs/performance.md), so this is only for an asyncio app that needs WebSockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .._config import Config
from .._errors import ConfigError

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
BRIDGE = "trio-asyncio"
"""The ``--loop`` that asks for it."""


def wanted(config: Config) -> bool:
    """The app runs on trio-asyncio in a Trio worker."""
    return config.asyncio and config.loop == BRIDGE


def check(config: Config) -> None:
    """Raise ConfigError (exit 2) if the bridge is asked for without trio-asyncio."""
    if wanted(config) and importlib.util.find_spec("trio_asyncio") is None:
        raise ConfigError("loop", "trio-asyncio is not installed: pip install trio-asyncio")


def loop(config: Config) -> contextlib.AbstractAsyncContextManager[Any]:
    """The asyncio loop the worker's app runs in: for the worker's whole Trio run."""
    if not wanted(config):
        return contextlib.nullcontext()
    return _open_loop()


@contextlib.asynccontextmanager
async def _open_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    import trio_asyncio

    async with trio_asyncio.open_loop() as aio_loop:
        # trio-asyncio runs only its own TrioExecutor (or None) in run_in_executor; asgiref
        # (Django's sync_to_async) passes a ThreadPoolExecutor of its own. Run any other
        # executor as asyncio's own loop does: submit, and wrap its future.
        own = aio_loop.run_in_executor

        def run_in_executor(executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
            if executor is None or isinstance(executor, trio_asyncio.TrioExecutor):
                return own(executor, func, *args)  # type: ignore[no-any-return]
            return asyncio.wrap_future(executor.submit(func, *args), loop=aio_loop)

        aio_loop.run_in_executor = run_in_executor
        yield aio_loop


def wrap(app: Any, interface: str) -> ASGIApp:
    """The ASGI ``app`` as a Trio ASGI app whose calls run in the asyncio loop."""
    if interface != "asgi":
        raise ConfigError("asyncio", f"runs ASGI apps only (this app is a {interface} app)")
    import trio_asyncio

    in_asyncio = trio_asyncio.aio_as_trio(app)
    as_aio = trio_asyncio.trio_as_aio

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await in_asyncio(scope, as_aio(receive), as_aio(send))

    return asgi
