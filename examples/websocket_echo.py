"""A WebSocket echo server: every message sent to /echo comes back unchanged.

    python examples/websocket_echo.py --bind 127.0.0.1:9001          # as a script
    python -m trioherd serve examples.websocket_echo:app --workers 2  # or through the CLI
    python -m websockets ws://127.0.0.1:9001/echo                     # then type a line

It is the target of the Autobahn conformance run in docs/websocket.md. The native API:
``request.websocket`` says whether the request asks for a WebSocket,
``await request.accept_websocket()`` answers the handshake and gives the WebSocket,
``async for message in ws`` yields str and bytes messages until the client closes.
"""

from __future__ import annotations

import argparse

import trioherd
from trioherd import Request, Response


async def app(request: Request) -> Response | None:
    if request.path == "/echo" and request.websocket:
        ws = await request.accept_websocket()
        async for message in ws:  # str (text) or bytes (binary), as it came
            await ws.send(message)
        return None  # after accepting, nothing more is sent: the WebSocket is closed
    return Response("connect a WebSocket to /echo\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a WebSocket echo server")
    parser.add_argument("--bind", default="127.0.0.1:9001")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="websocket-echo", help="herd name (control socket)")
    args = parser.parse_args()
    trioherd.run(app, workers=args.workers, bind=[args.bind], name=args.name)
