"""A chat room served by a herd: a message typed in a browser connected to one worker
reaches the browsers connected to every other worker, through the primary.

    python examples/chat.py --bind 127.0.0.1:8000 --workers 2
    # open http://127.0.0.1:8000/ in two browsers (or tabs): each page says which worker
    # it is connected to; what one types, all see

How a message travels: browser -> its worker's WebSocket -> ``trioherd.send_to_primary``
-> the primary (this script's ``main``) -> ``herd.broadcast`` -> every worker's
``trioherd.receive_from_primary`` -> each worker's own browsers. A reload
(``python -m trioherd reload --name chat-example``) closes the WebSockets with 1001 and the
pages reconnect, to the new workers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

import trioherd
from trioherd import Request, Response, WebSocket

MAX_TEXT = 1000

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>trioherd chat</title>
<style>body{font:16px sans-serif;max-width:40em;margin:2em auto}#log{min-height:10em}</style>
</head><body>
<h1>trioherd chat</h1>
<p id="status">connecting&hellip;</p>
<ul id="log"></ul>
<form id="form"><input id="text" autocomplete="off" size="40" autofocus>
<button id="send">send</button></form>
<script>
const status = document.getElementById("status");
const log = document.getElementById("log");
let ws;
function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  ws = new WebSocket(scheme + location.host + "/chat");
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.hello) {
      status.textContent = "connected to worker " + message.worker;
      status.dataset.worker = message.worker;
      return;
    }
    const item = document.createElement("li");
    item.textContent = "[worker " + message.worker + "] " + message.text;
    log.append(item);
  };
  ws.onclose = (event) => {
    status.textContent = "disconnected (" + event.code + "), reconnecting";
    delete status.dataset.worker;
    setTimeout(connect, 1000);
  };
}
document.getElementById("form").onsubmit = (event) => {
  event.preventDefault();
  const text = document.getElementById("text");
  if (text.value && ws.readyState === WebSocket.OPEN) ws.send(text.value);
  text.value = "";
};
connect();
</script>
</body></html>
"""

# -- in each worker ------------------------------------------------------------------------

_clients: set[WebSocket] = set()  # this worker's browsers
_relay_started = False


def _worker_id() -> int:
    worker = trioherd.current_worker()
    return worker.id if worker else 0


async def app(request: Request) -> Response | None:
    if request.path == "/chat" and request.websocket:
        _start_relay()
        ws = await request.accept_websocket()
        await ws.send(json.dumps({"hello": True, "worker": _worker_id()}))
        _clients.add(ws)
        try:
            async for text in ws:
                if isinstance(text, str) and text.strip():
                    chat = {"chat": text[:MAX_TEXT], "worker": _worker_id()}
                    await trioherd.send_to_primary(chat)  # to every worker, this one too
        finally:
            _clients.discard(ws)
        return None
    if request.path == "/":
        return Response(PAGE, content_type="text/html; charset=utf-8")
    return Response("not found\n", status=404)


def _start_relay() -> None:
    """One task per worker, as long as the worker runs, that hands what the primary
    broadcasts to this worker's browsers (a native app has no lifespan to start it in)."""
    global _relay_started
    if not _relay_started:
        _relay_started = True
        trio.lowlevel.spawn_system_task(_relay)


async def _relay() -> None:
    while True:
        message: Any = await trioherd.receive_from_primary()
        if not (isinstance(message, dict) and "chat" in message):
            continue
        text = json.dumps({"worker": message.get("worker"), "text": message["chat"]})
        for ws in list(_clients):
            try:
                await ws.send(text)
            except trioherd.WebSocketClosed:
                _clients.discard(ws)


# -- in the primary ------------------------------------------------------------------------


async def main(bind: str, workers: int, name: str) -> None:
    config = trioherd.Config(app=app, bind=[bind], workers=workers, name=name, handle_signals=True)
    async with trio.open_nursery() as nursery:
        herd = await nursery.start(trioherd.serve, config)
        print(f"trioherd: listening on {herd.addresses[0]}", file=sys.stderr, flush=True)
        async for event in herd.messages():  # what workers send_to_primary()
            if isinstance(event.data, dict) and "chat" in event.data:
                await herd.broadcast(event.data)  # to every worker's receive_from_primary()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a chat room across the workers of a herd")
    parser.add_argument("--bind", default="127.0.0.1:8000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="chat-example", help="herd name (control socket)")
    args = parser.parse_args()
    trio.run(main, args.bind, args.workers, args.name)
