"""An app that answers with what it was given of the request: for comparing parsers."""

from __future__ import annotations

import json
from typing import Any

from trioherd import Request, Response


async def app(request: Request) -> Response:
    body = await request.body()
    seen = {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "http_version": request.http_version,
        "headers": [
            [name.decode("latin-1"), value.decode("latin-1")]
            for name, value in request.headers.raw
        ],
        "body": body.decode("latin-1"),
    }
    return Response(json.dumps(seen), content_type="application/json")


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The same for an ASGI app, with the scope's ``raw_path``."""
    if scope["type"] != "http":
        return
    seen = {
        "path": scope["path"],
        "raw_path": scope["raw_path"].decode("latin-1"),
        "query": scope["query_string"].decode("latin-1"),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
    }
    body = json.dumps(seen).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
