"""Record what a herd answers to a fixed set of exchanges, to compare two versions byte for byte.

A restructure must not change a byte on the wire. This script serves a few apps (native,
ASGI, WebSocket echo), each with ``--http h11`` and ``--http httptools``, sends each the
same inputs on fresh connections (sent, half-closed, read to the end) and writes every
answer to a JSON file, with what legitimately varies masked (the Date header, a worker's
pid). Run it on two checkouts and compare the files:

    python bench/exchanges.py /tmp/before.json                       # on the old commit
    python bench/exchanges.py /tmp/after.json && cmp /tmp/before.json /tmp/after.json

``PYTHONPATH`` decides which trioherd is served (the checkout's root comes first when
run from it: ``PYTHONPATH=. python bench/exchanges.py ...``). The inputs: the parser
corpus of tests/test_http_parsers.py, 300 request-like byte strings from a seeded
generator (the shapes of tests/test_http_fuzz.py), the test apps' endpoints (bodies,
chunked, 100-continue, errors, streaming), and WebSocket sessions (text, binary,
fragments, ping, close, a protocol error) with fixed masking keys.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))
sys.path.append(str(ROOT))  # after PYTHONPATH: the trioherd it names is the one recorded

from test_http_parsers import CORPUS  # noqa: E402

MASKS = [
    (re.compile(rb"(?im)^date: [^\r\n]*\r\n"), b"date: -\r\n"),
    (re.compile(rb"(?im)^x-pid: [^\r\n]*\r\n"), b"x-pid: -\r\n"),
]

ENDPOINTS = [
    b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n"
    b"abcdGET /echo HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /stream HTTP/1.0\r\n\r\n",
    b"HEAD /stream HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999999\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /echo HTTP/1.1\r\nHost: t\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n",
    b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
]

APPS = [
    ("apps.request_echo:app", CORPUS),
    ("apps.http_apps:native", ENDPOINTS),
    ("apps.http_apps:asgi", ENDPOINTS),
]
WS_APPS = ["apps.ws_apps:native", "apps.ws_apps:asgi", "examples.websocket_echo:app"]


def request_like(rng: random.Random) -> bytes:
    """One of tests/test_http_fuzz.py's shapes, from a seeded generator."""
    pick = rng.choice
    line_end = pick([b"\r\n", b"\n", b"\r", b""])
    head = pick([b"GET", b"POST", b"HEAD", b"", b"get", b"G\x00T"]) + b" "
    head += pick([b"/", b"/echo", b"*", b"http://x/", b"", b"/\xff"]) + b" "
    head += pick([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"", b"http/1.1"]) + line_end
    for _ in range(rng.randint(0, 5)):
        name = pick([b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"X-A", b""])
        value = pick([b"1", b"-1", b"chunked", b"100-continue", b"close", b"a\rb", b"7"])
        head += name + b": " + value + pick([b"\r\n", b"\n", b""])
    return head + line_end + rng.randbytes(rng.randint(0, 40))


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return read_to_end(sock)


def read_to_end(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        received += b"<reset>"
    return received


KEY = b"\x01\x02\x03\x04"


def frame(opcode: int, payload: bytes, fin: bool = True, key: bytes = KEY) -> bytes:
    """A client frame (masked, as RFC 6455 asks of clients), with a fixed key."""
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


WS_SESSIONS = [
    frame(1, b"hello") + frame(2, b"\x00\x01" * 100) + frame(1, b"x" * 70000),
    frame(1, b"frag", fin=False) + frame(9, b"ping!") + frame(0, b"ment"),
    frame(1, b"\xff\xfe"),  # not UTF-8: 1007
    frame(0x3, b"reserved"),  # an unknown opcode: 1002
    frame(1, b"bye") + frame(8, struct.pack("!H", 1000) + b"done"),
    b"",  # only the handshake, then the client's FIN
]


def websocket(port: int, path: str, session: bytes) -> bytes:
    key = base64.b64encode(b"0123456789abcdef")
    head = (
        f"GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key.decode()}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk
        try:
            sock.sendall(session + frame(8, struct.pack("!H", 1000)))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return answer + read_to_end(sock)


@contextmanager
def herd(app: str, parser: str) -> Iterator[int]:
    env = dict(os.environ, TRIOHERD_HTTP=parser)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", str(ROOT)), str(ROOT)])
    command = [sys.executable, "-m", "trioherd", "serve", app, "--workers", "1"]
    command += ["--bind", "127.0.0.1:0", "--log-level", "critical"]
    command += ["--name", f"exchanges-{os.getpid()}"]
    # not run from the checkout: ``-m`` would put the working directory's trioherd first
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=env, cwd=tempfile.gettempdir())
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        for line in process.stderr:
            if line.startswith(b"trioherd: listening on "):
                yield int(line.rsplit(b":", 1)[1])
                break
            assert time.monotonic() < deadline, "the herd did not start"
        else:
            raise SystemExit(f"{app} exited {process.wait()}")
    finally:
        process.terminate()
        process.wait(60)


def mask(data: bytes) -> str:
    for pattern, replacement in MASKS:
        data = pattern.sub(replacement, data)
    return data.decode("latin-1")


def record() -> dict[str, list[list[str]]]:
    rng = random.Random(23)
    fuzz = [request_like(rng) for _ in range(300)]
    answers: dict[str, list[list[str]]] = {}
    for parser in ("h11", "httptools"):
        for app, inputs in [*APPS, ("apps.request_echo:app", fuzz)]:
            with herd(app, parser) as port:
                key = f"{parser} {app} {len(inputs)}"
                answers[key] = [[mask(data), mask(exchange(port, data))] for data in inputs]
        for app in WS_APPS:
            with herd(app, parser) as port:
                answers[f"{parser} {app} ws"] = [
                    [mask(session), mask(websocket(port, "/echo", session))]
                    for session in WS_SESSIONS
                ]
    return answers


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    import trioherd

    print(f"recording with {trioherd.__file__}", file=sys.stderr)  # the workers' too
    Path(sys.argv[1]).write_text(json.dumps(record(), indent=1, sort_keys=True))
