"""A plain ASGI 3 app (no framework) with lifespan, served by the herd.

    python -m trioherd serve examples.asgi_app:app --workers 2
    curl http://127.0.0.1:8000/

Lifespan startup runs in every worker before it reports ready; if it fails, the worker
counts as a failed boot and `serve` exits 3 with the message.
"""

from __future__ import annotations

import json
import os
from typing import Any

Scope = dict[str, Any]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["started_by"] = os.getpid()  # copied into each request
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps(
        {
            "path": scope["path"],
            "method": scope["method"],
            "worker_pid": scope["state"]["started_by"],
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
