"""Run uvicorn with TCP_NODELAY set on every accepted connection.

Usage (same arguments as the ``uvicorn`` command):
    python bench/uvicorn_nodelay.py --http h11 --workers 2 bench.hello_app:app --port 8000

Why: with ``--workers N`` uvicorn binds the socket in the supervisor and the
spawned workers serve on a socket object rebuilt from it, whose ``proto`` is 0.
asyncio only sets TCP_NODELAY on transports whose socket says IPPROTO_TCP
(``asyncio.base_events._set_nodelay``), so those workers leave Nagle on. Against
a keep-alive client that writes its next request only after the full response,
Nagle + delayed ACK stall each response, and uvicorn tops out near 1,400 req/s
regardless of CPU. That measures a socket option, not the server, so the
benchmark patches it in: ``H11Protocol.connection_made`` (and the httptools one,
if installed) set TCP_NODELAY on the transport's socket first, then proceed as
usual.

The patch is applied at import time of this module. uvicorn starts its workers
with multiprocessing's "spawn" method, which re-imports the main module in
every worker (as ``__mp_main__``), so the workers are patched too.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

_REPORTED = False


def _set_nodelay(transport: Any) -> None:
    global _REPORTED
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return
    if not _REPORTED and os.environ.get("BENCH_NODELAY_DEBUG"):
        _REPORTED = True
        print(f"uvicorn_nodelay: TCP_NODELAY set in pid {os.getpid()}", file=sys.stderr)


def _patch(protocol_class: Any) -> None:
    original = protocol_class.connection_made
    if getattr(original, "_bench_nodelay", False):
        return

    def connection_made(self: Any, transport: Any) -> None:
        _set_nodelay(transport)
        original(self, transport)

    connection_made._bench_nodelay = True  # type: ignore[attr-defined]
    protocol_class.connection_made = connection_made


def patch_uvicorn() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    _patch(H11Protocol)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        pass
    else:
        _patch(HttpToolsProtocol)


patch_uvicorn()


if __name__ == "__main__":
    from uvicorn.main import main

    print("uvicorn_nodelay: TCP_NODELAY patched into uvicorn's protocols", file=sys.stderr)
    sys.exit(main())  # click reads sys.argv[1:]
