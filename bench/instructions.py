"""Machine instructions per keep-alive request, counted by valgrind: a measure of our
per-request work that the machine's noise does not move.

    python bench/instructions.py                 # this checkout
    python bench/instructions.py /path/to/other  # another copy of the package (A/B)

CPU time on these machines moves by 15 % between runs minutes apart; an instruction
count moves by about 0.3 %. So a change of a few per cent in what a request costs is
seen here in one run, where wrk would need ten interleaved rounds.

What runs: in one process and one trio run, trioherd's plain-HTTP handler (the worker's
own: ``_plain_handler`` with ``--http httptools``, the edge waiter and the sweeper) and
``bench/hello_app.py`` serve 32 keep-alive connections over 127.0.0.1, and 32 client
tasks of the same run send wrk's request on them, one at a time each, reading every
answer. ``cachegrind`` counts the instructions of the whole process for 20 and for 120
requests per connection; the difference over the 3,200 requests between them leaves out
start-up and import. The clients' share is in the count (about half of it): compare two
copies of the package, not this number with a server's CPU time.

Needs valgrind (``apt-get install valgrind``) and the package's dependencies with
httptools (``pip install -e '.[httptools]'``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CONNECTIONS = 32
FEW, MANY = 20, 120
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
BENCH = Path(__file__).resolve().parent


def serve_and_ask(requests: int) -> None:
    """The measured process: ``requests`` on each of CONNECTIONS connections."""
    import trio

    sys.path.append(str(BENCH.parent))  # after PYTHONPATH: the package measured comes first
    import trioherd
    from bench.hello_app import app

    measured = os.environ.get("TRIOHERD_MEASURED", "")
    if not Path(trioherd.__file__).resolve().is_relative_to(measured):
        sys.exit(f"imported {trioherd.__file__}, not the package in {measured}")
    from trioherd._config import make_config
    from trioherd.apps.asgi import ASGIAdapter
    from trioherd.protocols.httptools import HttptoolsConnection
    from trioherd.protocols.rawstream import EdgeWaiter
    from trioherd.protocols.state import ServerState
    from trioherd.worker.main import _plain_handler

    async def main() -> None:
        state = ServerState(make_config(access_log=False, max_requests_per_connection=0))
        state.edge = EdgeWaiter()
        handle = _plain_handler(state, ASGIAdapter(app, {}), HttptoolsConnection)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(CONNECTIONS)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(state.edge.run)
                nursery.start_soon(state.sweep)
                clients = []
                for _ in range(CONNECTIONS):
                    client = trio.socket.socket()
                    await client.connect(listener.getsockname())
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    server, _ = listener.accept()
                    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    nursery.start_soon(handle, server)
                    clients.append(client)
                await clients[0].send(REQUEST)
                size = len(await clients[0].recv(65536))  # every answer is this long

                async def ask(client: trio.socket.SocketType) -> None:
                    for _ in range(requests):
                        await client.send(REQUEST)
                        got = 0
                        while got < size:
                            data = await client.recv(65536)
                            if not data:
                                raise RuntimeError("the server closed a connection")
                            got += len(data)

                async with trio.open_nursery() as asking:
                    for client in clients:
                        asking.start_soon(ask, client)
                for client in clients:
                    client.close()
                nursery.cancel_scope.cancel()

    trio.run(main)


def count(package: Path, requests: int) -> int:
    """Instructions of a whole run serving ``requests`` per connection."""
    env = {
        **os.environ,
        "PYTHONPATH": str(package),
        "PYTHONHASHSEED": "0",
        "TRIOHERD_MEASURED": str(package),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cachegrind.out"
        result = subprocess.run(
            [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                f"--cachegrind-out-file={out}",
                sys.executable,
                __file__,
                "--serve",
                str(requests),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    found = re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)
    if result.returncode != 0 or found is None:
        sys.exit(f"valgrind run failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve_and_ask(int(sys.argv[2]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    package = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else BENCH.parent
    if not (package / "trioherd").is_dir():
        sys.exit(f"no trioherd package in {package}")
    per_request = (count(package, MANY) - count(package, FEW)) / (CONNECTIONS * (MANY - FEW))
    print(f"{package}: {per_request:,.0f} instructions per keep-alive request")


if __name__ == "__main__":
    main()
