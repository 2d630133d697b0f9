"""A native app for the chaos tests (tests/test_chaos.py): who answered, and responses
large enough that a client which never reads them fills the socket buffers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio

from trioherd import Request, Response

PID = str(os.getpid())
BIG = b"x" * (8 * 1024 * 1024)  # more than loopback socket buffers take in: a send blocks
CHUNK = b"y" * 65536


async def app(request: Request) -> Response:
    headers = {"x-pid": PID}
    if request.path == "/big":  # 8 MiB in one body of known length
        return Response(BIG, headers=headers, content_type="application/octet-stream")
    if request.path == "/bigstream":  # 8 MiB streamed (chunked), 64 KiB at a time

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(128):
                yield CHUNK

        return Response(chunks(), headers=headers, content_type="application/octet-stream")
    if request.path == "/slow":  # an exchange that is in flight for a while
        await anyio.sleep(float(request.query.partition("=")[2] or 0.2))
    return Response(PID, headers=headers)
