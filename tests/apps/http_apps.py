"""HTTP apps for the tests: native, ASGI and Starlette."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio

from trioherd import Request, Response

PID = str(os.getpid())
_HOARD: list[bytearray] = []


async def native(request: Request) -> Response:
    headers = {"x-pid": PID}
    if request.path == "/echo":
        body = await request.body()
        return Response(body, headers=headers, content_type="application/octet-stream")
    if request.path == "/count":
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return Response(f"{size}", headers=headers)
    if request.path == "/stream":

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk {i}\n".encode()
                await anyio.sleep(0.01)

        return Response(chunks(), headers=headers)
    if request.path == "/grow":  # hold on to memory, as a leaking app would
        _HOARD.append(bytearray(int(request.query.partition("=")[2] or 50) * 1024 * 1024))
        return Response("grown\n", headers=headers)
    if request.path == "/die":
        os._exit(1)
    if request.path == "/boom":
        raise ValueError("the app failed on purpose")
    if request.path == "/slow":
        await anyio.sleep(float(request.query.partition("=")[2] or 1))
        return Response("slow done\n", headers=headers)
    if request.path == "/info":
        info = {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "client": list(request.client) if request.client else None,
            "http_version": request.http_version,
            "user_agent": request.headers.get("user-agent"),
        }
        return Response(json.dumps(info), headers=headers, content_type="application/json")
    return Response("Hello, World!", headers=headers)


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["greeting"] = "hello from lifespan"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] == "/fields":  # fields as an iterable of bytes-like pairs, not tuples
        fields = ([bytearray(b"x-gen"), memoryview(b"%d" % n)] for n in range(2))
        await send({"type": "http.response.start", "status": 200, "headers": fields})
        more = scope["query_string"] == b"stream"
        await send({"type": "http.response.body", "body": b"fields", "more_body": more})
        if more:
            await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] == "/stream":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"x-pid", PID.encode())]}
        )
        for i in range(3):
            await send({"type": "http.response.body", "body": b"part %d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    payload = json.dumps(
        {
            "path": scope["path"],
            "query": scope["query_string"].decode(),
            "scheme": scope["scheme"],
            "body": body.decode(errors="replace"),
            "state": scope["state"].get("greeting"),
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"x-pid", PID.encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def asgi_lifespan_fails(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "cannot reach the database"})
        return
    raise AssertionError("never served")


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request as SRequest
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def home(request: SRequest) -> PlainTextResponse:
        return PlainTextResponse("starlette on trio", headers={"x-pid": PID})

    async def echo(request: SRequest) -> JSONResponse:
        data = await request.json()
        return JSONResponse({"got": data, "pid": PID})

    async def stream(request: SRequest) -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            for i in range(3):
                yield b"s%d\n" % i
                await anyio.sleep(0)

        return StreamingResponse(parts(), media_type="text/plain")

    return Starlette(
        routes=[Route("/", home), Route("/echo", echo, methods=["POST"]), Route("/stream", stream)]
    )


starlette_app = _starlette()


async def blocking(request: Request) -> Response:
    """/hang blocks the worker's event loop, as a CPU-bound or sync-I/O app would."""
    if request.path == "/hang":
        import time

        time.sleep(600)
    return Response("fine", headers={"x-pid": PID})
