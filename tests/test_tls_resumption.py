"""TLS session resumption across the herd: the primary makes one set of session-ticket keys
and every worker seals and opens tickets with it, so a returning client resumes on
whichever worker the dispatcher picks, TLS 1.2 and TLS 1.3, and across a rolling reload.

The clients are Python's ssl (blocking, in a thread: the primary runs in this test's Trio
loop) and the ``openssl s_client`` command when there is one.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from helpers import address_of, open_herd
from trioherd._tls import TICKET_KEYS_SIZE, new_ticket_keys, share_ticket_keys

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
RECONNECTS = 4


@dataclass(frozen=True)
class PKI:
    ca_pem: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    (directory / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(directory / "key.pem")
    return PKI(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")


def client_context(pki: PKI, version: str) -> ssl.SSLContext:
    """A client that trusts the test CA and speaks nothing newer than ``version``."""
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.maximum_version = VERSIONS[version]
    context.set_alpn_protocols(["http/1.1"])
    return context


def server_context(pki: PKI) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.cert), str(pki.key))
    return context


@dataclass(frozen=True)
class Visit:
    pid: int  # the worker that answered
    version: str
    reused: bool
    session: ssl.SSLSession


def visit(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Visit:
    """One request on a new connection, offering ``session`` for resumption. The response
    is read in full before the session is taken: with TLS 1.3 the ticket comes after the
    handshake."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), data
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            chunk = tls.recv(65536)
            assert chunk, body
            body += chunk
        answer: dict[str, Any] = json.loads(body)
        assert tls.session is not None
        return Visit(answer["pid"], tls.version() or "", bool(tls.session_reused), tls.session)


def first_and_reconnects(port: int, context: ssl.SSLContext) -> tuple[Visit, list[Visit]]:
    """A first visit, then RECONNECTS more, each offering the first visit's session."""
    first = visit(port, context)
    return first, [visit(port, context, first.session) for _ in range(RECONNECTS)]


# -- a herd of two: every reconnect resumes, whichever worker it lands on -----------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_a_client_resumes_its_session_on_every_worker(pki: PKI, version: str) -> None:
    context = client_context(pki, version)
    options = {"certfile": str(pki.cert), "keyfile": str(pki.key)}
    async with open_herd(app="apps.tls_apps:whoami", workers=2, **options) as herd:
        _, port = address_of(herd)
        first, again = await trio.to_thread.run_sync(first_and_reconnects, port, context)
        workers = {worker.pid for worker in herd.workers}
    assert first.version == f"TLSv{version}"
    assert not first.reused
    assert [v.reused for v in again] == [True] * RECONNECTS
    # round-robin: the reconnects landed on both workers, not only on the ticket's issuer
    pids = [v.pid for v in again]
    assert {first.pid, *pids} == workers
    assert any(pid != first.pid for pid in pids)


async def test_a_session_resumes_across_a_rolling_reload(pki: PKI) -> None:
    """The keys belong to the herd, not to a worker: new workers honour old tickets."""
    context = client_context(pki, "1.3")
    options = {"certfile": str(pki.cert), "keyfile": str(pki.key)}
    async with open_herd(app="apps.tls_apps:whoami", workers=2, **options) as herd:
        _, port = address_of(herd)
        first = await trio.to_thread.run_sync(visit, port, context)
        old_pids = {worker.pid for worker in herd.workers}
        await herd.reload()
        after = [await trio.to_thread.run_sync(visit, port, context, first.session) for _ in "ab"]
        assert {v.pid for v in after}.isdisjoint(old_pids)
        assert [v.reused for v in after] == [True, True]


async def test_a_factory_context_keeps_its_own_keys(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ssl_context_factory`` contexts are used as they are: tickets stay per worker, and
    a client resumes only on the worker that issued its ticket (docs/tls.md says so)."""
    monkeypatch.setenv("TLS_TEST_CERTFILE", str(pki.cert))  # the workers inherit these
    monkeypatch.setenv("TLS_TEST_KEYFILE", str(pki.key))
    factory = "apps.tls_apps:tls12_only_context"
    context = client_context(pki, "1.2")
    async with open_herd(
        app="apps.tls_apps:whoami", workers=2, ssl_context_factory=factory
    ) as herd:
        _, port = address_of(herd)
        first, again = await trio.to_thread.run_sync(first_and_reconnects, port, context)
    assert [v.reused for v in again] == [v.pid == first.pid for v in again]
    assert False in [v.reused for v in again]


# -- openssl s_client as a second client ---------------------------------------------------

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def s_client(port: int, pki: PKI, version: str, *args: str) -> str:
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            f"-tls{version.replace('.', '_')}",
            "-CAfile",
            str(pki.ca_pem),
            "-ign_eof",
            *args,
        ],
        input=REQUEST,
        capture_output=True,
        timeout=60,
    )
    return result.stdout.decode(errors="replace")


def reused_lines(output: str) -> int:
    return sum(line.startswith("Reused,") for line in output.splitlines())


def s_client_reconnects(port: int, pki: PKI, version: str, tmp: Path) -> list[bool]:
    """``-sess_out`` on a first connection that reads the response (so a TLS 1.3 ticket
    has come), then RECONNECTS connections with ``-sess_in``: was each one resumed?"""
    session = tmp / f"session-{version}.pem"
    s_client(port, pki, version, "-sess_out", str(session))
    assert session.exists()
    return [
        reused_lines(s_client(port, pki, version, "-sess_in", str(session))) == 1
        for _ in range(RECONNECTS)
    ]


@pytest.fixture
def openssl() -> Iterator[None]:
    if shutil.which("openssl") is None:
        print("skipped: no openssl command on PATH")
        pytest.skip("no openssl command on PATH")
    yield


@pytest.mark.usefixtures("openssl")
async def test_openssl_s_client_resumes_on_every_worker(pki: PKI, tmp_path: Path) -> None:
    options = {"certfile": str(pki.cert), "keyfile": str(pki.key)}
    async with open_herd(app="apps.tls_apps:whoami", workers=2, **options) as herd:
        _, port = address_of(herd)
        for version in ("1.2", "1.3"):
            reused = await trio.to_thread.run_sync(
                s_client_reconnects, port, pki, version, tmp_path
            )
            assert reused == [True] * RECONNECTS, version
        # -reconnect: five more connections, each offering the session of the one before.
        # TLS 1.2 only: with TLS 1.3, s_client reconnects before it has read a ticket.
        output = await trio.to_thread.run_sync(lambda: s_client(port, pki, "1.2", "-reconnect"))
        assert reused_lines(output) == 5, output


# -- share_ticket_keys on its own: contexts in this process, handshakes in memory ----------


def handshake(
    client_context: ssl.SSLContext,
    server_context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> ssl.SSLObject:
    """A client's connection to a server, through memory; a byte of data goes server to
    client after the handshake, so that the client reads any TLS 1.3 ticket."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(
        to_client, to_server, server_hostname="127.0.0.1", session=session
    )
    server = server_context.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(4):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
    server.write(b"!")
    assert client.read(1) == b"!"
    return client


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_contexts_with_the_same_keys_resume_each_others_sessions(pki: PKI, version: str) -> None:
    keys = new_ticket_keys()
    assert len(keys) == TICKET_KEYS_SIZE
    first, second, stranger = server_context(pki), server_context(pki), server_context(pki)
    assert share_ticket_keys(first, keys.hex())
    assert share_ticket_keys(second, keys.hex())
    client = client_context(pki, version)
    session = handshake(client, first).session
    assert session is not None and session.has_ticket
    assert handshake(client, second, session).session_reused
    assert handshake(client, first, session).session_reused
    # what every worker had before: keys of its own, so another one's ticket is refused
    assert not handshake(client, stranger, session).session_reused


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ("00" * 48, "48 bytes of keys, not 80"),
        ("not hex", "ValueError"),
        (b"\0" * 80, "not a hex string"),
    ],
)
def test_keys_that_cannot_be_installed_leave_the_context_working(
    pki: PKI, keys: object, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    context = server_context(pki)
    with caplog.at_level(logging.WARNING, logger="trioherd.tls"):
        assert not share_ticket_keys(context, keys)
    assert len(caplog.records) == 1
    assert reason in caplog.text
    assert "stay per worker" in caplog.text
    client = client_context(pki, "1.3")
    session = handshake(client, context).session
    assert handshake(client, context, session).session_reused  # its own keys still work


def test_no_keys_is_plain_http_and_says_nothing(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="trioherd.tls"):
        assert not share_ticket_keys(server_context(pki), None)
        assert not share_ticket_keys(server_context(pki), "")
    assert caplog.records == []


def test_something_that_is_not_an_ssl_context_is_refused_without_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="trioherd.tls"):
        assert not share_ticket_keys(object(), new_ticket_keys().hex())  # type: ignore[arg-type]
    assert "not a CPython ssl.SSLContext" in caplog.text
