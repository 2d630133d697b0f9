"""WSGI apps for tests/test_wsgi.py: plain PEP 3333 callables, one wrapped in wsgiref's
validator, and apps that block, stream and close on cue.

Cues cross between the test and the worker through files: a view that waits for a
``gate`` polls for the file to exist (at most 30 s), and one that reports an event
(``mark``) creates a file the test waits for. Paths come in the query string.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs
from wsgiref.validate import validator

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

# what the echo app reports of its environ
KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "HTTP_HOST",
    "HTTP_X_MULTI",
    "HTTP_COOKIE",
    "HTTP_X_UNDER_SCORE",
    "wsgi.url_scheme",
    "wsgi.multithread",
    "wsgi.multiprocess",
    "wsgi.run_once",
    "wsgi.version",
    "wsgi.input_terminated",
)


def _query(environ: Environ) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def _mark(path: str | None, text: str = "") -> None:
    if path:
        with open(path + ".tmp", "w") as file:
            file.write(text)
        os.replace(path + ".tmp", path)


def _text(start_response: StartResponse, body: str, status: str = "200 OK") -> list[bytes]:
    data = body.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


class Closing:
    """A response iterable whose close() is recorded in a file (``mark``), and which may
    fail (``fail``) or wait (``gate``) after its first chunk."""

    def __init__(self, query: dict[str, str]) -> None:
        self.query = query
        self.produced = 0  # pieces of 64 KiB yielded

    def __iter__(self) -> Iterator[bytes]:
        yield b"first\n"
        if "gate" in self.query:
            _wait_for(self.query["gate"])
        if "fail" in self.query:
            raise RuntimeError("the body failed on purpose")
        for _ in range(int(self.query.get("more", "0"))):
            yield b"x" * 65536
            self.produced += 1
        yield b"last\n"

    def close(self) -> None:
        _mark(self.query.get("mark"), f"closed after {self.produced}")


def app(environ: Environ, start_response: StartResponse) -> Any:
    """The plain test app; the path says what it does."""
    path = environ["PATH_INFO"]
    query = _query(environ)
    view = VIEWS.get(path) or (_echo if "echo" in path else None)
    if view is not None:
        return view(environ, start_response, query)
    return _text(start_response, "Hello, WSGI!")


def _echo(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    info = {key: environ.get(key) for key in KEYS}
    info["body"] = _read_all(environ["wsgi.input"]).decode("latin-1")
    info["thread"] = threading.current_thread().name
    return _text(start_response, json.dumps(info), "200 OK")


def _read_all(stream: Any) -> bytes:
    """The whole body, by read(n) (wsgiref's validator allows no read() without size)."""
    parts = []
    while piece := stream.read(65536):
        parts.append(piece)
    return b"".join(parts)


def _reads(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    """The body read every way PEP 3333 allows: read(n), readline(), readline(n),
    readlines() and iteration; what each call returned, in order."""
    stream = environ["wsgi.input"]
    calls: list[list[Any]] = []
    calls.append(["read", 5, stream.read(5).decode()])
    calls.append(["readline", None, stream.readline().decode()])
    calls.append(["readline", 3, stream.readline(3).decode()])
    calls.append(["readlines", 1, [line.decode() for line in stream.readlines(1)]])
    calls.append(["iter", None, [line.decode() for line in stream]])
    calls.append(["read", None, stream.read().decode()])
    return _text(start_response, json.dumps(calls))


def _count(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    """Reads the body in pieces of 64 KiB, counting: it is never held whole."""
    total = 0
    stream = environ["wsgi.input"]
    while piece := stream.read(65536):
        total += len(piece)
    return _text(start_response, str(total))


def _ignore_body(environ: Environ, start_response: StartResponse, q: dict[str, str]) -> Any:
    return _text(start_response, "not read")


def _stream(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    """A generator: the first chunk, then the rest once ``gate`` exists."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"before the gate\n"
    _wait_for(query["gate"])
    yield b""  # an empty chunk is skipped
    yield b"after the gate\n"


def _closing(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Closing(query)


def _write(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    """The write() callable, then an iterable."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    write(b"twice ")
    return [b"then returned"]


def _file(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    """wsgi.file_wrapper over the file ``path`` (from ``offset``; ``length`` declared)."""
    handle = open(query["path"], "rb")  # closed by the wrapper's close()
    handle.seek(int(query.get("offset", "0")))
    headers = [("Content-Type", "application/octet-stream")]
    if "length" in query:
        headers.append(("Content-Length", query["length"]))
    start_response("200 OK", headers)
    if "mark" in query:
        handle = CountingFile(handle, query["mark"])
    return environ["wsgi.file_wrapper"](handle, 8192)


class CountingFile:
    """A file that counts its read() calls and reports them when closed (``mark``): a
    file sent by sendfile is never read by Python."""

    def __init__(self, handle: Any, mark: str) -> None:
        self.handle = handle
        self.mark = mark
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        data: bytes = self.handle.read(size)
        return data

    def close(self) -> None:
        self.handle.close()
        _mark(self.mark, f"closed reads={self.reads}")


def _block(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    """Marks that it started (``mark``), then blocks its thread until ``gate`` exists."""
    _mark(query.get("mark"), threading.current_thread().name)
    _wait_for(query["gate"])
    return _text(start_response, "unblocked")


def _sleep(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    _mark(query.get("mark"))
    time.sleep(float(query.get("s", "1")))
    return _text(start_response, "slept")


def _boom(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    raise ValueError("the WSGI app failed on purpose")


def _twice(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    start_response("200 OK", [])
    start_response("404 Not Found", [])  # no exc_info: a misuse
    return [b"never sent"]


def _exc_info(environ: Environ, start_response: StartResponse, query: dict[str, str]) -> Any:
    """The error page of PEP 3333's example: start_response again, with exc_info, before
    anything was sent; ``late``: after the head went out (it must re-raise)."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    if "late" in query:
        write(b"partial")
    try:
        raise KeyError("lookup failed")
    except KeyError:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"error page"]


def _bad_status(environ: Environ, start_response: StartResponse, q: dict[str, str]) -> Any:
    start_response("OK", [])
    return [b""]


def _str_body(environ: Environ, start_response: StartResponse, q: dict[str, str]) -> Any:
    start_response("200 OK", [])
    return ["text, not bytes"]


def _short(environ: Environ, start_response: StartResponse, q: dict[str, str]) -> Any:
    """Declares 100 bytes, sends 10 in pieces: the connection must end unfinished."""
    start_response("200 OK", [("Content-Length", "100")])
    yield b"12345"
    yield b"67890"


def _errors(environ: Environ, start_response: StartResponse, q: dict[str, str]) -> Any:
    environ["wsgi.errors"].write("a line for wsgi.errors\n")
    environ["wsgi.errors"].flush()
    return _text(start_response, "logged")


VIEWS: dict[str, Callable[[Environ, StartResponse, dict[str, str]], Any]] = {
    "/echo": _echo,
    "/reads": _reads,
    "/count": _count,
    "/ignore": _ignore_body,
    "/stream": _stream,
    "/closing": _closing,
    "/write": _write,
    "/file": _file,
    "/block": _block,
    "/sleep": _sleep,
    "/boom": _boom,
    "/twice": _twice,
    "/exc_info": _exc_info,
    "/bad_status": _bad_status,
    "/str_body": _str_body,
    "/short": _short,
    "/errors": _errors,
}

# wsgiref's validator checks both sides of every call: the environ we build, how we call
# start_response's result and the iterable, that close() is called. Its failures are
# AssertionErrors in the worker's thread: a 500 and a traceback in the log.
validated = validator(app)


class Handler:
    """An object whose __call__ is the WSGI app (as Flask's and Django's are)."""

    def __call__(self, environ: Environ, start_response: StartResponse) -> Any:
        return _text(start_response, "from an object")


handler = Handler()


async def async_two(environ: Environ, start_response: StartResponse) -> Any:
    """Two parameters, but async def: no WSGI app (--interface wsgi refuses it)."""
    return []
