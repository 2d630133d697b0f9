"""A Quart app (asyncio-only), unchanged: served with --asyncio."""

from __future__ import annotations

import asyncio

from quart import Quart, request, websocket

app = Quart(__name__)


@app.route("/")
async def index() -> str:
    await asyncio.sleep(0)
    return "hello from quart"


@app.route("/echo", methods=["POST"])
async def echo() -> bytes:
    return await request.get_data()


@app.websocket("/ws")
async def echo_socket() -> None:
    """Echoes each message, awaiting asyncio in between (served with --asyncio --loop
    trio-asyncio: the asyncio runtime serves no WebSockets yet)."""
    while True:
        message = await websocket.receive()
        await asyncio.sleep(0)
        await websocket.send(f"echo {message}")
