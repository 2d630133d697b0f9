"""The built-in demo app served when ``serve`` is given no APP: it names the worker that
answered, like the Node cluster demos. Reload the page to watch round-robin at work.
:func:`app` is the native app; :func:`asgi` the same answers as an ASGI app, for
``--asyncio``."""

from __future__ import annotations

import os
from typing import Any

from .apps.loading import Request, Response
from .worker.base import current_worker

NO_STORE = {"cache-control": "no-store"}


def answer(method: str, path: str, client: Any) -> tuple[str, dict[str, str]]:
    """The demo's body and headers for a request."""
    worker = current_worker()
    worker_id = worker.id if worker else 0
    if path == "/health":
        return "ok\n", NO_STORE
    body = (
        f"Hello from trioherd worker {worker_id} (pid {os.getpid()})\n"
        f"{method} {path} from {client[0] if client else '-'}\n"
    )
    # the answer changes from one worker to the next: no cache may keep it
    return body, {"x-worker-id": str(worker_id), "x-worker-pid": str(os.getpid()), **NO_STORE}


async def app(request: Request) -> Response:
    body, headers = answer(request.method, request.path, request.client)
    return Response(body, headers=headers)


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return  # no lifespan to speak of
    body, headers = answer(scope["method"], scope["path"], scope["client"])
    fields = [(b"content-type", b"text/plain; charset=utf-8")]
    fields += [(name.encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": 200, "headers": fields})
    await send({"type": "http.response.body", "body": body.encode()})
