"""Reference server for bench/run.sh: a bare trio + h11 loop, no supervision.

This is the "what does trio + h11 cost by itself" baseline of the performance
targets in DESIGN.md. It is deliberately minimal, but not naive:

- one task per connection (``trio.serve_tcp`` / ``trio.serve_listeners``), no task
  per request;
- one ``h11.Connection`` per connection, reused across keep-alive requests
  (``start_next_cycle``), pipelined requests are served from the buffer;
- one ``send_all`` per response, receives of 64 KiB;
- TCP_NODELAY on every connection (trio's ``SocketStream`` sets it);
- the ``Date`` header formatted once per second.

It serves the same 13-byte "Hello, World!" as bench/hello_app.py, but writes it
directly: there is NO ASGI layer here (no scope dict, no send/receive
callables), so it is a slightly optimistic reference for an ASGI server. It has
no timeouts, no limits beyond h11's defaults, no logging and no worker
supervision: a worker that dies stays dead.

Usage:
    python bench/bare_trio_h11.py --port 8000                # one process
    python bench/bare_trio_h11.py --port 8000 --workers 2    # fork 2 after bind

With ``--workers N`` (N > 1) the listening socket is bound once, then N children
are forked *before* trio is started; each child runs its own ``trio.run`` on the
shared socket (the kernel hands connections to whichever child accepts). The
parent only waits, forwarding SIGTERM/SIGINT to the children.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from email.utils import formatdate
from functools import partial
from typing import Any

import h11
import trio

BODY = b"Hello, World!"
RECEIVE_SIZE = 64 * 1024
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_date_second = -1
_date_value = b""


def _date_header() -> bytes:
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = formatdate(now, usegmt=True).encode("ascii")
    return _date_value


def _response_bytes(conn: h11.Connection) -> bytes:
    headers = [
        (b"content-type", b"text/plain"),
        (b"content-length", b"13"),
        (b"date", _date_header()),
        (b"server", b"bare-trio-h11"),
    ]
    out = conn.send(h11.Response(status_code=200, headers=headers)) or b""
    out += conn.send(h11.Data(data=BODY)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out


def _error_bytes(conn: h11.Connection, status: int) -> bytes:
    headers = [(b"content-length", b"0"), (b"connection", b"close")]
    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out


async def handle_connection(stream: trio.SocketStream) -> None:
    """Serve one connection until either side closes it. Never raises for I/O errors:
    an exception escaping a ``serve_listeners`` handler would stop the whole server."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
            elif type(event) is h11.EndOfMessage:
                # The request (and any body, ignored) is complete: answer it.
                await stream.send_all(_response_bytes(conn))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # MUST_CLOSE / "Connection: close"
                conn.start_next_cycle()
            elif type(event) is h11.ConnectionClosed or event is h11.PAUSED:
                return
            # h11.Request and h11.Data: nothing to do until EndOfMessage.
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                await stream.send_all(_error_bytes(conn, exc.error_status_hint))
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    # serve_listeners closes the stream after the handler returns.


async def _serve(start_listening: Callable[..., Any], announce: bool) -> None:
    """Serve until SIGTERM or SIGINT, then exit cleanly (open connections are cut)."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(start_listening)
            if announce:
                host, port = listeners[0].socket.getsockname()[:2]
                print(f"bare_trio_h11: listening on http://{host}:{port}", file=sys.stderr)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _run_single(host: str, port: int) -> int:
    trio.run(_serve, partial(trio.serve_tcp, handle_connection, port, host=host), True)
    return 0


def _child(sock: socket.socket) -> int:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    trio.run(_serve, partial(trio.serve_listeners, handle_connection, [listener]), False)
    return 0


def _run_forked(host: str, port: int, workers: int, backlog: int) -> int:
    sock = socket.create_server((host, port), backlog=backlog)  # SO_REUSEADDR set
    real_host, real_port = sock.getsockname()[:2]
    # Block the stop signals while forking so that neither a child nor the parent
    # (whose forwarding handlers are not installed yet) dies half-set-up.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(sock)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    sock.close()  # only the children accept

    alive = set(children)
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in list(alive):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    for signum in STOP_SIGNALS:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    print(
        f"bare_trio_h11: listening on http://{real_host}:{real_port} "
        f"({workers} forked workers, pids {' '.join(map(str, children))})",
        file=sys.stderr,
    )

    exit_code = 0
    for _ in range(len(children)):  # one wait per child
        pid, status = os.wait()
        alive.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print(f"bare_trio_h11: worker {pid} exited with {code}", file=sys.stderr)
            if not stopping:
                exit_code = 1
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers == 1:
        return _run_single(args.host, args.port)
    return _run_forked(args.host, args.port, args.workers, args.backlog)


if __name__ == "__main__":
    sys.exit(main())
