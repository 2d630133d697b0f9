"""``--http httptools``: llhttp (Node.js's parser, through httptools) reads the head of a
request without a body; h11 reads everything else, so every answer stays h11's.

The head of a GET is most of what a server parses, and where h11 costs most: llhttp reads
it an order of magnitude faster (docs/performance.md, "Figures behind the code"). What depends on
details is left to h11, read exactly as with ``--http h11``: a body (Content-Length,
Transfer-Encoding: framing, limits, 100-continue, the smuggling guards), Upgrade and
CONNECT, a head that arrived in pieces, and any head llhttp refuses or that is outside
the plain profile below. A request h11 reads is parsed by h11 from its first byte.

The plain profile, checked before a head is taken from llhttp:
- the whole head is in the bytes received, and all of them are ASCII;
- the request line matches h11's grammar (method token, target of visible characters,
  single spaces, version 1.0 or 1.1; our own regex, which also gives the three parts);
- for HTTP/1.1 a Host header exactly once, for 1.0 at most once (h11's rule);
- no Content-Length, Transfer-Encoding, Expect or Upgrade header.
Header values lose trailing white space (llhttp keeps it, h11 strips it). Anything llhttp
refuses goes to h11 for the answer (a 400 with h11's message, or a request h11 accepts:
llhttp refuses unknown methods, and versions other than 0.9, 1.0, 1.1 and 2.0).
tests/unit/test_httptools.py holds the two parsers to the same result on generated heads.
"""

from __future__ import annotations

import re
from typing import Any

import h11
import httptools

from .framing import Fields
from .h1core import H1Core, Parser
from .http1 import HTTPConnection

_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+) ([\x21-\x7e]+) HTTP/(1\.[01])\r\n")
_H11_ONLY = frozenset((b"content-length", b"transfer-encoding", b"expect", b"upgrade"))
_END = h11.EndOfMessage()


class Head:
    """A request head llhttp read: what an adapter reads of h11's Request. It also stands
    where h11's parser would be after a whole request without a body: done, holding the
    bytes received after it (see H1Core.next_request)."""

    __slots__ = ("headers", "http_version", "method", "target", "trailing_data")
    their_state = h11.DONE
    they_are_waiting_for_100_continue = False

    def __init__(
        self, method: bytes, target: bytes, http_version: bytes, headers: Fields, rest: bytes
    ) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.trailing_data = (rest, False)

    def next_event(self) -> h11.EndOfMessage:
        return _END

    def receive_data(self, data: bytes) -> None:
        """Never called: a head llhttp reads has no body to receive."""
        raise RuntimeError("a request read by llhttp has no body")


_WAITING = Head(b"", b"", b"", [], b"")  # no byte of the next request has reached a parser yet


class _Fields:
    """llhttp's callbacks: the header fields of one head."""

    __slots__ = ("complete", "h11_only", "headers", "hosts")

    def __init__(self) -> None:
        self.headers: Fields = []
        self.hosts = 0
        self.h11_only = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _H11_ONLY:
            self.h11_only = True
        elif name == b"host":
            self.hosts += 1
        self.headers.append((name, value.rstrip(b" \t")))

    def on_message_complete(self) -> None:
        self.complete = True


class HttptoolsParsing(H1Core):
    """The parser hooks of :class:`~.h1core.H1Core` with llhttp for plain heads (see the
    module docstring); a runtime's connection class takes them first in its bases."""

    __slots__ = ()

    def fresh(self, leftover: bytes) -> Parser:
        self.pending = leftover  # read by next_buffered
        return _WAITING  # stands in for the parts we read

    def next_buffered(self) -> Any:
        data, self.pending = self.pending, b""
        return self.feed(data)

    def feed(self, data: bytes) -> Any:
        conn = self.conn
        if conn is _WAITING:
            head = plain_head(data)
            if head is not None:
                self.conn = head
                return head
            conn = self.conn = super().fresh(b"")
        conn.receive_data(data)
        return conn.next_event()


class HttptoolsConnection(HttptoolsParsing, HTTPConnection):
    """The Trio runtime's HTTPConnection, reading plain heads with llhttp."""

    __slots__ = ()


def plain_head(data: bytes) -> Head | None:
    """The request whose head starts ``data`` (which also stands for its parser after it,
    with the bytes after the head), if the head is plain; else None: h11's to read."""
    end = data.find(b"\r\n\r\n") + 4
    if end < 4:
        return None
    head = data[:end]
    if not head.isascii():
        return None
    line = _REQUEST_LINE.match(head)
    if line is None:
        return None
    fields = _Fields()
    try:
        httptools.HttpRequestParser(fields).feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None  # refused, or Upgrade / CONNECT
    version = line[3]
    if (
        fields.h11_only
        or not fields.complete
        or fields.hosts > 1
        or (fields.hosts == 0 and version == b"1.1")
    ):
        return None
    return Head(line[1], line[2], version, fields.headers, data[end:])
