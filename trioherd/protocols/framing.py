"""Response framing, sans I/O: the bytes of an HTTP/1.1 response, and whether the
connection may carry another request after it.

In the manner of h11's ``_body_framing`` and body writers, without h11's per-event
bookkeeping: :class:`ResponseFraming` turns a status and the app's header fields into the
response head (status line, validated fields, ``date``, ``server``, and the framing fields
it chooses: ``content-length``, ``transfer-encoding: chunked``, or neither for a body
delimited by the close), then frames each piece of body and the end. What HTTP/1.1 cannot
carry (a 1xx as the answer, a bad field name or value, a wrong length) raises
:class:`InvalidResponse` before any byte of it is returned.

It also holds the connection's keep-alive decision for the current request: the caller
states it once when the request's head is known (:meth:`ResponseFraming.begin`), the
response can only lower it (the app's ``Connection: close``, a drain, an error), and the
caller reads :attr:`ResponseFraming.keep_alive` after the response to know whether to go on.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import h11

Fields = list[tuple[bytes, bytes]]

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
# h11's rules for field names (a token) and values (no control characters but tab, no
# surrounding white space)
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")

# fields that passed those rules: an app sends the same ones again and again, and a set
# lookup costs a fraction of the two regular expressions (bounded: short values only, and
# emptied when full)
_CHECKED: set[tuple[bytes, bytes]] = set()
_CHECKED_MAX = 4096
_CHECKED_VALUE_MAX = 256

_date_second = 0
_date_value = b""

# whole responses' heads, by what makes them (see ResponseFraming.complete): an app answers
# with the same status and fields again and again, and building the head was most of the
# cost of framing it. Emptied when the date changes (every head holds it) and when full.
_HEADS: dict[tuple[Any, ...], tuple[bytes, bool, bool, int | None, bool, bytes | None]] = {}
_HEADS_MAX = 256


class InvalidResponse(Exception):
    """The app asked for a response HTTP cannot carry (a bad header, a wrong length)."""


def check_field(name: bytes, value: bytes) -> None:
    """Raise InvalidResponse unless ``name`` is a token and ``value`` has no control
    character and no white space at either end (RFC 9110 5.1, 5.5)."""
    if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
        raise InvalidResponse(f"invalid response header {name!r}: {value!r}")


def http_date() -> bytes:
    """The Date header value, formatted once per second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = email.utils.formatdate(now, usegmt=True).encode()
        _HEADS.clear()
    return _date_value


def reason(status: int) -> bytes:
    """The reason phrase of a status (b"" for one HTTP does not name)."""
    return _REASONS.get(status, b"")


def header_list(request: h11.Request | Any) -> Fields:
    """The request's (lower-case name, value) pairs as a plain list.

    h11's Headers is a Sequence whose iteration goes through ``__getitem__`` one item at a
    time; its own list of items is read directly when it is there (it is in h11 0.14 to
    0.16), which makes a measurable difference at thousands of requests a second. A
    request read by llhttp (``protocols.httptools``) has its plain list already."""
    headers = request.headers
    if type(headers) is list:
        return headers
    items = getattr(headers, "_full_items", None)
    if isinstance(items, list):
        return [(name, value) for _, name, value in items]
    return list(headers)


def as_fields(headers: Any) -> Fields:
    """An app's header fields (pairs of bytes-like objects) as a list of bytes pairs."""
    return [(bytes(name), bytes(value)) for name, value in headers]


class ResponseFraming:
    """The framing of the responses of one connection, one response at a time.

    One object per connection, reused for each request (``begin``): ``head`` (or
    ``complete`` for a body known in full), then ``body`` for each piece and ``end``.
    """

    __slots__ = (
        "_chunked",
        "_connection",
        "_remaining",
        "bodyless_status",
        "head_only",
        "keep_alive",
    )

    def __init__(self) -> None:
        self.keep_alive = True
        self.head_only = False
        self.bodyless_status = False
        self._chunked = False
        self._remaining: int | None = None
        self._connection: bytes | None = None

    def begin(self, head_only: bool, keep_alive: bool) -> None:
        """A new request: ``head_only`` for HEAD (a head, never a body); ``keep_alive``
        if the connection may go on after it, as far as the request is concerned."""
        self.head_only = head_only
        self.keep_alive = keep_alive

    def head(self, status: int, headers: Fields, length: int | None, close: bool = False) -> bytes:
        """The response head. ``length``: the body size, or None for a body of unknown
        length (chunked, or delimited by the close when the connection cannot go on).
        ``close``: the connection must end after this response (a drain, an error)."""
        if not 200 <= status <= 999:  # 1xx are interim, never the answer
            raise InvalidResponse(f"invalid response status {status!r}")
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
        declared = self._fields(parts, status, headers)
        if close:
            self.keep_alive = False
        self.bodyless_status = bodyless = status in (204, 304)
        self._chunked = False
        self._remaining = None
        if bodyless:
            self._remaining = 0
        elif declared is not None:
            # HEAD: the app may declare the GET's length and send nothing (Starlette does)
            if length is not None and length != declared and not (self.head_only and not length):
                raise InvalidResponse(f"content-length {declared} but a body of {length}")
            self._remaining = declared
        elif length is not None:
            parts.append(b"content-length: %d\r\n" % length)
            self._remaining = length
        elif self.keep_alive:
            parts.append(b"transfer-encoding: chunked\r\n")
            self._chunked = True
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self._connection is not None:
            parts.append(b"connection: %s\r\n" % self._connection)
        parts.append(b"\r\n")
        if self.head_only or bodyless:
            self._remaining = 0
            self._chunked = False
        return b"".join(parts)

    def _fields(self, parts: list[bytes], status: int, headers: Fields) -> int | None:
        """Check the app's fields and add them to ``parts``, with ``date`` and ``server``
        unless the app gave its own; the content-length the app declared, if any. The
        app's ``Connection`` is kept aside, to be merged with ours."""
        has_date = has_server = False
        declared: int | None = None
        self._connection = None
        checked = _CHECKED
        for name, value in headers:
            field = (name, value)
            if field not in checked:
                check_field(name, value)
                if len(value) <= _CHECKED_VALUE_MAX:
                    if len(checked) >= _CHECKED_MAX:
                        checked.clear()
                    checked.add(field)
            lowered = name.lower()
            if lowered == b"date":
                has_date = True
            elif lowered == b"server":
                has_server = True
            elif lowered == b"connection":
                self._connection = value
                if b"close" in value.lower():
                    self.keep_alive = False
                continue  # merged with ours
            elif lowered == b"content-length":
                if not value.isdigit() or (declared is not None and int(value) != declared):
                    raise InvalidResponse(f"invalid content-length {value!r}")
                if declared is not None:
                    continue  # the same value twice: send it once
                declared = int(value)
                if status == 204:
                    continue  # RFC 9110 8.6: never on a 204
            elif lowered == b"transfer-encoding":
                if value.lower() != b"chunked":
                    raise InvalidResponse(f"unsupported transfer-encoding {value!r}")
                continue  # we add our own when we chunk
            parts.append(b"%s: %s\r\n" % (name, value))
        if not has_date:
            parts.append(b"date: %s\r\n" % http_date())
        if not has_server:
            parts.append(b"server: trioherd\r\n")
        return declared

    def complete(
        self, status: int, headers: Sequence[Any], body: bytes, close: bool = False
    ) -> bytes:
        """A whole response whose body is known: head and body, for one send.

        The head is made once for each set of what it depends on (the status, the fields,
        the body's length, the request's keep-alive and HEAD, ``close``) within a second,
        and taken from ``_HEADS`` after that, with the state making it left behind.
        ``headers`` may be any bytes-like pairs (an ASGI app's, unconverted): pairs that
        are not tuples of hashable bytes are made into a head every time."""
        length = len(body)
        http_date()  # a new second empties _HEADS
        key = (status, *headers, length, close, self.keep_alive, self.head_only)
        remember = True
        try:
            made = _HEADS.get(key)
        except TypeError:  # a field that is not a tuple of bytes: unhashable
            made = None
            remember = False
        if made is None:
            data = self.head(status, as_fields(headers), length, close)
            if remember:
                if len(_HEADS) >= _HEADS_MAX:
                    _HEADS.clear()
                _HEADS[key] = (
                    data,
                    self.keep_alive,
                    self.bodyless_status,
                    self._remaining,
                    self._chunked,
                    self._connection,
                )
        else:
            (
                data,
                self.keep_alive,
                self.bodyless_status,
                self._remaining,
                self._chunked,
                self._connection,
            ) = made
        if body and not self.head_only and not self.bodyless_status:
            data += body
        return data

    def wants_body(self) -> bool:
        """After ``head``: whether the response carries any body (not for HEAD, 204,
        304, or a declared length of 0)."""
        return self._remaining != 0

    def body(self, data: bytes) -> bytes:
        """Frame a piece of body (none for HEAD, 204 and 304)."""
        if not data or self.head_only or self.bodyless_status:
            return b""
        if self._chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        if self._remaining is not None:
            if len(data) > self._remaining:
                raise InvalidResponse("body longer than its content-length")
            self._remaining -= len(data)
        return data

    def end(self) -> bytes:
        """The end of the body: the last chunk, or nothing."""
        if self._chunked:
            return b"0\r\n\r\n"
        if self._remaining and not self.head_only:
            raise InvalidResponse("body shorter than its content-length")
        return b""
