"""An ASGI app that shows what it was told about its client, and the forwarded headers it
got (tests/test_proxies.py, tests/test_edge.py)."""

from __future__ import annotations

import json
from typing import Any


async def asgi_client(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    body = {
        "client": list(scope["client"]) if scope["client"] else None,
        "scheme": scope["scheme"],
        # the headers as the app gets them: untouched, whether they were applied or not
        "x-forwarded-for": headers.get(b"x-forwarded-for", b"").decode(),
        "x-forwarded-proto": headers.get(b"x-forwarded-proto", b"").decode(),
        "forwarded": headers.get(b"forwarded", b"").decode(),
    }
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
