"""HTTP/1.1 end to end: curl and raw sockets against real workers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from helpers import CLIHerd, address_of, open_herd, receive_all, receive_until

# every test here runs with h11 and with httptools (conftest.http_parser)
pytestmark = pytest.mark.usefixtures("http_parser")
TRIO_ONLY = pytest.mark.trio_only  # a stream handler: a Trio program

CURL = ["curl", "--silent", "--show-error", "--max-time", "30"]


@pytest.fixture
def native_server(cli_herd: Any) -> Iterator[CLIHerd]:
    herd = cli_herd("apps.http_apps:native", "--workers", "2")
    herd.wait_ready()
    yield herd
    assert herd.stop() == 0


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run curl; output decoded without newline translation (headers end in CRLF)."""
    raw = subprocess.run([*CURL, *args], capture_output=True, timeout=60)
    return subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode()
    )


def test_curl_get_head_chunked_post_and_expect_100(native_server: CLIHerd) -> None:
    url = native_server.urls[0]
    got = curl("-i", url + "/")
    assert got.returncode == 0, got.stderr
    head, _, body = got.stdout.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200 OK")
    assert "server: trioherd" in head.lower() and "date: " in head.lower()
    assert body == "Hello, World!"

    head_only = curl("-I", url + "/")
    assert head_only.stdout.startswith("HTTP/1.1 200 OK")
    assert "content-length: 13" in head_only.stdout.lower()

    chunked = curl("-H", "Transfer-Encoding: chunked", "--data-binary", "x" * 5000, url + "/echo")
    assert chunked.stdout == "x" * 5000

    expect = curl("-v", "-H", "Expect: 100-continue", "--data-binary", "y" * 2000, url + "/count")
    assert expect.stdout == "2000"
    assert "HTTP/1.1 100 Continue" in expect.stderr

    stream = curl("-i", url + "/stream")
    assert "transfer-encoding: chunked" in stream.stdout.lower()
    assert stream.stdout.endswith("chunk 0\nchunk 1\nchunk 2\n")


def test_curl_reuses_one_connection_for_100_requests(native_server: CLIHerd) -> None:
    url = native_server.urls[0] + "/"
    got = curl("-v", *[url] * 100)
    assert got.returncode == 0, got.stderr
    assert got.stdout == "Hello, World!" * 100
    assert got.stderr.count("Connected to") == 1
    assert got.stderr.count("Re-using existing connection") == 99


async def raw_exchange(host: str, port: int, data: bytes, *, close: bool = True) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(30):
            return await receive_all(stream) if close else await receive_until(stream, b"\r\n\r\n")


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def pid_header(response: bytes) -> str:
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"x-pid":
            return value.strip().decode()
    raise AssertionError(f"no x-pid in {response!r}")


GOOD = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("name", "request_bytes", "expected"),
    [
        (
            "oversized head",
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n",
            431,
        ),
        (
            "too many headers",
            b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-A: b\r\n" * 150 + b"\r\n",
            431,
        ),
        (
            "oversized body",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n" + b"z" * 2000,
            413,
        ),
        (
            "oversized chunked body",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"7d0\r\n"
            + b"z" * 2000
            + b"\r\n0\r\n\r\n",
            413,
        ),
        ("garbage", b"\x16\x03\x01 this is not http at all\r\n\r\n", 400),
        (
            "malformed chunk read by the app",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
            400,
        ),
        ("bad header line", b"GET / HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n", 400),
        ("app exception", b"GET /boom HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 500),
    ],
)
async def test_bad_requests_get_an_answer_and_the_worker_lives(
    name: str, request_bytes: bytes, expected: int
) -> None:
    async with open_herd(app="apps.http_apps:native", workers=1, max_body_size=1000) as herd:
        host, port = address_of(herd)
        (worker,) = herd.workers
        response = await raw_exchange(host, port, request_bytes)
        assert status_of(response) == expected, response[:200]
        good = await raw_exchange(host, port, GOOD)
        assert status_of(good) == 200
        assert pid_header(good) == str(worker.pid)
        assert herd.workers[0].pid == worker.pid


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with open_herd(app="apps.http_apps:native", workers=1) as herd:
        host, port = address_of(herd)
        requests = (
            b"".join(b"GET /info?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(10))
            + b"GET /info?n=last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        data = await raw_exchange(host, port, requests)
        queries = [
            json.loads(
                part.split(b"\r\n\r\n", 1)[1][: part.split(b"\r\n\r\n", 1)[1].index(b"}") + 1]
            )["query"]
            for part in data.split(b"HTTP/1.1 200 OK")[1:]
        ]
        assert queries == [f"n={i}" for i in range(10)] + ["n=last"]


async def test_slow_head_gets_408_and_close_within_the_head_timeout() -> None:
    async with open_herd(app="apps.http_apps:native", workers=1, header_timeout=1.0) as herd:
        host, port = address_of(herd)
        (worker,) = herd.workers
        stream = await trio.open_tcp_stream(host, port)
        started = time.monotonic()
        async with stream:
            received = b""
            # trickle one byte every 0.2 s: each byte would reset a per-read timer
            with trio.fail_after(30):
                for byte in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"s" * 200:
                    try:
                        await stream.send_all(bytes([byte]))
                    except trio.BrokenResourceError:
                        break
                    with trio.move_on_after(0.2):
                        chunk = await stream.receive_some(1000)
                        received += chunk
                        if not chunk:
                            break
                received += await receive_all(stream)
        took = time.monotonic() - started
        assert status_of(received) == 408
        assert took < 1.0 + 10  # the 1 s head bound, with a generous margin; not 40 s
        good = await raw_exchange(host, port, GOOD)
        assert pid_header(good) == str(worker.pid)


@pytest.mark.parametrize("app", ["apps.http_apps:native", "apps.http_apps:asgi"])
async def test_a_body_that_stops_coming_gets_408_and_close_within_the_head_timeout(
    app: str,
) -> None:
    # the app waits in its body read when the deadline passes: the read ends, the app
    # with it, and the client gets a 408; the worker goes on serving
    async with open_herd(app=app, workers=1, header_timeout=1.0) as herd:
        host, port = address_of(herd)
        (worker,) = herd.workers
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            head = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
            await stream.send_all(head + b"x" * 10)  # 90 bytes never come
            with trio.fail_after(30):
                received = await receive_all(stream)
        assert status_of(received) == 408
        good = await raw_exchange(host, port, GOOD)
        assert status_of(good) == 200 and pid_header(good) == str(worker.pid)


@pytest.mark.parametrize(
    ("app", "options", "deferred"),
    [
        ("apps.http_apps:native", {"defer_accept": True}, True),
        ("apps.http_apps:native", {}, False),  # off by default
        ("apps.http_apps:native", {"dispatch": "shared", "defer_accept": True}, True),
        # a stream app may speak first: never deferred
        pytest.param("apps.raw:hold_pid", {"defer_accept": True}, False, marks=TRIO_ONLY),
    ],
    ids=["defer-accept", "default", "shared", "stream-app"],
)
async def test_a_connection_is_handed_over_once_its_request_came(
    app: str, options: dict[str, Any], deferred: bool
) -> None:
    # TCP_DEFER_ACCEPT: a client that has not sent a byte stays with the kernel (its
    # connection half-open there), so the worker's first read finds the request; one that
    # then sends is served as any other
    async with open_herd(app=app, workers=1, **options) as herd:
        host, port = address_of(herd)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            client_port = stream.socket.getsockname()[1]
            assert _server_side_state(port, client_port) == (
                "SYN_RECV" if deferred else "ESTABLISHED"
            )
            if app.startswith("apps.raw"):
                assert int(await receive_until(stream, b"\n")) == herd.workers[0].pid
                return
            await stream.send_all(GOOD)
            with trio.fail_after(30):
                assert status_of(await receive_all(stream)) == 200


def _server_side_state(port: int, client_port: int) -> str:
    """The kernel's state of the server's side of a 127.0.0.1 connection: SYN_RECV while
    the accept is deferred, ESTABLISHED once it is accepted or in the accept queue."""
    wanted = (f"0100007F:{port:04X}", f"0100007F:{client_port:04X}")
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == wanted:
                return {"01": "ESTABLISHED", "03": "SYN_RECV"}.get(fields[3], fields[3])
    return "MISSING"


async def test_idle_keep_alive_connection_is_closed_after_the_timeout() -> None:
    async with open_herd(app="apps.http_apps:native", workers=1, keep_alive_timeout=0.5) as herd:
        host, port = address_of(herd)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            first = await receive_until(stream, b"Hello, World!")
            assert status_of(first) == 200
            with trio.fail_after(30):
                assert await receive_all(stream) == b""


def test_asgi_lifespan_startup_failure_exits_3(cli_herd: Any) -> None:
    herd = cli_herd("apps.http_apps:asgi_lifespan_fails", "--workers", "2")
    assert herd.process.wait(60) == 3
    assert "cannot reach the database" in herd.stderr
    assert "listening on" not in herd.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--workers", "0"], "--workers"),
        (["--workers", "many"], "--workers"),
        (["--dispatch", "random"], "--dispatch"),
        (["--bind", "nowhere"], "--bind"),
        (["--no-such-option"], "--no-such-option"),
        (["--keyfile", "k.pem"], "--keyfile"),
    ],
)
def test_bad_option_exits_2_naming_it(args: list[str], named: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert named in result.stderr


CLI = [sys.executable, "-m", "trioherd", "serve", "--name", "bad-option"]


def test_bad_config_file_and_env_values_exit_2(tmp_path: Path) -> None:
    import os
    import sys

    config = tmp_path / "herd.toml"
    config.write_text('workers = 2\ngraceful-timeout = "soon"\n')
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "trioherd", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "--graceful-timeout" in result.stderr
    env["TRIOHERD_MAX_BODY_SIZE"] = "-5"
    result = subprocess.run(
        [sys.executable, "-m", "trioherd", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "--max-body-size" in result.stderr


async def test_asgi_app_with_lifespan_state_and_streaming() -> None:
    async with open_herd(app="apps.http_apps:asgi", workers=2) as herd:
        async with httpx.AsyncClient(base_url=herd.addresses[0]) as client:
            reply = await client.post("/x/y?q=1", content=b"payload")
            assert reply.json() == {
                "path": "/x/y",
                "query": "q=1",
                "scheme": "http",
                "body": "payload",
                "state": "hello from lifespan",
            }
            streamed = await client.get("/stream")
            assert streamed.text == "part 0\npart 1\npart 2\n"
            # header fields as a generator of bytes-like lists: whole, again, and streamed
            for target in ("/fields", "/fields", "/fields?stream"):
                reply = await client.get(target)
                assert reply.headers.get_list("x-gen") == ["0", "1"], reply.headers
                assert reply.text == "fields"


async def test_starlette_app_runs_on_the_herd() -> None:
    async with open_herd(app="apps.http_apps:starlette_app", workers=2) as herd:
        async with httpx.AsyncClient(base_url=herd.addresses[0]) as client:
            home = await client.get("/")
            assert home.text == "starlette on trio"
            echo = await client.post("/echo", json={"a": [1, 2]})
            assert echo.json()["got"] == {"a": [1, 2]}
            stream = await client.get("/stream")
            assert stream.text == "s0\ns1\ns2\n"
            missing = await client.get("/nope")
            assert missing.status_code == 404


def test_demo_app_names_the_worker(cli_herd: Any) -> None:
    herd = cli_herd("--workers", "2")
    url = herd.wait_ready()
    pages = {curl(url + "/").stdout for _ in range(4)}
    assert len(pages) == 2
    assert all(page.startswith("Hello from trioherd worker ") for page in pages)
    assert herd.stop() == 0


async def test_http_1_0_client_gets_its_answer_and_a_close() -> None:
    async with open_herd(app="apps.http_apps:native", workers=1) as herd:
        host, port = address_of(herd)
        data = await raw_exchange(host, port, b"GET / HTTP/1.0\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"connection: close\r\n" in data.lower()
        assert data.endswith(b"Hello, World!")


async def test_a_drain_answers_in_flight_requests_with_connection_close() -> None:
    async with open_herd(app="apps.http_apps:native", workers=1) as herd:
        host, port = address_of(herd)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            first = await receive_until(stream, b"Hello, World!")
            assert b"connection: close" not in first.lower()
            await stream.send_all(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            await trio.sleep(0.3)  # the slow request is now in the app
            async with trio.open_nursery() as nursery:
                nursery.start_soon(herd.stop)
                with trio.fail_after(30):
                    second = await receive_all(stream)
        assert second.startswith(b"HTTP/1.1 200 OK")
        assert b"connection: close\r\n" in second.lower()
        assert second.endswith(b"slow done\n")


async def test_a_bad_request_after_a_good_one_on_the_same_connection_gets_400() -> None:
    async with open_herd(app="apps.http_apps:native", workers=1) as herd:
        host, port = address_of(herd)
        data = await raw_exchange(
            host, port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGARBAGE GARBAGE\r\n\r\n"
        )
        first, _, second = data.partition(b"Hello, World!")
        assert status_of(first) == 200
        assert status_of(second) == 400


def responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split HTTP/1.1 responses: Content-Length, chunked or close-delimited bodies."""
    found = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            assert name.lower() not in headers, f"duplicate {name!r}"
            headers[name.lower()] = value.strip()
        body = b""
        if b"content-length" in headers:
            size = int(headers[b"content-length"])
            body, data = data[:size], data[size:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                if not size:
                    data = data[2:]
                    break
                body += data[:size]
                data = data[size + 2 :]
        elif headers.get(b"connection") == b"close":  # delimited by the close
            body, data = data, b""
        found.append((status, headers, body))
    return found


@TRIO_ONLY  # native framing: a native app's head goes out before it reads the body (an
# ASGI head waits for the first body message, so the twin would get a 100 Continue)
async def test_framing_edge_cases_keep_http_1_1_correct() -> None:
    async with open_herd(app="apps.edge_apps:app", workers=1) as herd:
        host, port = address_of(herd)
        close = b"Connection: close\r\n"

        # a response already under way gets no 100 Continue in its middle
        data = await raw_exchange(
            host,
            port,
            b"POST /stream-echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            + close
            + b"\r\nhello",
        )
        assert b"100 Continue" not in data
        ((status, _, body),) = responses(data)
        assert (status, body) == (200, b"hello")

        # HEAD: the app may declare the GET's length and send nothing
        data = await raw_exchange(
            host, port, b"HEAD /declared HTTP/1.1\r\nHost: t\r\n" + close + b"\r\n"
        )
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 10\r\n" in data
        assert data.endswith(b"\r\n\r\n")

        # an error after a HEAD on the same connection carries its whole body
        data = await raw_exchange(host, port, b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGARBAGE\r\n\r\n")
        head_answer, _, error = data.partition(b"\r\n\r\n")
        assert head_answer.startswith(b"HTTP/1.1 200")
        ((status, headers, body),) = responses(error)
        assert status == 400 and len(body) == int(headers[b"content-length"])

        # Content-Length and Transfer-Encoding together: answered, then closed (RFC 9112 6.1)
        data = await raw_exchange(
            host,
            port,
            b"POST /f HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\nGET /g HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        ((status, headers, _),) = responses(data)
        assert status == 200 and headers[b"connection"] == b"close"

        # a client waiting for 100-continue, answered without the body: told it closes
        data = await raw_exchange(
            host,
            port,
            b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        ((status, headers, _),) = responses(data)
        assert status == 200 and headers[b"connection"] == b"close"

        # an Upgrade offer with a body is declined, and the connection goes on
        data = await raw_exchange(
            host,
            port,
            b"POST /u HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 5\r\n\r\nhelloGET /after HTTP/1.1\r\nHost: t\r\n"
            + close
            + b"\r\n",
        )
        assert [r[2] for r in responses(data)] == [b"POST /u", b"GET /after"]

        # blank lines before a request line are ignored (RFC 9112 2.2)
        data = await raw_exchange(
            host,
            port,
            b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi\r\n\r\nGET /q HTTP/1.1\r\nHost: t\r\n"
            + close
            + b"\r\n",
        )
        assert [r[2] for r in responses(data)] == [b"POST /p", b"GET /q"]

        # what HTTP cannot carry is a 500, not bytes on the wire
        for path in (b"/interim", b"/control-char"):
            data = await raw_exchange(host, port, b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status_of(data) == 500, data

        # the app's Connection header is merged with ours, not repeated beside it
        data = await raw_exchange(host, port, b"GET /keep-alive-header HTTP/1.0\r\n\r\n")
        assert data.lower().count(b"connection:") == 1 and b"connection: close" in data


async def test_unread_body_then_close_reaches_the_client_intact() -> None:
    import http.client

    async with open_herd(app="apps.edge_apps:app", workers=1) as herd:
        host, port = address_of(herd)

        def post() -> tuple[int, bytes]:
            connection = http.client.HTTPConnection(host, port, timeout=30)
            try:
                connection.request(
                    "POST",
                    "/ignore",
                    body=b"x" * (8 * 1024 * 1024),
                    headers={"Connection": "close"},
                )
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        status, body = await trio.to_thread.run_sync(post)
        assert (status, body) == (200, b"ignored")
