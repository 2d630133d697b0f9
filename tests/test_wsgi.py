"""WSGI apps (PEP 3333) on the herd (issue 27): detection, the environ, wsgi.input streamed
from the socket, responses streamed as produced, close() always called, file_wrapper by
sendfile (and copied under TLS), errors, a saturated thread pool, drains, Flask, Django.

Every herd here runs real worker processes; the test apps are in tests/apps/wsgi_apps.py
(plain callables, one wrapped in wsgiref's validator), flask_app.py and
django_wsgi_app.py. Cues between a test and an app's thread are files (see wsgi_apps).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

from helpers import CLIHerd, address_of, open_herd, receive_all, receive_until, wait_until
from trioherd._errors import ConfigError
from trioherd.apps.loading import detect_interface

# every test here runs with h11 and with httptools (conftest.http_parser)
# a WSGI app is served on the Trio runtime's threads (--asyncio serves ASGI apps)
pytestmark = [pytest.mark.usefixtures("http_parser"), pytest.mark.trio_only]

TIMEOUT = 30


async def wait_for_path(path: Path, timeout: float = TIMEOUT) -> None:
    with trio.fail_after(timeout):
        while not path.exists():
            await trio.sleep(0.01)


async def raw_request(herd: Any, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    host, port = address_of(herd)
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(data)
            return await receive_all(stream)


# -- detection ----------------------------------------------------------------------------


def test_wsgi_apps_are_detected_without_a_flag_and_misfits_are_refused() -> None:
    from apps import flask_app, wsgi_apps

    assert detect_interface(wsgi_apps.app) == "wsgi"  # def app(environ, start_response)
    assert detect_interface(wsgi_apps.handler) == "wsgi"  # an object's __call__
    assert detect_interface(flask_app.app) == "wsgi"  # Flask, unchanged
    assert detect_interface(wsgi_apps.validated) == "wsgi"  # lint_app(*args, **kw)
    # two parameters, async: not WSGI, and refused when named so
    assert detect_interface(wsgi_apps.async_two) == "native"
    with pytest.raises(ConfigError, match="async def, not a WSGI app"):
        detect_interface(wsgi_apps.async_two, "wsgi")
    # a WSGI function named as another interface: a plain def there fails every request
    for other in ("asgi", "native"):
        with pytest.raises(ConfigError, match="plain function"):
            detect_interface(wsgi_apps.app, other)


def test_interface_and_threads_are_checked_with_exit_2() -> None:
    for args, message in (
        (["--interface", "cgi"], "argument --interface: invalid choice: 'cgi'"),
        (["--threads", "0"], "--threads: must be >= 1 (got 0)"),
        (["--root-path", "api"], "--root-path: must start with / (got 'api')"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "trioherd", "serve", "apps.wsgi_apps:app", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr


# -- the environ and the body, under wsgiref's validator ------------------------------------


def test_validated_app_environ_body_chunked_100_continue_and_head(cli_herd: Any) -> None:
    herd: CLIHerd = cli_herd(
        "apps.wsgi_apps:validated", "--interface", "wsgi", "--workers", "1", "--threads", "4"
    )
    url = herd.wait_ready()
    port = herd.port
    with httpx.Client(timeout=TIMEOUT) as client:
        reply = client.get(
            url + "/echo/caf%C3%A9%2Fx?a=1&b=%20",
            headers=[
                ("X-Multi", "one"),
                ("X-Multi", "two"),
                ("Cookie", "a=1"),
                ("Cookie", "b=2"),
                ("X-Under_Score", "spoofed"),
            ],
        )
        assert reply.status_code == 200, reply.text
        env = reply.json()
        assert env["REQUEST_METHOD"] == "GET"
        assert env["SCRIPT_NAME"] == ""
        # percent-decoded bytes, as latin-1 (PEP 3333's "bytes in a str"); %2F is a slash
        assert env["PATH_INFO"] == "/echo/caf\u00c3\u00a9/x"
        assert env["QUERY_STRING"] == "a=1&b=%20"
        assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == str(port)
        assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
        assert env["REMOTE_ADDR"] == "127.0.0.1" and int(env["REMOTE_PORT"]) > 0
        assert env["HTTP_HOST"] == f"127.0.0.1:{port}"
        assert env["HTTP_X_MULTI"] == "one,two"
        assert env["HTTP_COOKIE"] == "a=1; b=2"
        assert env["HTTP_X_UNDER_SCORE"] is None  # dropped: it would pass for X-Under-Score
        assert env["CONTENT_LENGTH"] is None and env["body"] == ""
        assert env["wsgi.url_scheme"] == "http"
        assert env["wsgi.multithread"] is True and env["wsgi.multiprocess"] is True
        assert env["wsgi.run_once"] is False and env["wsgi.version"] == [1, 0]
        assert env["wsgi.input_terminated"] is True

        posted = client.post(url + "/echo", content=b"k=v&x=y", headers={"Content-Type": "a/b"})
        assert posted.json()["body"] == "k=v&x=y"
        assert posted.json()["CONTENT_TYPE"] == "a/b"
        assert posted.json()["CONTENT_LENGTH"] == "7"

        def pieces() -> Any:
            yield b"chunked "
            yield b"upload"

        chunked = client.post(url + "/echo", content=pieces())
        assert chunked.json()["body"] == "chunked upload"
        assert chunked.json()["CONTENT_LENGTH"] is None

        big = os.urandom(3 << 20)
        assert client.post(url + "/count", content=big).text == str(len(big))

        head = client.head(url + "/echo")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 0

    # 100-continue: sent when the app first reads wsgi.input, then the body comes
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"later")
        answer = b""
        while b'"body": "later"' not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert herd.stop() == 0
    log = herd.stderr
    for problem in ("AssertionError", "WSGIWarning", "Exception ignored", "Traceback"):
        assert problem not in log, log


async def test_body_reads_write_callable_and_root_path() -> None:
    async with open_herd(app="apps.wsgi_apps:app", workers=1, root_path="/api") as herd:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            body = b"hello\nworld\nfoo\nbar\nbaz\nlast"
            reads = (await client.post(herd.url + "/api/reads", content=body)).json()
            assert reads == [
                ["read", 5, "hello"],
                ["readline", None, "\n"],
                ["readline", 3, "wor"],
                ["readlines", 1, ["ld\n"]],
                ["iter", None, ["foo\n", "bar\n", "baz\n", "last"]],
                ["read", None, ""],
            ]
            # the same, with the body arriving in many small chunks
            pieces = [body[i : i + 3] for i in range(0, len(body), 3)]

            async def trickle() -> AsyncIterator[bytes]:
                for piece in pieces:
                    yield piece

            assert (await client.post(herd.url + "/api/reads", content=trickle())).json() == reads

            written = await client.get(herd.url + "/api/write")
            assert written.text == "written twice then returned"
            assert written.headers["transfer-encoding"] == "chunked"

            # a body the app did not read is read and dropped: the connection goes on
            both = await raw_request(
                herd,
                b"POST /api/ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n0123456789"
                b"GET /api/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            )
            assert both.count(b"HTTP/1.1 200 OK") == 2, both
            assert both.endswith(b"Hello, WSGI!") and b"not read" in both

            inside = (await client.get(herd.url + "/api/echo")).json()
            assert (inside["SCRIPT_NAME"], inside["PATH_INFO"]) == ("/api", "/echo")
            outside = (await client.get(herd.url + "/apiary/echo")).json()
            assert (outside["SCRIPT_NAME"], outside["PATH_INFO"]) == ("/api", "/apiary/echo")


# -- responses: streaming, close(), file_wrapper ---------------------------------------------


async def test_a_body_is_streamed_as_produced_and_close_is_always_called(
    tmp_path: Path,
) -> None:
    async with open_herd(app="apps.wsgi_apps:app", workers=1) as herd:
        host, port = address_of(herd)
        gate = tmp_path / "gate"
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(
                    f"GET /stream?gate={gate} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
                )
                first = await receive_until(stream, b"before the gate\n")
                assert b"after" not in first  # the app waits for the gate: nothing more yet
                gate.touch()
                rest = await receive_until(stream, b"0\r\n\r\n")
                assert b"after the gate\n" in rest

            # close() after a complete response
            done = tmp_path / "done"
            reply = await raw_request(
                herd,
                f"GET /closing?mark={done} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode(),
            )
            assert reply.endswith(b"\r\n\r\nfirst\nlast\n")  # delimited by the close
            await wait_for_path(done)

            # close() after the body failed midway: the connection ends unfinished
            failed = tmp_path / "failed"
            reply = await raw_request(
                herd, f"GET /closing?fail=1&mark={failed} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
            )
            assert reply.startswith(b"HTTP/1.1 200 OK") and b"first\n" in reply
            assert not reply.endswith(b"0\r\n\r\n")  # never the last chunk of a broken body
            await wait_for_path(failed)

            # close() when the client went away while the app was still producing
            gone, gate2 = tmp_path / "gone", tmp_path / "gate2"
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                query = f"gate={gate2}&more=400&mark={gone}"
                await stream.send_all(f"GET /closing?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                await receive_until(stream, b"first\n")
            gate2.touch()  # 25 MiB more to a closed socket: a send fails, iteration stops
            await wait_for_path(gone)

        async with httpx.AsyncClient(timeout=TIMEOUT) as client:  # the worker serves on
            assert (await client.get(herd.url + "/")).text == "Hello, WSGI!"


async def test_a_client_that_reads_nothing_holds_the_app_back(tmp_path: Path) -> None:
    """Back-pressure: each piece waits for the one before it to be written, so an app
    streaming 128 MiB to a client that reads nothing stops at what the sockets hold,
    until the send timeout resets the connection; then close() is called."""
    mark = tmp_path / "closed"
    async with open_herd(app="apps.wsgi_apps:app", workers=1, send_timeout=1) as herd:
        host, port = address_of(herd)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            query = f"more=2048&mark={mark}"
            await stream.send_all(f"GET /closing?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            await wait_for_path(mark)
        produced = int(mark.read_text().rpartition(" ")[2])
        assert produced < 1024, produced  # not even half: the app was held back


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    directory = tmp_path_factory.mktemp("wsgi-pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    (directory / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(directory / "key.pem")
    return directory / "cert.pem", directory / "key.pem", directory / "ca.pem"


@pytest.mark.parametrize("tls", [False, True], ids=["sendfile", "tls-copy"])
async def test_file_wrapper_sendfile_on_plain_and_a_copy_under_tls(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], tls: bool
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    cert, key, ca = tls_files
    options: dict[str, Any] = {"certfile": str(cert), "keyfile": str(key)} if tls else {}
    async with open_herd(app="apps.wsgi_apps:app", workers=1, **options) as herd:
        url = herd.url.replace("http://", "https://") if tls else herd.url
        verify: Any = ssl.create_default_context(cafile=str(ca)) if tls else True
        async with httpx.AsyncClient(timeout=TIMEOUT, verify=verify) as client:
            mark = tmp_path / "whole"
            reply = await client.get(url + "/file", params={"path": str(path), "mark": str(mark)})
            assert reply.status_code == 200
            assert reply.headers["content-length"] == str(len(data))
            assert reply.content == data
            await wait_for_path(mark)  # the wrapper's close() closed the file
            reads = int(mark.read_text().partition("reads=")[2])
            # plain: the kernel sent it (sendfile), Python never read it; TLS: read and copied
            assert (reads > 0) if tls else (reads == 0), reads

            part = await client.get(
                url + "/file", params={"path": str(path), "offset": "1000", "length": "5000"}
            )
            assert part.content == data[1000:6000]

            head = await client.head(url + "/file", params={"path": str(path)})
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-length"] == str(len(data))

            # a declared length the file does not have: refused before anything is sent
            lying = await client.get(
                url + "/file", params={"path": str(path), "length": str(len(data) + 1)}
            )
            assert lying.status_code == 500

            # keep-alive goes on after a file
            again = await client.get(url + "/file", params={"path": str(path), "offset": "7"})
            assert again.content == data[7:]
            assert (await client.get(url + "/")).text == "Hello, WSGI!"


async def test_a_file_for_a_client_that_reads_nothing_is_cut_at_the_send_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "big.bin"
    with open(path, "wb") as file:
        file.truncate(256 * 1024 * 1024)  # sparse: 256 MiB of zeros, more than sockets hold
    mark = tmp_path / "closed"
    async with open_herd(app="apps.wsgi_apps:app", workers=1, send_timeout=1) as herd:
        (worker,) = herd.workers
        host, port = address_of(herd)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            query = f"path={path}&mark={mark}"
            await stream.send_all(f"GET /file?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            await wait_for_path(mark)  # cut: the sendfile ended, and the file was closed
            assert mark.read_text() == "closed reads=0"
            with trio.fail_after(TIMEOUT):  # the cut is counted, like any send timeout's
                while worker.stats.get("cuts", {}).get("send_timeout", 0) < 1:
                    await trio.sleep(0.05)
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:  # the worker serves on
            assert (await client.get(herd.url + "/")).text == "Hello, WSGI!"


# -- errors ----------------------------------------------------------------------------------


def test_errors_before_and_after_the_head_and_misuse_of_start_response(
    cli_herd: Any,
) -> None:
    herd: CLIHerd = cli_herd("apps.wsgi_apps:app", "--workers", "1")
    url = herd.wait_ready()
    with httpx.Client(timeout=TIMEOUT) as client:
        assert client.get(url + "/echo").status_code == 200
        for path in ("/boom", "/twice", "/bad_status", "/str_body"):
            reply = client.get(url + path)
            assert reply.status_code == 500, path
            assert reply.text == "500 Internal Server Error\n"
        # start_response again with exc_info before anything was sent: the new status
        error_page = client.get(url + "/exc_info")
        assert (error_page.status_code, error_page.text) == (503, "error page")
        # after the head: the connection ends, the body unfinished
        for path in ("/exc_info?late=1", "/short"):
            with pytest.raises(httpx.RemoteProtocolError):
                client.get(url + path)
        assert client.get(url + "/errors").text == "logged"
        assert client.get(url + "/echo").status_code == 200  # the worker serves on
    assert herd.stop() == 0
    log = herd.stderr
    assert log.count("app raised on GET /boom") == 1
    assert "ValueError: the WSGI app failed on purpose" in log
    assert "start_response called a second time without exc_info" in log
    assert "start_response: invalid status 'OK'" in log
    assert "the app's body must be bytes, not str" in log
    assert "KeyError: 'lookup failed'" in log  # re-raised from exc_info, after the head
    assert "body shorter than its content-length" in log
    assert "[w1] a line for wsgi.errors" in log
    assert len(re.findall(r"worker \d+ \(pid \d+\) ready", log)) == 1, log  # never replaced


# -- threads: a saturated pool, a drain ---------------------------------------------------


async def test_a_saturated_pool_queues_requests_while_the_loop_serves_on(tmp_path: Path) -> None:
    async with open_herd(
        app="apps.wsgi_apps:app", workers=1, threads=2, max_body_size=1000
    ) as herd:
        (worker,) = herd.workers
        gate = tmp_path / "gate"
        marks = [tmp_path / f"started{i}" for i in range(3)]
        replies: list[httpx.Response] = []

        async def blocked(client: httpx.AsyncClient, mark: Path) -> None:
            params = {"gate": str(gate), "mark": str(mark)}
            replies.append(await client.get(herd.url + "/block", params=params))

        limits = httpx.Limits(max_connections=10)
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked, client, marks[0])
                nursery.start_soon(blocked, client, marks[1])
                await wait_for_path(marks[0])
                await wait_for_path(marks[1])
                nursery.start_soon(blocked, client, marks[2])  # no thread for it: it waits
                # meanwhile the event loop answers what needs no thread, promptly
                bad = await raw_request(herd, b"GARBAGE\r\n\r\n")
                assert bad.startswith(b"HTTP/1.1 400 ")
                too_big = await raw_request(
                    herd, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n"
                )
                assert too_big.startswith(b"HTTP/1.1 413 ")
                assert not marks[2].exists()  # the pool holds two threads, both blocked
                # and its heartbeat goes on: the primary hears of the 400 and the 413
                with trio.fail_after(TIMEOUT):
                    while worker.stats.get("status", {}).get("4xx", 0) < 2:
                        await trio.sleep(0.05)
                gate.touch()
            assert [r.text for r in replies] == ["unblocked"] * 3
            assert marks[2].exists()
            assert herd.workers[0].pid == worker.pid


async def test_a_drain_lets_requests_on_threads_finish_then_abandons_stuck_ones(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    started = tmp_path / "started"
    async with open_herd(app="apps.wsgi_apps:app", workers=1, graceful_timeout=10) as herd:
        host, port = address_of(herd)
        stream = await trio.open_tcp_stream(host, port)
        async with stream, trio.open_nursery() as nursery:
            query = f"gate={gate}&mark={started}"
            await stream.send_all(f"GET /block?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            await wait_for_path(started)
            nursery.start_soon(herd.stop)
            with trio.fail_after(TIMEOUT):
                while herd.workers and herd.workers[0].state.value != "disconnecting":
                    await trio.sleep(0.01)
            gate.touch()  # the view returns during the drain: answered, then closed
            with trio.fail_after(TIMEOUT):
                answer = await receive_all(stream)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert b"connection: close\r\n" in answer.lower()
        assert answer.endswith(b"unblocked")

    # a view still blocked when the grace runs out: the worker leaves its thread behind and
    # exits on time, by itself (not killed by the primary)
    stuck = tmp_path / "stuck"
    async with open_herd(app="apps.wsgi_apps:app", workers=1, graceful_timeout=1) as herd:
        host, port = address_of(herd)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            query = f"gate={tmp_path / 'never'}&mark={stuck}"
            await stream.send_all(f"GET /block?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            await wait_for_path(stuck)
            exits = herd.events("exit")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(herd.stop)
                with trio.fail_after(TIMEOUT):
                    event = await exits.__anext__()
            assert (event.exit_code, event.signal, event.requested) == (0, None, True)
            with trio.fail_after(TIMEOUT):
                assert await receive_all(stream) == b""  # closed unanswered at the deadline


# -- frameworks ------------------------------------------------------------------------------


async def test_flask_unchanged_forms_json_streams_files_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300_000)
    (tmp_path / "flask.bin").write_bytes(data)
    monkeypatch.setenv("TRIOHERD_TEST_FILE", str(tmp_path / "flask.bin"))
    async with open_herd(app="apps.flask_app:app", workers=2, root_path="/site") as herd:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            base = herd.url + "/site"
            assert (await client.get(base + "/")).text == "hello from flask"
            form = (await client.post(base + "/form", data={"name": "ada"})).json()
            assert form == {"name": "ada", "root": "/site", "url": base + "/form"}
            posted = (await client.post(base + "/json", json={"k": [1, 2]})).json()
            assert posted["got"] == {"k": [1, 2]}
            streamed = await client.get(base + "/stream")
            assert streamed.text == "line 0\nline 1\nline 2\n"
            assert streamed.headers["transfer-encoding"] == "chunked"
            sent = await client.get(base + "/file")
            assert sent.content == data
            boom = await client.get(base + "/boom")
            assert boom.status_code == 500


async def test_django_wsgi_handler_unchanged() -> None:
    async with open_herd(app="apps.django_wsgi_app:app", workers=1, threads=4) as herd:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            hello = await client.get(herd.url + "/")
            assert hello.text == "hello from django wsgi at / ()"
            echoed = await client.post(herd.url + "/echo", content=b"to django")
            assert echoed.content == b"to django"
            streamed = await client.get(herd.url + "/stream")
            assert streamed.text == "part 0\npart 1\npart 2\n"
            # Django's close() (request_finished) ran for each response before this one
            finished = await client.get(herd.url + "/finished")
            assert int(finished.text) >= 3


# -- herd features ---------------------------------------------------------------------------


def test_access_log_json_max_requests_and_status_with_threads(
    cli_herd: Any, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    herd: CLIHerd = cli_herd(
        "apps.wsgi_apps:app",
        "--workers",
        "1",
        "--threads",
        "3",
        "--access-log",
        "--log-format",
        "json",
        "--max-requests",
        "6",
    )
    assert wait_until(lambda: '"listening on ' in herd.stderr, 60), herd.stderr
    url = json.loads(herd.stderr.splitlines()[0])["url"]
    pids = set()
    with httpx.Client(timeout=TIMEOUT) as client:
        assert client.get(url + "/file", params={"path": str(path)}).content == data
        assert client.post(url + "/echo", content=b"x" * 10).status_code == 200
        status = json.loads(herd.control("status", "--json").stdout)
        assert wait_until(
            lambda: (
                json.loads(herd.control("status", "--json").stdout)["workers"][0]["requests"] >= 2
            ),
            TIMEOUT,
        ), status
        pids.add(status["workers"][0]["pid"])

        def recycled() -> bool:
            client.get(url + "/")
            workers = json.loads(herd.control("status", "--json").stdout)["workers"]
            pids.update(worker["pid"] for worker in workers)
            return len(pids) > 1

        assert wait_until(recycled, TIMEOUT)  # max-requests replaced the worker
    assert herd.stop() == 0
    records = [json.loads(line) for line in herd.stderr.splitlines() if line.startswith("{")]
    access = [r for r in records if r["logger"] == "trioherd.access"]
    (download,) = [r for r in access if r["path"].startswith("/file")]
    assert download["status"] == 200 and download["method"] == "GET"
    assert len(data) < download["bytes"] < len(data) + 1000  # the sendfile's bytes counted
