"""``--http httptools`` takes a head from llhttp only when h11 reads the same request from it.

Sans-IO: ``plain_head`` against h11's own reading of the same bytes, on heads written out
and on heads hypothesis builds from the bytes where the two parsers differ (white space,
line ends, control characters, methods, versions, Host, the headers that frame a body).
"""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioherd.protocols.framing import header_list
from trioherd.protocols.httptools import plain_head


def h11_reading(data: bytes) -> tuple[Any, ...] | None:
    """What h11 reads from ``data``: (method, target, version, fields, bytes after the head)
    for a complete request without a body; None for anything else."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
        if type(event) is not h11.Request:
            return None
        if type(conn.next_event()) is not h11.EndOfMessage:
            return None  # a body, or more to come
    except h11.RemoteProtocolError:
        return None
    fields = header_list(event)
    return (event.method, event.target, event.http_version, fields, conn.trailing_data[0])


def llhttp_reading(data: bytes) -> tuple[Any, ...] | None:
    head = plain_head(data)
    if head is None:
        return None
    assert head.their_state is h11.DONE and type(head.next_event()) is h11.EndOfMessage
    return (head.method, head.target, head.http_version, head.headers, head.trailing_data[0])


def assert_same(data: bytes) -> tuple[Any, ...] | None:
    """llhttp reads nothing, or what h11 reads."""
    ours = llhttp_reading(data)
    if ours is not None:
        assert ours == h11_reading(data), data
    return ours


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /a?b=c HTTP/1.1\r\nHost: t\r\nAccept: */*\r\nUser-Agent: x y\r\n\r\n",
        b"HEAD / HTTP/1.0\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET http://x/y HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Empty:\r\nX-Pad:   v  \r\n\r\nGET /next HTTP/1.1\r\n",
        b"DELETE /x HTTP/1.1\r\nHOST: t\r\nConnection: close\r\n\r\n",
    ],
)
def test_plain_heads_are_read_by_llhttp_as_h11_reads_them(data: bytes) -> None:
    assert assert_same(data) is not None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: t\r\n",  # not complete yet
        b"GET / HTTP/1.1\r\n\r\n",  # no Host: h11's 400
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n",  # llhttp takes the double space
        b"GET / HTTP/1.1 \r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.1\nHost: t\n\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: \xff\r\n\r\n",  # obs-text
        b"GET / HTTP/1.2\r\nHost: t\r\n\r\n",  # h11's 505 (via _check_head)
        b"GET / HTTP/2.0\r\nHost: t\r\n\r\n",
        b"FROB / HTTP/1.1\r\nHost: t\r\n\r\n",  # llhttp refuses it, h11 takes it
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : t\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x01b\r\nHost: t\r\n\r\n",  # llhttp refuses, h11 takes
    ],
)
def test_anything_else_is_left_to_h11(data: bytes) -> None:
    assert llhttp_reading(data) is None


# (plain choices, others): each part is plain most of the time, so that plain heads come often
METHODS = ([b"GET", b"HEAD", b"DELETE"], [b"PURGE", b"FROB", b"get", b"G T", b"", b"GET\t"])
SPACES = ([b" "], [b"  ", b"\t", b""])
TARGETS = ([b"/", b"/a?b=c", b"*", b"http://x/"], [b"/a b", b"", b"/\x7f", b"/#f", b"/{|}"])
VERSIONS = ([b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 ", b"HTTP/1.2"])
NAMES = (
    [b"Host", b"host", b"X-A", b"Accept"],
    [
        *(b"Content-Length", b"Transfer-Encoding", b"Expect", b"Upgrade", b"Connection"),
        *(b"", b"Bad Name", b"X:Y", b"\x7f", b"X-A "),
    ],
)
COLONS = ([b": "], [b":", b" :", b":\t"])
VALUES = ([b"t", b"a  b", b"*/*"], [b"", b" t ", b"\tt\t", b"chunked", b"0", b"close", None])
ENDS = ([b"\r\n"], [b"\n", b"\r", b"\r\n ", b"\r\n\t"])


def part(draw: st.DrawFn, choices: tuple[list[bytes], list[bytes | None]]) -> bytes:
    plain, others = choices
    if draw(st.integers(0, 5)):
        return draw(st.sampled_from(plain))
    other = draw(st.sampled_from(others))
    return draw(st.binary(max_size=12)) if other is None else other


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    data = part(draw, METHODS) + part(draw, SPACES) + part(draw, TARGETS) + part(draw, SPACES)
    data += part(draw, VERSIONS) + part(draw, ENDS)
    for _ in range(draw(st.integers(0, 4))):
        data += part(draw, NAMES) + part(draw, COLONS) + part(draw, VALUES) + part(draw, ENDS)
    return data + part(draw, ENDS) + draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"\r\n"]))


@settings(max_examples=3000, deadline=None)
@given(heads())
def test_generated_heads_read_by_llhttp_are_read_the_same_by_h11(data: bytes) -> None:
    assert_same(data)


def test_the_generated_heads_reach_llhttp_often() -> None:
    """The property above is not vacuous: plain heads are among those generated. With a
    fixed seed: from random ones the count ranged 10-49 of 300 and fell below 10 now and
    then, a failure that said nothing about the code."""
    seen: list[bytes] = []

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(heads())
    def collect(data: bytes) -> None:
        if llhttp_reading(data) is not None:
            seen.append(data)

    collect()
    assert len(seen) >= 10
