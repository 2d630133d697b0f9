"""An app that answers with what it was given of the request: for comparing parsers."""

from __future__ import annotations

import json

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
