"""The WSGI interface (PEP 3333): ``def app(environ, start_response)``, each request in a
thread of the worker's pool (``--threads``; ``apps.threadpool``).

:class:`WSGIAdapter` builds the request's ``environ`` in the event loop, then runs the app
in a thread. What only the event loop may do, the thread asks of the connection's task
(``Job.call``): read a piece of the body (``wsgi.input``, streamed from the socket as the
app reads it, with the body limit and 100-continue), send the head and each piece of body
as the app produces it (the thread waits until the piece is written: back-pressure). A
body known in full when the app returns (a list, or a first piece as long as the declared
``Content-Length``) goes out with its head in one send, as a native app's does, and the
thread does not wait for it: it calls ``close()`` meanwhile. ``close()`` of what the app
returned is called in the app's thread whatever happens: also after an error, or when the
client went away (then a call back fails, and the iteration stops).

``wsgi.file_wrapper`` (:class:`~.wsgi_io.FileWrapper`): a regular file on a plain
connection is sent by the kernel (``os.sendfile``, from the app's thread, which waits for
the socket through the event loop); under TLS it is read and sent in blocks of
``COPY_BLOCK``.

Errors: an exception (or a misuse of ``start_response``) before the head is sent is a 500
and one log line with the traceback (``protocols.http1``); after it, the connection is
closed, and no half-framed body is finished.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from ..protocols.closing import reset_on_close
from ..protocols.framing import Fields, InvalidResponse
from ..protocols.h1core import ClientGone, Exchange
from ..protocols.http1 import BodyReader, HTTPConnection
from ..protocols.rawstream import RawSocketStream
from ..protocols.state import ServerState
from .threadpool import Job, ThreadPool
from .wsgi_io import FileWrapper, InputStream

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

COPY_BLOCK = 256 * 1024
"""Bytes read from a wrapped file at a time when it cannot go by sendfile (TLS)."""

# environ keys of request header names (HTTP_ACCEPT, CONTENT_TYPE): the same few come again
# and again (bounded: emptied when full). A name with "_" maps to "": dropped, since
# Some_Header and Some-Header would both be HTTP_SOME_HEADER (gunicorn, nginx: the same)
_KEYS: dict[bytes, str] = {}
_KEYS_MAX = 512
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}


class WSGIError(Exception):
    """The app broke a rule of PEP 3333 (start_response misused, a body that is not bytes)."""


def _environ_key(name: bytes) -> str:
    text = name.decode("latin-1")
    if "_" in text:
        key = ""
    elif text == "content-type":
        key = "CONTENT_TYPE"
    elif text == "content-length":
        key = "CONTENT_LENGTH"
    else:
        key = "HTTP_" + text.upper().replace("-", "_")
    if len(_KEYS) >= _KEYS_MAX:
        _KEYS.clear()
    _KEYS[name] = key
    return key


def status_code(status: Any) -> int:
    """The code of a WSGI status line (``"200 OK"``); WSGIError if it is not one."""
    if (
        type(status) is not str
        or len(status) < 3
        or not (status[:3].isascii() and status[:3].isdigit())
        or (len(status) > 3 and status[3] != " ")
    ):
        raise WSGIError(f"start_response: invalid status {status!r} (expected '200 OK')")
    return int(status[:3])


def header_fields(headers: Any) -> tuple[Fields, int | None]:
    """The app's response headers as bytes pairs, and the Content-Length it declared."""
    if not isinstance(headers, list | tuple):
        raise WSGIError(f"start_response: headers must be a list of (str, str), not {headers!r}")
    fields: Fields = []
    length = None
    for pair in headers:
        try:
            name, value = pair
            fields.append((name.encode("latin-1"), value.encode("latin-1")))
        except (ValueError, TypeError, AttributeError, UnicodeEncodeError):
            raise WSGIError(f"start_response: invalid header {pair!r}") from None
        if len(name) == 14 and name.lower() == "content-length" and value.isdigit():
            length = int(value)
    return fields, length


class WSGIAdapter:
    """Serves a WSGI app; one per worker (see ``protocols.http1.Adapter``)."""

    __slots__ = ("app", "base", "pool", "root_path", "send_timeout", "state")

    def __init__(self, app: WSGIApp, state: ServerState) -> None:
        config = state.config
        self.app = app
        self.state = state
        self.pool = ThreadPool(config.threads)
        self.root_path = (config.root_path or "").rstrip("/")
        self.send_timeout = _timeval(config.send_timeout)  # SO_SNDTIMEO of a sendfile
        # what every request's environ holds the same
        self.base: dict[str, Any] = {
            "SCRIPT_NAME": self.root_path,
            "wsgi.version": (1, 0),
            "wsgi.errors": sys.stderr,  # the worker's: each line tagged, or JSON (_log)
            "wsgi.multithread": config.threads > 1,
            # another process may run the app at the same time: more workers, or the
            # successor of this one during a rolling reload
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,  # read() ends with the body, chunked too
        }

    async def __call__(self, http: HTTPConnection, request: Exchange) -> int:
        call = WSGICall(self, http, request)
        result = await call.job.run(call.serve)
        if call.sent:  # by sendfile, from the thread
            self.state.stats.bytes_out += call.sent
        if call.job.failure is not None:  # what the connection met, even if the app went on
            raise call.job.failure
        result.unwrap()  # the app's exception, if any
        return call.status

    def environ(
        self, http: HTTPConnection, request: Exchange, body: InputStream
    ) -> dict[str, Any]:
        """The request's environ (PEP 3333)."""
        environ = self.base.copy()
        raw_path, _, query = request.target.partition(b"?")
        path = (unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path).decode("latin-1")
        root = self.root_path
        if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
            path = path[len(root) :]
        method = request.method
        environ["REQUEST_METHOD"] = _METHODS.get(method) or method.decode("latin-1")
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query.decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/1.1" if request.http_version == b"1.1" else "HTTP/1.0"
        server = http.server
        if server is not None:
            environ["SERVER_NAME"] = server[0]
            environ["SERVER_PORT"] = str(server[1])
        else:  # a Unix socket
            environ["SERVER_NAME"] = "localhost"
            environ["SERVER_PORT"] = "443" if http.tls is not None else "80"
        client = request.client  # after a trusted proxy's forwarded headers or PROXY header
        if client is not None:
            environ["REMOTE_ADDR"] = client[0]
            environ["REMOTE_PORT"] = str(client[1])
        environ["wsgi.url_scheme"] = request.scheme
        environ["wsgi.input"] = body
        if http.tls is not None:
            environ["trioherd.tls"] = http.tls
        keys = _KEYS
        for name, value in request.headers:
            key = keys.get(name)
            if key is None:
                key = _environ_key(name)
            if not key:
                continue
            text = value.decode("latin-1")
            if key in environ:  # a repeated field: one value (RFC 9110 5.3)
                environ[key] += ("; " if key == "HTTP_COOKIE" else ",") + text
            else:
                environ[key] = text
        return environ


class WSGICall:
    """One request of a WSGI app: its environ and ``start_response`` (used in the app's
    thread) and the sends the thread asks of the connection's task (``_loop_*``)."""

    __slots__ = (
        "app",
        "code",
        "complete",
        "environ",
        "fields",
        "head_sent",
        "http",
        "job",
        "length",
        "reader",
        "send_timeout",
        "sent",
        "status",
    )

    def __init__(self, adapter: WSGIAdapter, http: HTTPConnection, request: Exchange) -> None:
        self.app = adapter.app
        self.http = http
        self.job = Job(adapter.pool)
        self.reader = None if request.bodyless else BodyReader(http)
        self.environ = adapter.environ(http, request, InputStream(self.job, self.reader))
        # the thread's: what start_response was given, and what it sent
        self.code: int | None = None
        self.fields: Fields = []
        self.length: int | None = None  # the Content-Length the app declared
        self.head_sent = False
        self.complete = False  # the whole response was handed over
        self.sent = 0  # bytes sent by sendfile
        self.send_timeout = adapter.send_timeout
        self.status = 0  # the event loop's: the status of the head it sent

    # -- in the app's thread -------------------------------------------------------

    def serve(self) -> None:
        """Call the app, send what it returns, and close it."""
        result = self.app(self.environ, self.start_response)
        try:
            self._respond(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.head_sent:  # too late to answer otherwise: the app's error goes on
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.code is not None:
            raise WSGIError("start_response called a second time without exc_info")
        code = status_code(status)
        self.fields, self.length = header_fields(headers)
        self.code = code
        return self.write

    def write(self, data: bytes) -> None:
        """The ``write()`` callable: sent before it returns."""
        data = _as_bytes(data)
        if self.complete:
            raise InvalidResponse("body longer than its content-length")
        if not self.head_sent:
            self._start(data)
        elif data:
            self.job.call(self._loop_body, data)

    def _respond(self, result: Iterable[bytes]) -> None:
        if not self.head_sent:
            if type(result) is list:  # the usual whole body: one send with the head
                self._finish(result)
                return
            if type(result) is FileWrapper:
                result = self._send_file(result)
                if not result:
                    return
        for chunk in result:
            if type(chunk) is not bytes:
                chunk = _as_bytes(chunk)
            if not chunk:
                continue
            if self.complete:
                raise InvalidResponse("body longer than its content-length")
            if self.head_sent:
                self.job.call(self._loop_body, chunk)
            elif self.length == len(chunk):  # all of it
                self._finish([chunk])
            else:
                self._start(chunk)
        if not self.head_sent:
            self._finish([])
        elif not self.complete:
            self.job.post(self._loop_end)

    def _checked_code(self) -> int:
        if self.code is None:
            raise WSGIError("the app sent a body before it called start_response")
        return self.code

    def _finish(self, body: list[bytes]) -> None:
        """The whole response: handed over, not waited for."""
        code = self._checked_code()
        try:
            data = b"".join(body)
        except TypeError:
            for item in body:
                _as_bytes(item)  # names the first piece that is no bytes
            raise
        self.head_sent = self.complete = True
        self.job.post(self._loop_complete, code, self.fields, data)

    def _start(self, data: bytes) -> None:
        """The head and the first piece of a body sent as it comes."""
        code = self._checked_code()
        self.head_sent = True
        self.job.call(self._loop_head, code, self.fields, data)

    def _send_file(self, wrapper: FileWrapper) -> Iterable[bytes]:
        """A wrapped file: a regular one with a descriptor is sent by the kernel on a plain
        connection (nothing left to iterate), else read in blocks of COPY_BLOCK (which
        are returned), with its length as Content-Length when the app declared none."""
        filelike = wrapper.filelike
        try:
            fd = filelike.fileno()
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode):
                return wrapper.blocks(COPY_BLOCK)
            offset = filelike.tell() if hasattr(filelike, "tell") else os.lseek(fd, 0, 1)
        except (AttributeError, OSError, ValueError):
            return wrapper.blocks(COPY_BLOCK)
        left = max(0, found.st_size - offset)
        if self.length is None:
            self.length = left
            self.fields.append((b"content-length", b"%d" % left))
        elif self.length > left:
            raise InvalidResponse(f"content-length {self.length}, but the file has {left} left")
        if not isinstance(self.http.stream, RawSocketStream):
            return wrapper.blocks(COPY_BLOCK, self.length)
        self._sendfile(fd, offset, self.length)
        return ()

    def _sendfile(self, fd: int, offset: int, length: int) -> None:
        """The head through the event loop, then the file by the kernel from this thread,
        as gunicorn does it: on a descriptor of the socket's own (``_loop_sendfile_head``),
        blocking for the time of the file, so that one sendfile sends it all while the
        kernel waits for the client (no wake-up of this thread or the event loop each time
        the socket fills), for at most --send-timeout without progress."""
        out = self.job.call(self._loop_sendfile_head, self._checked_code(), self.fields, length)
        self.head_sent = self.complete = True
        if out < 0:  # no body (HEAD, 204, 304)
            return
        sock = socket.socket(fileno=out)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self.send_timeout)
            os.set_blocking(out, True)
            while length:
                try:
                    sent = os.sendfile(out, fd, offset, length)
                except BlockingIOError:  # --send-timeout passed without progress
                    self.job.call(self._loop_send_timeout)
                    continue
                except OSError as exc:
                    raise ClientGone() from exc
                if not sent:
                    raise InvalidResponse("the file ended before its content-length")
                offset += sent
                length -= sent
                self.sent += sent
        finally:  # the socket is the event loop's again
            with contextlib.suppress(OSError):
                os.set_blocking(out, False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _NO_TIMEOUT)
            sock.close()

    # -- in the connection's task (the thread's calls back) ---------------------------

    async def _loop_complete(self, code: int, fields: Fields, body: bytes) -> None:
        self.status = code
        await self.http.send_complete(code, fields, body)

    async def _loop_head(self, code: int, fields: Fields, data: bytes) -> None:
        http = self.http
        self.status = code
        head = http.head(code, fields, None)
        await http.send(head + http.framing.body(data))

    async def _loop_body(self, data: bytes) -> None:
        framed = self.http.framing.body(data)
        if framed:
            await self.http.send(framed)

    async def _loop_end(self) -> None:
        end = self.http.framing.end()
        if end:
            await self.http.send(end)

    async def _loop_sendfile_head(self, code: int, fields: Fields, length: int) -> int:
        """Send the head of a file sent by sendfile: the socket's fd, or -1 if no body
        follows."""
        http = self.http
        self.status = code
        await http.send(http.head(code, fields, length))
        stream = http.stream
        if not http.framing.wants_body() or not isinstance(stream, RawSocketStream):
            return -1
        # the thread's own descriptor: if this task is cancelled and closes the socket,
        # the thread's calls still reach this socket, never one that took its number
        return os.dup(stream.socket.fileno())

    async def _loop_send_timeout(self) -> None:
        """The client took none of a file for --send-timeout: cut, as any send would be
        (counted, logged, and reset at the close)."""
        http = self.http
        http.state.cut("send_timeout", http.peer)
        reset_on_close(http.stream)
        raise ClientGone()


_NO_TIMEOUT = struct.pack("ll", 0, 0)


def _timeval(seconds: float) -> bytes:
    """SO_SNDTIMEO's struct timeval."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def _as_bytes(data: Any) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise WSGIError(f"the app's body must be bytes, not {type(data).__name__}")
