"""The PROXY protocol parser, reading a header off a socket without reading past it, and
the gate that believes headers from the allowed peers only."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from trioherd.protocols.proxyproto import (
    NeedData,
    ProxyGate,
    ProxyProtocolError,
    parse,
    peeks_like_header,
    read_header,
    starts_like_header,
)
from trioherd.protocols.rawstream import TrioWaits

WAITS = TrioWaits()

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return SIG + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def v2_tcp4(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 80) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, body)


def test_v1_tcp4_tcp6_and_unknown() -> None:
    line = b"PROXY TCP4 198.51.100.7 10.0.0.1 51234 80\r\n"
    assert parse(line + b"GET / HTTP/1.1") == (("198.51.100.7", 51234), len(line))
    line6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n"
    assert parse(line6) == (("2001:db8::7", 51234), len(line6))
    assert parse(b"PROXY UNKNOWN\r\n") == (None, 15)


def test_v2_tcp4_tcp6_local_and_tlvs() -> None:
    header = v2_tcp4("198.51.100.7", 51234)
    assert parse(header + b"\x16\x03\x01") == (("198.51.100.7", 51234), len(header))
    body6 = socket.inet_pton(socket.AF_INET6, "2001:db8::7") + bytes(16) + b"\xc8\x22\x01\xbb"
    assert parse(v2(1, 0x21, body6)) == (("2001:db8::7", 51234), 16 + 36)
    assert parse(v2(0, 0x00, b"")) == (None, 16)  # LOCAL: a health check of the balancer
    with_tlv = v2(1, 0x11, v2_tcp4("192.0.2.1", 1)[16:] + b"\x04\x00\x01x")
    assert parse(with_tlv)[0] == ("192.0.2.1", 1)


@pytest.mark.parametrize(
    "partial", [b"", b"P", b"PROXY TCP4 1.2.3.4", SIG[:5], SIG, v2_tcp4("192.0.2.1", 5)[:20]]
)
def test_a_partial_header_needs_more(partial: bytes) -> None:
    with pytest.raises(NeedData):
        parse(partial)


@pytest.mark.parametrize(
    "bad",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello without a header
        b"PROXY TCP4 1.2.3.999 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 99999 2\r\n",
        b"PROXY TCP5 1.2.3.4 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4\r\n",
        b"PROXY " + b"x" * 120,
        SIG + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        SIG + b"\x21\x31\x00\x00",  # an address family we do not take
        SIG + b"\x21\x11\xff\xff",  # longer than we accept
    ],
)
def test_anything_else_is_an_error(bad: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(bad)


async def test_read_header_leaves_what_follows_for_the_next_layer() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        header = b"PROXY TCP4 198.51.100.7 10.0.0.1 51234 80\r\n"
        a.sendall(header[:9])  # the header arrives in pieces, the request right behind it
        async with trio.open_nursery() as nursery:

            async def rest() -> None:
                await trio.sleep(0.01)
                a.sendall(header[9:] + b"GET / HTTP/1.1\r\n\r\n")

            nursery.start_soon(rest)
            address = await read_header(b, trio.current_time() + 5, WAITS)
        assert address == ("198.51.100.7", 51234)
        assert b.recv(100) == b"GET / HTTP/1.1\r\n\r\n"


async def test_read_header_of_v2_then_tls_bytes() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(v2_tcp4("192.0.2.5", 4242) + b"\x16\x03\x01")
        assert await read_header(b, trio.current_time() + 5, WAITS) == ("192.0.2.5", 4242)
        assert b.recv(100) == b"\x16\x03\x01"


async def test_read_header_times_out_and_rejects(autojump_clock: trio.abc.Clock) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(b"PROXY TCP4")
        with pytest.raises(TimeoutError):
            await read_header(b, trio.current_time() + 10, WAITS)
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(ProxyProtocolError):
            await read_header(b, trio.current_time() + 10, WAITS)


# -- whose headers are believed (--proxy-protocol-allow-ips) ------------------------------


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", True),
        (b"PROXY ", True),
        (SIG, True),
        (SIG + b"\x21\x11", True),
        (b"", None),
        (b"P", None),
        (b"PROXY", None),
        (SIG[:11], None),
        (b"GET / HTTP/1.1\r\n", False),
        (b"POST", False),
        (b"PROPFIND / HTTP/1.1", False),  # WebDAV: parts from PROXY at its fourth byte
        (b"PROXYZ", False),
        (b"\x16\x03\x01\x02\x00", False),  # a TLS ClientHello
        (b"\r\n\r\nGET", False),
    ],
)
def test_starts_like_header_tells_as_soon_as_it_can(data: bytes, verdict: bool | None) -> None:
    assert starts_like_header(data) is verdict


def test_the_gate_allows_its_list_and_unix_peers() -> None:
    gate = ProxyGate("127.0.0.2,10.0.0.0/8", timeout=5, on_refused=print, waits=WAITS)
    assert gate.allows(("127.0.0.2", 1)) and gate.allows(("10.1.2.3", 1))
    assert gate.allows(None)  # a Unix socket: only local processes reach it
    assert not gate.allows(("127.0.0.1", 1)) and not gate.allows(("::1", 1))
    assert ProxyGate("*", timeout=5, on_refused=print, waits=WAITS).allows(("203.0.113.9", 1))
    assert not ProxyGate("", timeout=5, on_refused=print, waits=WAITS).allows(("127.0.0.1", 1))


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1: (client, the server's non-blocking end)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(False)
    return client, server


def low_water(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


async def test_peeking_waits_for_the_byte_that_tells_and_reads_nothing() -> None:
    client, server = await tcp_pair()
    with client, server:
        client.sendall(b"PRO")
        verdict: list[bool] = []
        async with trio.open_nursery() as nursery:

            async def peek() -> None:
                verdict.append(await peeks_like_header(server, trio.current_time() + 30, WAITS))

            nursery.start_soon(peek)
            with trio.fail_after(30):  # it waits for a fourth byte (SO_RCVLOWAT)
                while low_water(server) != 4:
                    await trio.sleep(0.01)
            assert verdict == []
            client.sendall(b"XY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
        assert verdict == [True] and low_water(server) == 1
        assert server.recv(100).startswith(b"PROXY TCP4")  # every byte still there


async def test_peeking_a_request_or_an_early_end() -> None:
    client, server = await tcp_pair()
    with client, server:
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert not await peeks_like_header(server, trio.current_time() + 30, WAITS)
        assert server.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    client, server = await tcp_pair()
    with client, server:
        client.sendall(SIG[:4])
        async with trio.open_nursery() as nursery:
            verdict: list[bool] = []

            async def peek() -> None:
                verdict.append(await peeks_like_header(server, trio.current_time() + 30, WAITS))

            nursery.start_soon(peek)
            with trio.fail_after(30):
                while low_water(server) != 5:
                    await trio.sleep(0.01)
            client.shutdown(socket.SHUT_WR)  # the client is done: no header after all
        assert verdict == [False] and low_water(server) == 1
