"""A native app for tests/test_http_edges.py: what it saw, echoes, and big answers."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

from trioherd import Request, Response

PID = str(os.getpid())
MIB = 1024 * 1024


async def app(request: Request) -> Response:
    headers = {"x-pid": PID}
    path = request.path
    if path == "/echo":  # reads the whole body
        return Response(await request.body(), headers=headers)
    if path == "/big":  # ?mb=N: N MiB, known length, one send
        size = int(request.query.partition("=")[2] or 8) * MIB
        return Response(b"x" * size, headers=headers)
    if path == "/kb":  # ?kb=N: N KiB, known length (a small answer, below 16 KiB)
        return Response(b"k" * int(request.query.partition("=")[2] or 1) * 1024, headers=headers)
    if path == "/big-stream":  # ?mb=N: N MiB, streamed in 64 KiB pieces

        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(int(request.query.partition("=")[2] or 8) * 16):
                yield b"y" * 65536

        return Response(pieces(), headers=headers)
    if path == "/stall":  # ?s=N&mark=FILE: FILE is made, then the worker's loop is held N s
        query = dict(part.partition("=")[::2] for part in request.query.split("&"))
        with open(query["mark"], "w"):
            pass
        time.sleep(float(query["s"]))  # as a blocking call in an app, or a starved machine
        return Response("stalled", headers=headers)
    # anything else: what the app was asked, without reading a body
    return Response(f"{request.method} {path} {request.query}".strip(), headers=headers)
