"""Both request parsers give the same answers, byte for byte (``--http``).

Two herds of one worker each, one with ``--http h11`` and one with ``--http httptools``,
get the same bytes on fresh connections (sent, then half-closed, then read to the end);
their answers must be identical but for the Date header. The app answers with all it was
given of each request, so a field llhttp read differently would show. The inputs: the
heads llhttp reads, pipelined, the ones it must leave to h11, and the fuzzers' requests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http_fuzz import exchange, request_like
from unit.test_httptools import heads

from helpers import CLIHerd

DATE = re.compile(rb"(?im)^date: [^\r\n]*\r\n")

CORPUS = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /a/b?c=d&e HTTP/1.1\r\nHost: t\r\nAccept: */*\r\nX-Pad:  v  \r\nX-Empty:\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET http://x/y HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 3 + b"GET /partial HTTP/1.1\r\nHo",
    b"\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /unread HTTP/1.1\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhelloGET /after HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET / HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\nHost: t\n\n",
    b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: t\r\n\r\n",
    b"FROB / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nX: \xff\x01\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
]


@pytest.fixture
def herds(tmp_path: Path) -> Iterator[tuple[CLIHerd, CLIHerd]]:
    options = ["apps.request_echo:app", "--workers", "1", "--log-level", "critical"]
    h11 = CLIHerd(options, tmp_path, {"TRIOHERD_HTTP": "h11"})
    llhttp = CLIHerd(options, tmp_path, {"TRIOHERD_HTTP": "httptools"})
    try:
        h11.wait_ready()
        llhttp.wait_ready()
        yield h11, llhttp
    finally:
        assert h11.stop() == 0
        assert llhttp.stop() == 0


def same_answers(herds: tuple[CLIHerd, CLIHerd], data: bytes) -> bytes:
    h11, llhttp = herds
    first = DATE.sub(b"date: -\r\n", exchange(h11.port, data))
    second = DATE.sub(b"date: -\r\n", exchange(llhttp.port, data))
    assert first == second, data
    return first


def test_the_corpus_gets_the_same_answers(herds: tuple[CLIHerd, CLIHerd]) -> None:
    answered = [same_answers(herds, data) for data in CORPUS]
    assert answered[0].startswith(b"HTTP/1.1 200 ")  # they are answers, not silence
    assert answered[6].count(b"HTTP/1.1 200 ") == 3


def test_generated_requests_get_the_same_answers(herds: tuple[CLIHerd, CLIHerd]) -> None:
    statuses: set[bytes] = set()

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(st.one_of(heads(), request_like()))
    def check(data: bytes) -> None:
        statuses.update(re.findall(rb"HTTP/1\.1 (\d{3}) ", same_answers(herds, data)))

    check()
    assert b"200" in statuses and b"400" in statuses  # both kinds of head were reached
