"""``--asyncio``: asyncio-only ASGI apps (Django, Quart, anything on asyncpg or aiohttp) on
the herd, through trio-asyncio.

A worker with ``--asyncio`` opens one asyncio event loop hosted by its Trio run
(``trio_asyncio.open_loop()``) for its whole life, and calls the app in it: every call of
the app (each request, and lifespan) is an asyncio task of that loop
(``aio_as_trio``), and the app's ``receive`` and ``send`` are the worker's Trio ones,
callable from asyncio (``trio_as_aio``). So ``asyncio.get_running_loop()``,
``asyncio.create_task``, asyncio futures and ``loop.run_in_executor`` work in the app, and
the worker stays a Trio program.

Without ``--asyncio``, such an app boots and then fails each request (``no running event
loop``, ``trio.run received unrecognized yield message``). :class:`AsyncioHint`, a filter
on the worker's log handler, notices the first such traceback and logs one line that
names the flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .._config import Config
from .._errors import ConfigError

log = logging.getLogger("trioherd.worker")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

# what asyncio code says when it runs under Trio without a loop
_SYMPTOMS = ("no running event loop", "no current event loop", "unrecognized yield message")


def check(config: Config) -> None:
    """Raise ConfigError (exit 2) if ``--asyncio`` is asked for without trio-asyncio."""
    if config.asyncio and importlib.util.find_spec("trio_asyncio") is None:
        raise ConfigError(
            "asyncio", "needs the trio-asyncio package: pip install 'trioherd[asyncio]'"
        )


def loop(config: Config) -> contextlib.AbstractAsyncContextManager[Any]:
    """The asyncio loop the worker's app runs in: for the worker's whole Trio run."""
    if not config.asyncio:
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


def looks_asyncio_only(exc: BaseException | None) -> str | None:
    """The message of the asyncio-under-Trio error in ``exc`` (its causes, contexts and
    group members too), or None."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        text = str(current)
        if isinstance(current, RuntimeError | TypeError) and any(
            symptom in text for symptom in _SYMPTOMS
        ):
            return f"{type(current).__name__}: {_first_sentence(text)}"
        if type(current).__name__ == "AsyncLibraryNotFoundError":  # sniffio
            return f"{type(current).__name__}: {_first_sentence(text)}"
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend((current.__cause__, current.__context__))
    return None


def _first_sentence(text: str, limit: int = 200) -> str:
    """The error's first sentence (trio's "unrecognized yield message" goes on with advice
    this hint replaces), cut at a word, never inside one, past ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    sentence = line.split(". ", 1)[0].rstrip(".")
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0] + " …"


NEED = "the app needs an asyncio event loop"
WAY_OUT = "serve it with --asyncio (pip install 'trioherd[asyncio]')"
HINT = f"{NEED}: {WAY_OUT}"
"""Added to a boot error's text; a request's error gets one log line with the reason:
``the app needs an asyncio event loop (RuntimeError: no running event loop): serve it
with --asyncio (pip install 'trioherd[asyncio]')`` (docs/operations.md shows it)."""


def with_hint(text: str, config: Config) -> str:
    """A boot error's text, with :data:`HINT` added when it shows asyncio code that ran
    under Trio (an asyncio-only ASGI lifespan startup, say) and ``--asyncio`` is off."""
    if config.asyncio or not any(symptom in text for symptom in _SYMPTOMS):
        return text
    return f"{text.rstrip()}\n{HINT}\n"


class AsyncioHint(logging.Filter):
    """On the worker's log handler when ``--asyncio`` is off: at the first logged
    traceback that shows asyncio code running under Trio, log one line naming the flag.
    It costs nothing per request: only records that carry a traceback are looked at."""

    def __init__(self) -> None:
        super().__init__()
        self.told = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.told and record.exc_info:
            symptom = looks_asyncio_only(record.exc_info[1])
            if symptom is not None:
                self.told = True
                log.error("%s (%s): %s", NEED, symptom, WAY_OUT)
        return True
