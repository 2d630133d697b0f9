"""ASGI lifespan in a worker: startup before the worker reports ready, shutdown on drain.

An app that raises before it ever calls ``receive()`` does not speak lifespan (allowed by
the spec); an app that reports ``lifespan.startup.failed`` or raises during startup fails
the boot, with its message as the worker's boot error.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import trio

log = logging.getLogger("trioherd.worker")


class Lifespan:
    def __init__(self, app: Any, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self._to_app_send, self._to_app_receive = trio.open_memory_channel[dict[str, Any]](2)
        self._from_app = trio.Event()
        self._reply: dict[str, Any] | None = None
        self._done = trio.Event()
        self._error: str | None = None
        self._receive_called = False
        self.supported = True

    async def _receive(self) -> dict[str, Any]:
        self._receive_called = True
        return await self._to_app_receive.receive()

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
        self._from_app = trio.Event()
        self._reply = None
        await self._to_app_send.send({"type": kind})
        await self._from_app.wait()
        return self._reply

    async def startup(self, nursery: trio.Nursery) -> str | None:
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
