"""A Quart app (asyncio-only), unchanged: served with --asyncio."""

from __future__ import annotations

import asyncio

from quart import Quart, request

app = Quart(__name__)


@app.route("/")
async def index() -> str:
    await asyncio.sleep(0)
    return "hello from quart"


@app.route("/echo", methods=["POST"])
async def echo() -> bytes:
    return await request.get_data()
