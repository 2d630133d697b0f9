"""The hint for an asyncio app served without ``--asyncio``, and the check of ``--loop``.

With ``--asyncio`` an app runs on the asyncio runtime (``aio.worker``). Without it, an
asyncio-only app (Django's async views, Quart, anything awaiting asyncpg or aiohttp) boots
on Trio and then fails each request (``no running event loop``, ``trio.run received
unrecognized yield message``). :class:`AsyncioHint`, a filter on the worker's log handler,
notices the first such traceback and logs one line that names the flag; a boot error
that shows it gets the same line (:func:`with_hint`).
"""

from __future__ import annotations

import importlib.util
import logging

from .._config import Config
from .._errors import ConfigError

log = logging.getLogger("trioherd.worker")

# what asyncio code says when it runs under Trio without a loop
_SYMPTOMS = ("no running event loop", "no current event loop", "unrecognized yield message")


def check(config: Config) -> None:
    """Raise ConfigError (exit 2) if ``--loop uvloop`` is asked for without uvloop."""
    if config.asyncio and config.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("loop", "uvloop is not installed: pip install 'trioherd[asyncio]'")


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
WAY_OUT = "serve it with --asyncio"
HINT = f"{NEED}: {WAY_OUT}"
"""Added to a boot error's text; a request's error gets one log line with the reason:
``the app needs an asyncio event loop (RuntimeError: no running event loop): serve it
with --asyncio`` (docs/operations.md shows it)."""


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
