"""Apps that need the asyncio runtime (``--asyncio``): what they make at lifespan startup
(a lock, a queue, a task) is used by every request, and a FastAPI app that awaits
asyncio calls."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from trioherd import current_worker


async def stateful(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Lifespan startup makes a Lock, a Queue and a Task that serves the queue; each
    request sends its body through them and answers what the task made of it, with the
    worker's loop, id and the number the lock guarded."""
    if scope["type"] == "lifespan":
        state = scope["state"]
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                queue: asyncio.Queue[tuple[bytes, asyncio.Future[bytes]]] = asyncio.Queue()

                async def serve_queue(
                    queue: asyncio.Queue[tuple[bytes, asyncio.Future[bytes]]],
                ) -> None:
                    while True:
                        body, answer = await queue.get()
                        answer.set_result(body.upper())

                state["lock"] = asyncio.Lock()
                state["queue"] = queue
                state["task"] = asyncio.get_running_loop().create_task(serve_queue(queue))
                state["count"] = [0]
                await send({"type": "lifespan.startup.complete"})
            else:
                state["task"].cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return
    state = scope["state"]
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    await state["queue"].put((body, answer))
    async with state["lock"]:
        state["count"][0] += 1
        count = state["count"][0]
        await asyncio.sleep(0.001)
    worker = current_worker()
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    text = f"{(await answer).decode()} {loop} w{worker.id if worker else 0} {count} {os.getpid()}"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": text.encode()})


def _fastapi() -> Any:
    from fastapi import FastAPI

    api = FastAPI()

    @api.get("/")
    async def index() -> dict[str, Any]:
        await asyncio.sleep(0)
        task = asyncio.create_task(asyncio.sleep(0, result="from a task"))
        return {"hello": await task}

    return api


fastapi_app = _fastapi()
