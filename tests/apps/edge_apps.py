"""Native app routes for the edge cases of the hand-written response framing."""

from __future__ import annotations

from trioherd import Request, Response


async def app(request: Request) -> Response:
    path = request.path
    if path == "/stream-echo":  # starts its response before it reads the body
        return Response(request.stream())
    if path == "/declared":  # as Starlette's FileResponse does on HEAD
        body = b"" if request.method == "HEAD" else b"0123456789"
        return Response(body, headers={"content-length": "10"})
    if path == "/ignore":  # answers without reading the body
        return Response("ignored")
    if path == "/interim":
        return Response("surprise", status=100)
    if path == "/control-char":
        return Response("x", headers={"x-a": "a\x01b"})
    if path == "/keep-alive-header":
        return Response("x", headers={"connection": "keep-alive"})
    return Response(f"{request.method} {path}")
