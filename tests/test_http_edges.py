"""What real clients found at the edges of HTTP/1.1 (issue 9), against real workers.

Raw sockets for what no polite client sends; Python's ssl with ``suppress_ragged_eofs=False``
for how TLS connections end; curl where it is natural. Bounds are generous upper limits
("closed within 3 s, not the 10 s of header_timeout"), never timings.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from helpers import address_of, connect, open_herd

# every test here runs with h11 and with httptools (conftest.http_parser)
pytestmark = pytest.mark.usefixtures("http_parser")

APP = "apps.http_edge_apps:app"
CLOSED_WITHIN = 3.0  # a connection that is to close after its answer closes by then
HEADER_TIMEOUT = 10.0  # what a connection that waits for more body would take instead


# -- clients ----------------------------------------------------------------------------


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the server closes; a reset (BrokenResourceError) fails the test."""
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def exchange(herd: Any, data: bytes, within: float = CLOSED_WITHIN) -> bytes:
    """Send ``data`` and read until the server closes, which must happen ``within``."""
    stream = await connect(herd)
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(within):
            return await read_to_eof(stream)


async def read_response(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    """One whole response with a content-length (what is after it stays in ``buffer``)."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed before a response: {bytes(buffer)!r}"
        buffer += chunk
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    end = len(head) + 4 + length
    while len(buffer) < end:
        chunk = await stream.receive_some(65536)
        assert chunk, "closed in the middle of a response"
        buffer += chunk
    response = bytes(buffer[:end])
    del buffer[:end]
    return response


def responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split the responses in ``data`` (content-length or close-delimited bodies)."""
    found = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 "), lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.lower()] = value.strip()
        if b"content-length" in headers:
            size = int(headers[b"content-length"])
            body, data = data[:size], data[size:]
        else:
            body, data = data, b""
        found.append((int(lines[0].split(b" ")[1]), headers, body))
    return found


def closes(response: tuple[int, dict[bytes, bytes], bytes]) -> bool:
    return response[1].get(b"connection") == b"close"


# -- 4: a closing connection closes after its answer, not after header_timeout -----------

CLOSING_WITH_A_BODY = [
    (b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"hello",
    ),
    (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"hello",
    ),
    (b"POST /ignored HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", b"POST /ignored"),
    (b"GET / HTTP/1.0\r\n\r\n", b"GET /"),
]


async def test_a_closing_connection_closes_right_after_its_answer() -> None:
    async with open_herd(app=APP, workers=1, header_timeout=HEADER_TIMEOUT) as herd:
        for request, body in CLOSING_WITH_A_BODY:
            ((status, headers, got),) = responses(await exchange(herd, request))
            assert (status, got, headers[b"connection"]) == (200, body, b"close"), request


# -- 5: HTTP versions --------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/3.7\r\nHost: t\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: t\r\n\r\n",
        b"GET / HTTP/0.9\r\n\r\n",
        H2_PREFACE + H2_SETTINGS,
    ],
    ids=["3.7", "2.0", "1.2", "0.9", "h2-preface"],
)
async def test_other_http_versions_get_505_and_a_close(request_bytes: bytes) -> None:
    async with open_herd(app=APP, workers=1) as herd:
        data = await exchange(herd, request_bytes)
        ((status, headers, body),) = responses(data)
        assert (status, headers[b"connection"]) == (505, b"close"), data
        assert body == b"505 HTTP Version Not Supported\n"  # not the app's: it never ran
        # the same on a later request of a keep-alive connection
        data = await exchange(herd, b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n" + request_bytes)
        assert [(s, b) for s, _, b in responses(data)] == [
            (200, b"GET /first"),
            (505, b"505 HTTP Version Not Supported\n"),
        ]
        # 1.0 and 1.1 are served as before
        for version in (b"1.0", b"1.1"):
            data = await exchange(
                herd, b"GET /ok HTTP/%s\r\nHost: t\r\nConnection: close\r\n\r\n" % version
            )
            assert [(s, b) for s, _, b in responses(data)] == [(200, b"GET /ok")]


async def test_curl_with_http2_prior_knowledge_is_turned_away_at_once() -> None:
    async with open_herd(app=APP, workers=1) as herd:
        started = time.monotonic()
        got = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "20",
                    "--http2-prior-knowledge",
                    herd.addresses[0] + "/",
                ],
                capture_output=True,
                timeout=60,
            )
        )
        assert got.returncode != 0 and b"GET /" not in got.stdout, got
        assert time.monotonic() - started < 10  # turned away, not timed out
        data = await exchange(herd, b"GET /after HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert responses(data)[0][2] == b"GET /after"


# -- 11: CONNECT, and chunk sizes ---------------------------------------------------------


async def test_connect_is_never_followed_by_more_http_on_its_connection() -> None:
    async with open_herd(app=APP, workers=1) as herd:
        data = await exchange(
            herd,
            b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        ((status, headers, body),) = responses(data)  # one answer, and the end
        assert (status, headers[b"connection"]) == (200, b"close")
        assert body == b"CONNECT example.org:443" and b"smuggled" not in data


CHUNKED_HEAD = b"POST %s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("path", "chunks", "expected"),
    [
        (b"/echo", b"F" * 20 + b"\r\n", 413),  # about 2**80
        (b"/echo", b"F" * 16 + b"\r\n", 413),
        (b"/echo", b"3e9\r\n", 413),  # 1001, over the 1000 allowed
        (b"/echo", b"5\r\nhello\r\n3e5\r\n", 413),  # 5 + 997
        (b"/echo", b"1" + b"0" * 20 + b"\r\n", 400),  # 21 digits: h11 refuses the line
        (b"/ignored", b"F" * 20 + b"\r\n", 200),  # answered unread: then closed at once
    ],
    ids=["2**80", "16-digits", "just-over", "sum-over", "21-digits", "unread"],
)
async def test_a_chunk_over_the_body_limit_is_refused_without_waiting_for_it(
    path: bytes, chunks: bytes, expected: int
) -> None:
    async with open_herd(
        app=APP, workers=1, max_body_size=1000, header_timeout=HEADER_TIMEOUT
    ) as herd:
        data = await exchange(herd, CHUNKED_HEAD % path + chunks)
        ((status, _, _),) = responses(data)
        assert status == expected, data


# -- issue 24: absolute-form targets, bare-LF chunk lines ------------------------------------


async def test_an_absolute_form_target_gives_its_path_and_its_authority_as_the_host() -> None:
    """RFC 9112 3.2.2: the target's authority replaces Host, the path is the target's path
    (``/`` if it has none), for the native and the ASGI interface; a target that is
    neither a path nor an absolute URI is a 400, and the worker goes on."""
    import json

    for app in ("apps.request_echo:app", "apps.request_echo:asgi"):
        async with open_herd(app=app, workers=1) as herd:
            seen = []
            for target in (b"http://x:81/p/q?a=1", b"https://user@y.test?z", b"HTTP://X"):
                data = await exchange(
                    herd, b"GET %s HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % target
                )
                ((status, _, body),) = responses(data)
                assert status == 200, data
                seen.append(json.loads(body))
            paths = [(got["path"], got["query"]) for got in seen]
            assert paths == [("/p/q", "a=1"), ("/", "z"), ("/", "")]
            hosts = [[v for n, v in got["headers"] if n == "host"] for got in seen]
            assert hosts == [["x:81"], ["y.test"], ["X"]]
            if "asgi" in app:
                assert [got["raw_path"] for got in seen] == ["/p/q", "/", "/"]
            data = await exchange(herd, b"GET p/q HTTP/1.1\r\nHost: a\r\n\r\n")
            ((status, _, _),) = responses(data)
            assert status == 400
            data = await exchange(herd, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            ((status, _, _),) = responses(data)
            assert status == 200  # the worker lives


@pytest.mark.parametrize(
    "chunks",
    [b"5\nhello\n0\n\n", b"5\r\nhello\r\n0\n\n", b"\n"],
    ids=["all-bare", "last-chunk-bare", "lone-LF"],
)
async def test_a_chunk_line_ending_in_a_bare_lf_is_answered_400_at_once(chunks: bytes) -> None:
    """h11 waits for the CRLF of a chunk line; the request is malformed (RFC 9112 7.1):
    a 400 and a close within CLOSED_WITHIN, not a 408 after the header timeout."""
    async with open_herd(app=APP, workers=1, header_timeout=HEADER_TIMEOUT) as herd:
        data = await exchange(herd, CHUNKED_HEAD % b"/echo" + chunks)
        ((status, _, _),) = responses(data)
        assert status == 400, data


async def test_a_request_that_came_in_time_is_answered_though_the_worker_read_it_late(
    tmp_path: Path,
) -> None:
    """Keep-alive connections whose next request arrives before their idle timeout are
    answered, even when the worker's loop is held up past that timeout (a blocking call
    here; a starved machine in issue 24's slowloris flake, where a request got b""): the
    deadline judges the client, not the worker's lag."""
    mark = tmp_path / "stalling"
    async with open_herd(app=APP, workers=1, keep_alive_timeout=1.0) as herd:
        async with contextlib.AsyncExitStack() as streams:
            clients = [await streams.enter_async_context(await connect(herd)) for _ in range(20)]
            buffers = [bytearray() for _ in clients]
            for stream, buffer in zip(clients, buffers, strict=True):  # now idle, kept alive
                await stream.send_all(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
                assert (await read_response(stream, buffer)).startswith(b"HTTP/1.1 200 ")
            blocker = await streams.enter_async_context(await connect(herd))
            await blocker.send_all(
                b"GET /stall?s=2.5&mark=%s HTTP/1.1\r\nHost: t\r\n\r\n" % str(mark).encode()
            )
            with trio.fail_after(5):
                while not mark.exists():  # the worker's loop is held from now on
                    await trio.sleep(0.01)
            for stream in clients:  # in time: well within the 1 s since their last answer
                await stream.send_all(b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n")
            answers = []
            for stream, buffer in zip(clients, buffers, strict=True):
                with trio.fail_after(10):
                    try:
                        answers.append((await read_response(stream, buffer))[:15])
                    except AssertionError as exc:  # closed before a response
                        answers.append(str(exc).encode()[:40])
            assert answers == [b"HTTP/1.1 200 OK"] * len(clients)


# -- 12: pipelined requests and max_requests_per_connection --------------------------------


def gets(*names: str) -> bytes:
    return b"".join(b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n" % name.encode() for name in names)


@pytest.mark.parametrize(
    ("pipelined", "answered"),
    [
        (gets("a", "b", "c", "d", "e"), ["a", "b", "c", "d", "e"]),
        (gets("a", "b", "c") + b"GET /d HTTP/1.1\r\nHo", ["a", "b", "c"]),
        (
            gets("a", "b")
            + b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
            + gets("d"),
            ["a", "b", "c"],
        ),
    ],
    ids=["all-complete", "partial-fourth", "body-at-the-limit"],
)
async def test_pipelined_requests_already_received_survive_the_connection_limit(
    pipelined: bytes, answered: list[str]
) -> None:
    async with open_herd(app=APP, workers=1, max_requests_per_connection=3) as herd:
        found = responses(await exchange(herd, pipelined))
        assert [body.split(b" ")[1].decode() for _, _, body in found] == [
            "/" + name for name in answered
        ]
        assert [closes(response) for response in found] == [False] * (len(found) - 1) + [True]


async def test_the_connection_limit_still_ends_a_connection_at_a_quiet_boundary() -> None:
    async with open_herd(app=APP, workers=1, max_requests_per_connection=3) as herd:
        stream = await connect(herd)
        async with stream:
            buffer = bytearray()
            for name in ("a", "b", "c"):
                await stream.send_all(gets(name))
                response = await read_response(stream, buffer)
                assert closes(responses(response)[0]) == (name == "c")
            with trio.fail_after(CLOSED_WITHIN):
                assert await read_to_eof(stream) == b""


# -- point 9: send timeout ------------------------------------------------------------------

ESTABLISHED = 1


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0]


async def wait_for(predicate: Any, within: float) -> None:
    """Poll ``predicate`` until it holds; fail if it does not within ``within`` s."""
    with trio.fail_after(within):
        while not predicate():
            await trio.sleep(0.05)


def small_receiver() -> socket.socket:
    """A client socket with a small receive buffer, so a big answer stalls early."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    return sock


@pytest.mark.parametrize("path", [b"/big?mb=16", b"/big-stream?mb=16"])
async def test_a_client_that_never_reads_is_cut_off_after_the_send_timeout(path: bytes) -> None:
    async with open_herd(app=APP, workers=1, send_timeout=1.0) as herd:
        (worker,) = herd.workers
        sock = small_receiver()
        with sock:
            await trio.to_thread.run_sync(sock.connect, address_of(herd))
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
            # it never reads: the server resets the connection once nothing moved for 1 s
            await wait_for(lambda: tcp_state(sock) != ESTABLISHED, 15)
        await wait_for(lambda: herd.workers[0].open_connections == 0, 15)
        data = await exchange(herd, b"GET /after HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert responses(data)[0][1][b"x-pid"] == str(worker.pid).encode()


SMALL = b"GET /kb?kb=12 HTTP/1.1\r\nHost: t\r\n\r\n"  # written by the worker's flusher


async def send_small_requests_one_by_one(sock: socket.socket, count: int) -> int:
    """Requests for small answers, one at a time and never reading: each answer is
    handed to the worker's flusher while its connection waits for the next request,
    until the buffers are full and one of them stalls there. How many were sent whole."""
    sock.setblocking(False)
    sent = 0
    for _ in range(count):
        with contextlib.suppress(BlockingIOError, ConnectionError):
            if sock.send(SMALL) == len(SMALL):
                sent += 1
        await trio.sleep(0.005)
        if tcp_state(sock) != ESTABLISHED:
            break
    return sent


async def test_a_small_answer_that_stalls_still_gets_the_send_timeout() -> None:
    """The keep-alive timeout (60 s) does not stand in for the send timeout (1 s) when a
    small answer stalls after its connection went back to waiting."""
    async with open_herd(app=APP, workers=1, send_timeout=1.0, keep_alive_timeout=60) as herd:
        (worker,) = herd.workers
        sock = small_receiver()
        with sock:
            await trio.to_thread.run_sync(sock.connect, address_of(herd))
            await send_small_requests_one_by_one(sock, 800)
            await wait_for(lambda: tcp_state(sock) != ESTABLISHED, 20)
        await wait_for(lambda: herd.workers[0].open_connections == 0, 15)
        data = await exchange(herd, b"GET /after HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert responses(data)[0][1][b"x-pid"] == str(worker.pid).encode()


async def test_after_a_small_answer_stalled_and_went_the_keep_alive_timeout_holds() -> None:
    """A client that stops reading small answers for a while, then reads them all, gets
    every one, and its idle connection is then closed after the keep-alive timeout."""
    async with open_herd(app=APP, workers=1, send_timeout=10.0, keep_alive_timeout=1.0) as herd:
        sock = small_receiver()
        with sock:
            await trio.to_thread.run_sync(sock.connect, address_of(herd))
            assert await send_small_requests_one_by_one(sock, 600) == 600
            received = bytearray()
            trio_sock = trio.socket.from_stdlib_socket(sock)
            with trio.fail_after(30):  # every answer, then the close of the idle connection
                while chunk := await trio_sock.recv(65536):
                    received += chunk
        assert received.count(b"HTTP/1.1 200 ") == 600
        assert received.count(b"k" * 12 * 1024) == 600


async def test_a_slow_reader_that_keeps_reading_gets_all_of_a_long_answer() -> None:
    async with open_herd(app=APP, workers=1, send_timeout=1.0) as herd:
        sock = trio.socket.from_stdlib_socket(small_receiver())
        with sock:
            await sock.connect(address_of(herd))
            await sock.send(b"GET /big?mb=4 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            received = 0
            with trio.fail_after(60):
                while chunk := await sock.recv(65536):
                    received += len(chunk)
                    await trio.sleep(0.05)  # about 3 s in all: longer than send_timeout
        assert received > 4 * 1024 * 1024


# -- point 9: idle crowds -------------------------------------------------------------------


async def test_idle_keep_alive_crowd_is_thinned_for_new_clients(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async with open_herd(app=APP, workers=1, max_connections=20, keep_alive_timeout=60) as herd:
        idle: list[tuple[trio.SocketStream, bytearray]] = []
        try:
            for i in range(20):  # one request each, then idle, oldest first
                stream = await connect(herd)
                idle.append((stream, bytearray()))
                await stream.send_all(gets(f"idle{i}"))
                with trio.fail_after(10):
                    await read_response(stream, idle[-1][1])
            # a newcomer is served, although idle clients filled the worker
            with trio.fail_after(10):
                data = await exchange(
                    herd, b"GET /new HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                )
            assert responses(data)[0][2] == b"GET /new"
            # the oldest idle ones were closed, the newest still serve
            with trio.fail_after(10):
                assert await read_to_eof(idle[0][0]) == b""
            stream, buffer = idle[-1]
            await stream.send_all(gets("still"))
            with trio.fail_after(10):
                assert responses(await read_response(stream, buffer))[0][2] == b"GET /still"
            await wait_for(lambda: herd.workers[0].stats.get("shed", 0) >= 3, 10)
            shed = herd.workers[0].stats["shed"]
        finally:
            for stream, _ in idle:
                await stream.aclose()
    # one warning per burst, naming how many it closed
    lines = re.findall(r"closed (\d+) idle keep-alive connections", capfd.readouterr().err)
    assert lines and sum(map(int, lines)) == shed
    assert all(int(count) >= 3 for count in lines)


# -- 6 and 4 over TLS: close_notify on every close -------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, ssl.SSLContext]]:
    directory = tmp_path_factory.mktemp("edges-pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(key)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    yield cert, key, context


def tls_exchange(port: int, context: ssl.SSLContext, data: bytes) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes; and how long that took. A close
    without close_notify raises ssl.SSLEOFError (``suppress_ragged_eofs=False``)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(
            raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False
        ) as tls:
            tls.sendall(data)
            received = b""
            while chunk := tls.recv(65536):
                received += chunk
    return received, time.monotonic() - started


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 200),
        (b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", 200),
        (
            b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
            200,
        ),
        (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", 200),  # then the keep-alive timeout
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/3.7\r\nHost: t\r\n\r\n", 505),
        (CHUNKED_HEAD % b"/echo" + b"F" * 20 + b"\r\n", 413),
        (gets("a", "b", "c") + b"GET /d HTTP/1.1\r\nHo", 200),  # at the connection limit
    ],
    ids=[
        "close",
        "http-1.0-body",
        "close-body",
        "keep-alive-timeout",
        "400",
        "505",
        "413",
        "limit",
    ],
)
async def test_every_close_over_tls_sends_close_notify(
    pki: tuple[Path, Path, ssl.SSLContext], request_bytes: bytes, status: int
) -> None:
    cert, key, context = pki
    async with open_herd(
        app=APP,
        workers=1,
        certfile=str(cert),
        keyfile=str(key),
        keep_alive_timeout=0.5,
        header_timeout=HEADER_TIMEOUT,
        max_requests_per_connection=3,
    ) as herd:
        _, port = address_of(herd)
        data, took = await trio.to_thread.run_sync(tls_exchange, port, context, request_bytes)
        found = responses(data)
        assert found[-1][0] == status, data
        assert took < CLOSED_WITHIN + 0.5  # not header_timeout (10 s)


async def test_over_tls_a_client_that_never_reads_is_cut_off_after_the_send_timeout(
    pki: tuple[Path, Path, ssl.SSLContext],
) -> None:
    cert, key, context = pki
    async with open_herd(
        app=APP, workers=1, certfile=str(cert), keyfile=str(key), send_timeout=1.0
    ) as herd:
        (worker,) = herd.workers
        sock = small_receiver()
        sock.settimeout(30)
        await trio.to_thread.run_sync(sock.connect, address_of(herd))
        tls = await trio.to_thread.run_sync(
            lambda: context.wrap_socket(sock, server_hostname="127.0.0.1")
        )
        with tls:
            tls.sendall(b"GET /big?mb=16 HTTP/1.1\r\nHost: t\r\n\r\n")
            await wait_for(lambda: tcp_state(tls) != ESTABLISHED, 15)
        await wait_for(lambda: herd.workers[0].open_connections == 0, 15)
        assert herd.workers[0].pid == worker.pid
