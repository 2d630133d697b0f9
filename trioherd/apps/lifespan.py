"""ASGI lifespan in a worker: startup before the worker reports ready, shutdown on drain.

An app that raises before it ever calls ``receive()`` does not speak lifespan (allowed by
the spec); an app that reports ``lifespan.startup.failed`` or raises during startup fails
the boot, with its message as the worker's boot error.

It runs on any event loop: the runtime gives it the kind of event to wait on (Trio's by
default, ``asyncio.Event`` in the asyncio runtime) and something to start the app's
task with (a nursery, or anything with ``start_soon``).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger("trioherd.worker")


class Lifespan:
    def __init__(
        self, app: Any, state: dict[str, Any], event: Callable[[], Any] | None = None
    ) -> None:
        if event is None:
            import trio

            event = trio.Event
        self.app = app
        self.state = state
        self._event = event
        self._asked = event()  # set when a message for the app is waiting in _message
        self._message: dict[str, Any] = {}
        self._from_app = event()
        self._reply: dict[str, Any] | None = None
        self._done = event()
        self._error: str | None = None
        self._receive_called = False
        self.supported = True

    async def _receive(self) -> dict[str, Any]:
        self._receive_called = True
        await self._asked.wait()
        self._asked = self._event()
        return self._message

    async def _send(self, message: dict[str, Any]) -> None:
        self._reply = message
        self._from_app.set()

    async def _run(self) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "state": self.state,
        }
        try:
            await self.app(scope, self._receive, self._send)
        except Exception:
            if not self._receive_called:
                self.supported = False
                log.debug("the app does not speak ASGI lifespan")
            else:
                self._error = traceback.format_exc()
        finally:
            self._done.set()
            self._from_app.set()

    async def _exchange(self, kind: str) -> dict[str, Any] | None:
        self._from_app = self._event()
        self._reply = None
        self._message = {"type": kind}
        self._asked.set()
        await self._from_app.wait()
        return self._reply

    async def startup(self, nursery: Any) -> str | None:
        """Run startup; the error text if it failed, else None."""
        nursery.start_soon(self._run)
        reply = await self._exchange("lifespan.startup")
        if reply is None:
            return self._error if self.supported else None
        if reply.get("type") == "lifespan.startup.failed":
            return "ASGI lifespan startup failed: " + str(reply.get("message", ""))
        return None

    async def shutdown(self) -> None:
        if not self.supported or self._done.is_set():
            return
        reply = await self._exchange("lifespan.shutdown")
        if reply is not None and reply.get("type") == "lifespan.shutdown.failed":
            log.error("ASGI lifespan shutdown failed: %s", reply.get("message", ""))
