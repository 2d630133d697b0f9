"""WebSocket apps for the tests: native, plain ASGI, Starlette and FastAPI.

Each app prints one line to stderr when a WebSocket of its ends, ``ws-app: <path>
disconnect <code>`` (the tests read the herd's stderr), and answers ``pid`` with the
worker's pid.
"""

# no "from __future__ import annotations": FastAPI reads the annotations of the route
# functions, which name classes imported inside _fastapi()
import os
import sys
from typing import Any

import trio

from trioherd import Request, Response, WebSocket

PID = str(os.getpid())


def note(path: str, code: int | None) -> None:
    print(f"ws-app: {path} disconnect {code}", file=sys.stderr, flush=True)


# -- native ------------------------------------------------------------------------------


async def native(request: Request) -> Response | None:
    if not request.websocket:
        return Response(f"plain HTTP {request.path}\n", headers={"x-pid": PID})
    if request.path == "/deny":
        return Response("no WebSocket for you\n", status=403)
    offered = request.websocket_subprotocols
    ws = await request.accept_websocket(
        subprotocol="chat" if "chat" in offered else None, headers={"x-pid": PID}
    )
    if request.path == "/close":
        await ws.close(4000, "closing on purpose")
    elif request.path == "/boom":
        await ws.receive()
        raise ValueError("the app failed on purpose")
    else:
        await _echo(ws)
    note(request.path, ws.close_code)
    return None


async def _echo(ws: WebSocket) -> None:
    async for message in ws:
        if message == "pid":
            await ws.send(PID)
        elif message == "slow":
            await trio.sleep(60)  # a drain must cut this short
        else:
            await ws.send(message)


# -- plain ASGI ----------------------------------------------------------------------------


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "http":
        await receive()
        body = f"plain HTTP {scope['path']}\n".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
        return
    path = scope["path"]
    assert (await receive())["type"] == "websocket.connect"
    if path == "/reject":
        await send({"type": "websocket.close"})
        return
    if path == "/deny":
        headers = [(b"content-type", b"text/plain"), (b"x-denied", b"yes")]
        await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
        await send(
            {"type": "websocket.http.response.body", "body": b"denied: ", "more_body": True}
        )
        await send({"type": "websocket.http.response.body", "body": b"no token\n"})
        return
    subprotocol = "chat" if "chat" in scope["subprotocols"] else None
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": subprotocol,
            "headers": [(b"x-pid", PID.encode())],
        }
    )
    if path == "/scope":
        shown = {k: v for k, v in scope.items() if k not in ("headers", "state")}
        await send({"type": "websocket.send", "text": repr(shown)})
    await _asgi_echo(path, receive, send)


async def _asgi_echo(path: str, receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            note(path, message["code"])
            return
        text = message.get("text")
        if path == "/boom":
            raise ValueError("the app failed on purpose")
        if text == "pid":  # the serving process's (a mold's forked worker's, --preload)
            await send({"type": "websocket.send", "text": str(os.getpid())})
        elif text == "close":
            await send({"type": "websocket.close", "code": 4001, "reason": "asked to"})
        elif text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


# -- Starlette and FastAPI -----------------------------------------------------------------


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket as StarletteWebSocket
    from starlette.websockets import WebSocketDisconnect

    async def echo(websocket: StarletteWebSocket) -> None:
        offered = websocket.scope["subprotocols"]
        await websocket.accept(subprotocol="chat" if "chat" in offered else None)
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"starlette: {text}")
        except WebSocketDisconnect as gone:
            note("/ws", gone.code)

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("starlette over HTTP\n")

    return Starlette(routes=[Route("/", home), WebSocketRoute("/ws", echo)])


def _fastapi() -> Any:
    from fastapi import FastAPI, WebSocketDisconnect
    from fastapi import WebSocket as FastAPIWebSocket

    app = FastAPI()

    @app.get("/")
    async def home() -> dict[str, str]:
        return {"hello": "fastapi"}

    @app.websocket("/ws/{room}")
    async def room(websocket: FastAPIWebSocket, room: str) -> None:
        await websocket.accept()
        try:
            while True:
                data = await websocket.receive_json()
                await websocket.send_json({"room": room, "got": data})
        except WebSocketDisconnect as gone:
            note(f"/ws/{room}", gone.code)

    return app


def __getattr__(name: str) -> Any:
    """``starlette_app`` and ``fastapi_app``, built on first use: the other apps' workers
    need not import the frameworks."""
    if name == "starlette_app":
        return _starlette()
    if name == "fastapi_app":
        return _fastapi()
    raise AttributeError(name)
