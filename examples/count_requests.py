"""Node's classic cluster example: every worker tells the primary about each request it
serves, and the primary keeps a tally per worker pid.

    python examples/count_requests.py --bind 127.0.0.1:8000
    for i in $(seq 10); do curl -s http://127.0.0.1:8000/ >/dev/null; done
    # the primary prints: "tally: {4242: 5, 4243: 5}"
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import trio

import trioherd


async def app(request: trioherd.Request) -> trioherd.Response:
    await trioherd.send_to_primary({"cmd": "notifyRequest"})  # the worker side: one line
    return trioherd.Response(f"hello from pid {os.getpid()}\n")


async def main(bind: str, workers: int, name: str) -> None:
    config = trioherd.Config(app=app, bind=[bind], workers=workers, name=name, handle_signals=True)
    async with trio.open_nursery() as nursery:
        herd = await nursery.start(trioherd.serve, config)
        print(f"trioherd: listening on {herd.addresses[0]}", file=sys.stderr, flush=True)
        tally: collections.Counter[int] = collections.Counter()  # the primary side
        async for message in herd.messages():
            if message.data == {"cmd": "notifyRequest"}:
                tally[message.pid] += 1
                print(f"tally: {dict(sorted(tally.items()))}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="count requests per worker")
    parser.add_argument("--bind", default="127.0.0.1:8000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="count-example", help="herd name (control socket)")
    args = parser.parse_args()
    trio.run(main, args.bind, args.workers, args.name)
