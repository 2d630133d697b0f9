"""Machine instructions per keep-alive request, counted by valgrind: a measure of our
per-request work that the machine's noise does not move.

    python bench/instructions.py                 # this checkout
    python bench/instructions.py /path/to/other  # another copy of the package (A/B)
    python bench/instructions.py --tls [DIR]     # keep-alive requests over TLS
    python bench/instructions.py --tls-new [DIR] # a new TLS connection per request

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

Over TLS (``--tls``, ``--tls-new``) the worker's own ``_tls_handler`` serves, with a
trustme certificate, and the clients run in a child process that valgrind does not follow
(Python's ssl, one thread per connection): the count is the server's alone, encryption
included. ``--tls``: 32 keep-alive connections, each handshaken once, so the difference
between 20 and 120 requests each is the work of a request on an open TLS connection.
``--tls-new``: every request on a new connection with a full handshake (TLS 1.3, no
resumption, ``Connection: close``), 4 client threads, 10 and 60 connections each: the
work of a connection from its accept to its close_notify.

Needs valgrind (``apt-get install valgrind``) and the package's dependencies with
httptools (``pip install -e '.[httptools]'``); trustme for the TLS modes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CONNECTIONS = 32
FEW, MANY = 20, 120
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
CLOSE_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n"
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


TLS_NEW_CLIENTS = 4
TLS_NEW_FEW, TLS_NEW_MANY = 10, 60


def serve_tls(mode: str, requests: int, certs: str) -> None:
    """The measured process over TLS: serve what a child process of clients asks
    (``mode`` "--tls" or "--tls-new", ``requests`` per client), until it is done."""
    import trio

    sys.path.append(str(BENCH.parent))
    import trioherd
    from bench.hello_app import app

    measured = os.environ.get("TRIOHERD_MEASURED", "")
    if not Path(trioherd.__file__).resolve().is_relative_to(measured):
        sys.exit(f"imported {trioherd.__file__}, not the package in {measured}")
    from trioherd._config import make_config
    from trioherd._tls import server_context
    from trioherd.apps.asgi import ASGIAdapter
    from trioherd.protocols.httptools import HttptoolsConnection
    from trioherd.protocols.rawstream import EdgeWaiter
    from trioherd.protocols.state import ServerState
    from trioherd.worker.main import _tls_handler

    config = make_config(
        access_log=False,
        max_requests_per_connection=0,
        certfile=f"{certs}/cert.pem",
        keyfile=f"{certs}/key.pem",
        keep_alive_timeout=600,
        tls_handshake_timeout=600,
    )

    async def main() -> None:
        state = ServerState(config)
        state.edge = EdgeWaiter()
        handle = _tls_handler(
            state, ASGIAdapter(app, {}), server_context(config), HttptoolsConnection
        )
        with socket.socket() as listener:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the primary's
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
            port = listener.getsockname()[1]
            command = [
                sys.executable,
                __file__,
                "--clients",
                mode,
                str(port),
                str(requests),
                certs,
            ]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(state.edge.run)
                nursery.start_soon(state.sweep)

                async def accept() -> None:
                    while True:
                        await trio.lowlevel.wait_readable(listener)
                        with contextlib.suppress(BlockingIOError):
                            while True:
                                sock, _ = listener.accept()
                                nursery.start_soon(handle, sock)

                nursery.start_soon(accept)
                await trio.run_process(command)  # a child valgrind does not follow
                nursery.cancel_scope.cancel()

    trio.run(main)


def tls_clients(mode: str, port: int, requests: int, certs: str) -> None:
    """The clients of serve_tls, in a process of their own: threads with Python's ssl."""
    import ssl
    import threading

    context = ssl.create_default_context(cafile=f"{certs}/ca.pem")
    failures: list[BaseException] = []

    def keep_alive() -> None:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            for _ in range(requests):
                tls.sendall(REQUEST)
                answer = b""
                while not answer.endswith(b"Hello, World!"):
                    data = tls.recv(65536)
                    if not data:
                        raise RuntimeError("the server closed a connection")
                    answer += data

    def new_connections() -> None:
        for _ in range(requests):
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(CLOSE_REQUEST)
                answer = b""
                while data := tls.recv(65536):
                    answer += data
                if not answer.endswith(b"Hello, World!"):
                    raise RuntimeError(f"unexpected answer {answer[-60:]!r}")

    def run(job: Any) -> None:
        try:
            job()
        except BaseException as exc:
            failures.append(exc)

    job = keep_alive if mode == "--tls" else new_connections
    threads = [
        threading.Thread(target=run, args=(job,))
        for _ in range(CONNECTIONS if mode == "--tls" else TLS_NEW_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        sys.exit(f"a client failed: {failures[0]!r}")


def make_certs(directory: str) -> None:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(f"{directory}/ca.pem")
    Path(directory, "cert.pem").write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    server.private_key_pem.write_to_path(f"{directory}/key.pem")


def count(package: Path, requests: int, mode: str = "", certs: str = "") -> int:
    """Instructions of a whole run serving ``requests`` per connection (over TLS in
    ``mode`` "--tls" or "--tls-new", with the certificates in ``certs``)."""
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
                *(
                    ["--serve-tls", mode, str(requests), certs]
                    if mode
                    else ["--serve", str(requests)]
                ),
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
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "--serve":
        serve_and_ask(int(args[1]))
        return
    if len(args) == 4 and args[0] == "--serve-tls":
        serve_tls(args[1], int(args[2]), args[3])
        return
    if len(args) == 5 and args[0] == "--clients":
        tls_clients(args[1], int(args[2]), int(args[3]), args[4])
        return
    mode = args.pop(0) if args and args[0] in ("--tls", "--tls-new") else ""
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    package = Path(args[0]).resolve() if args else BENCH.parent
    if not (package / "trioherd").is_dir():
        sys.exit(f"no trioherd package in {package}")
    if not mode:
        per_request = (count(package, MANY) - count(package, FEW)) / (CONNECTIONS * (MANY - FEW))
        print(f"{package}: {per_request:,.0f} instructions per keep-alive request")
        return
    with tempfile.TemporaryDirectory() as certs:
        make_certs(certs)
        if mode == "--tls":
            few, many, clients, what = FEW, MANY, CONNECTIONS, "keep-alive request over TLS"
        else:
            few, many, clients = TLS_NEW_FEW, TLS_NEW_MANY, TLS_NEW_CLIENTS
            what = "new TLS connection (full handshake, one request)"
        difference = count(package, many, mode, certs) - count(package, few, mode, certs)
    print(f"{package}: {difference / (clients * (many - few)):,.0f} instructions per {what}")


if __name__ == "__main__":
    main()
