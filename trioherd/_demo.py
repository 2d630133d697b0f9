"""The built-in demo app served when ``serve`` is given no APP: it names the worker that
answered, like the Node cluster demos. Reload the page to watch round-robin at work."""

from __future__ import annotations

import os

from .apps.loading import Request, Response
from .worker.main import current_worker

NO_STORE = {"cache-control": "no-store"}


async def app(request: Request) -> Response:
    worker = current_worker()
    worker_id = worker.id if worker else 0
    if request.path == "/health":
        return Response("ok\n", headers=NO_STORE)
    body = (
        f"Hello from trioherd worker {worker_id} (pid {os.getpid()})\n"
        f"{request.method} {request.path} from {request.client[0] if request.client else '-'}\n"
    )
    # the answer changes from one worker to the next: no cache may keep it
    headers = {"x-worker-id": str(worker_id), "x-worker-pid": str(os.getpid()), **NO_STORE}
    return Response(body, headers=headers)
