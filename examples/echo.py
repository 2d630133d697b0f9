"""A raw TCP echo server on the herd: no HTTP, just a stream handler per connection.

python examples/echo.py --bind 127.0.0.1:9000 --workers 2
printf 'hello\\n' | nc 127.0.0.1 9000   # -> "worker 1 (pid 1234) says: hello"
"""

from __future__ import annotations

import argparse
import os

import trio

import trioherd


@trioherd.stream_handler
async def handle(stream: trio.abc.Stream) -> None:
    worker = trioherd.current_worker()
    prefix = f"worker {worker.id if worker else 0} (pid {os.getpid()}) says: ".encode()
    async for chunk in stream:
        await stream.send_all(prefix + chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:9000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="echo-example", help="herd name (control socket)")
    args = parser.parse_args()
    # handle is defined in this script's __main__: trioherd turns it into
    # "<path of this file>:handle", which each worker imports by path.
    trioherd.run(handle, workers=args.workers, bind=[args.bind], name=args.name)


if __name__ == "__main__":
    main()
