"""HTTPS terminated in real worker processes: clients (httpx, curl, raw ssl), mutual TLS,
version floor, hostile clients, misconfiguration, rotation by reload, the library hook,
and the runnable example."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

import trioherd
from helpers import (
    ROOT,
    address_of,
    open_herd,
    receive_all,
    receive_until,
    unique_name,
    wait_until,
)

# every test here runs with h11 and with httptools (conftest.http_parser)
pytestmark = pytest.mark.usefixtures("http_parser")

PASSWORD = "correct horse"


@dataclass(frozen=True)
class PKI:
    """A throwaway CA and what it signed, as PEM files (the workers read files)."""

    ca: trustme.CA
    ca_pem: Path
    cert: Path  # server certificate chain for 127.0.0.1 and localhost
    key: Path
    encrypted_key: Path  # the same key, encrypted with PASSWORD
    other_key: Path  # a key that belongs to another certificate
    garbage: Path
    client: Path  # key + chain of a client certificate for "alice", signed by the CA
    stranger: Path  # key + chain of a client certificate signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    (directory / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(directory / "key.pem")
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), password=None)
    (directory / "encrypted-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSWORD.encode()),
        )
    )
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(directory / "other-key.pem")
    (directory / "garbage.pem").write_text("this is not PEM\n")
    client = ca.issue_cert("alice@example.org", common_name="alice")
    client.private_key_and_cert_chain_pem.write_to_path(directory / "client.pem")
    stranger = trustme.CA().issue_cert("mallory@example.org", common_name="mallory")
    stranger.private_key_and_cert_chain_pem.write_to_path(directory / "stranger.pem")
    return PKI(
        ca=ca,
        ca_pem=directory / "ca.pem",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        encrypted_key=directory / "encrypted-key.pem",
        other_key=directory / "other-key.pem",
        garbage=directory / "garbage.pem",
        client=directory / "client.pem",
        stranger=directory / "stranger.pem",
    )


def tls_options(pki: PKI, **options: Any) -> dict[str, Any]:
    return {"certfile": str(pki.cert), "keyfile": str(pki.key), **options}


def tls_args(pki: PKI, *args: str) -> list[str]:
    return ["--certfile", str(pki.cert), "--keyfile", str(pki.key), *args]


def client_context(pki: PKI, cert: Path | None = None) -> ssl.SSLContext:
    """What a client that trusts the test CA uses (and presents ``cert`` if given)."""
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.set_alpn_protocols(["http/1.1"])
    if cert is not None:
        context.load_cert_chain(str(cert))
    return context


def old_client_context(pki: PKI, maximum: str) -> ssl.SSLContext:
    """A client that offers nothing newer than ``maximum`` ("1.1" or "1.2"). TLS 1.1 needs
    the old cipher suites and security level 0, or this OpenSSL would not even offer it."""
    context = client_context(pki)
    with warnings.catch_warnings():  # ssl.TLSVersion.TLSv1_1 is deprecated, which is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        if maximum == "1.1":
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        else:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


# -- clients ---------------------------------------------------------------------------


async def https_get(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    """One request on a new connection; the JSON the test app answered with."""
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=context, https_compatible=True
    )
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = await receive_all(stream)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), response
    result: dict[str, Any] = json.loads(body)
    return result


async def refusal(port: int, context: ssl.SSLContext) -> ssl.SSLError:
    """The TLS error of a client the server refuses: the alert the server sent, in the
    handshake or, with TLS 1.3, at the first read (the server judges the client's
    certificate after the client's side of the handshake is done). Nothing is sent, so
    the alert is not lost to a reset."""
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=context, https_compatible=True
    )
    with pytest.raises(trio.BrokenResourceError) as caught:
        try:
            await stream.do_handshake()
            await stream.receive_some(1024)
        finally:
            await trio.aclose_forcefully(stream)
    assert isinstance(caught.value.__cause__, ssl.SSLError), repr(caught.value.__cause__)
    return caught.value.__cause__


def handshake_in_memory(client_context: ssl.SSLContext, server_context: ssl.SSLContext) -> str:
    """The TLS version the two contexts agree on, or "" if they cannot (no sockets)."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server, server_hostname="127.0.0.1")
    server = server_context.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(4):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                return ""
    return client.version() or ""


def sync_get(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    """One request on a new connection, from a blocking client (for CLI herds)."""
    response = httpx.get(f"https://127.0.0.1:{port}/", verify=context, timeout=30)
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def read_until_closed(sock: socket.socket, timeout: float = 30) -> bytes:
    """What the server sends until it closes (EOF or reset); socket.timeout (a failure)
    if it has not closed within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100  # a handshake record
    return hello


def assert_no_crash(log: str) -> None:
    assert "Traceback" not in log, log
    assert "connection handler failed" not in log, log


# -- HTTPS with real clients ------------------------------------------------------------


def test_httpx_and_curl_with_keep_alive_on_a_two_worker_herd(cli_herd: Any, pki: PKI) -> None:
    herd = cli_herd("apps.tls_apps:whoami", "--workers", "2", *tls_args(pki))
    url = herd.wait_ready()
    assert url == f"https://127.0.0.1:{herd.port}"
    status = json.loads(herd.control("status", "--json").stdout)
    assert status["listeners"] == [url]
    pids = {worker["pid"] for worker in status["workers"]}
    assert len(pids) == 2

    context = client_context(pki)
    with httpx.Client(verify=context, timeout=30) as client:
        answers = [client.get(f"{url}/").json() for _ in range(5)]
    # one connection: the same client port and the same worker for all five requests
    assert len({(a["pid"], a["client_port"]) for a in answers}) == 1, answers
    tls = answers[0]["tls"]
    assert answers[0]["scheme"] == "https"
    assert tls["version"] == "TLSv1.3"
    assert tls["alpn"] == "http/1.1"
    assert tls["cipher"].startswith("TLS_")
    assert tls["peer_subject"] is None
    # new connections go round the herd
    assert {sync_get(herd.port, context)["pid"] for _ in range(4)} == pids

    result = subprocess.run(
        ["curl", "-sv", "--cacert", str(pki.ca_pem), *[f"{url}/"] * 3],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Re-using existing connection") == 2, result.stderr
    assert "ALPN: server accepted http/1.1" in result.stderr
    decoder = json.JSONDecoder()
    curled, text = [], result.stdout
    while text:
        answer, end = decoder.raw_decode(text)
        curled.append(answer)
        text = text[end:]
    assert len(curled) == 3
    assert len({(a["pid"], a["client_port"]) for a in curled}) == 1, curled
    assert curled[0]["pid"] in pids
    assert herd.stop() == 0
    assert_no_crash(herd.stderr)


def test_curl_without_the_ca_is_refused(cli_herd: Any, pki: PKI) -> None:
    herd = cli_herd("apps.tls_apps:whoami", "--workers", "1", *tls_args(pki))
    url = herd.wait_ready()
    result = subprocess.run(["curl", "-s", f"{url}/"], capture_output=True, timeout=60)
    assert result.returncode == 60  # CURLE_PEER_FAILED_VERIFICATION: the server is real TLS
    assert sync_get(herd.port, client_context(pki))["scheme"] == "https"
    assert herd.stop() == 0


async def test_asgi_app_sees_https_scheme_and_the_tls_extension(pki: PKI) -> None:
    options = tls_options(pki, ca_certs=str(pki.ca_pem), client_cert="optional")
    async with open_herd(app="apps.tls_apps:asgi_whoami", workers=1, **options) as herd:
        _, port = address_of(herd)
        answer = await https_get(port, client_context(pki, pki.client))
        assert answer["scheme"] == "https"
        tls = answer["tls"]
        assert tls["tls_version"] == 0x0304
        assert tls["client_cert_name"].startswith("CN=alice,")
        anonymous = await https_get(port, client_context(pki))
        assert anonymous["tls"]["client_cert_name"] is None


# -- client certificates ----------------------------------------------------------------


async def test_required_client_certificate(pki: PKI) -> None:
    options = tls_options(pki, ca_certs=str(pki.ca_pem), client_cert="required")
    async with open_herd(app="apps.tls_apps:whoami", workers=1, **options) as herd:
        _, port = address_of(herd)
        (worker,) = herd.workers
        error = await refusal(port, client_context(pki))
        assert "CERTIFICATE_REQUIRED" in str(error), error
        # a certificate from a CA the server does not trust is refused too
        error = await refusal(port, client_context(pki, pki.stranger))
        assert "UNKNOWN_CA" in str(error), error
        # TLS 1.2 refuses in the handshake itself
        error = await refusal(port, old_client_context(pki, "1.2"))
        assert "ALERT_HANDSHAKE_FAILURE" in str(error), error
        answer = await https_get(port, client_context(pki, pki.client))
        assert answer["pid"] == worker.pid
        subject = answer["tls"]["peer_subject"]
        assert subject.startswith("CN=alice,"), subject
        assert subject.endswith(",O=trustme v" + trustme.__version__), subject


async def test_optional_client_certificate(pki: PKI) -> None:
    options = tls_options(pki, ca_certs=str(pki.ca_pem), client_cert="optional")
    async with open_herd(app="apps.tls_apps:whoami", workers=1, **options) as herd:
        _, port = address_of(herd)
        anonymous = await https_get(port, client_context(pki))
        assert anonymous["tls"]["peer_subject"] is None
        alice = await https_get(port, client_context(pki, pki.client))
        assert alice["tls"]["peer_subject"].startswith("CN=alice,")
        # optional means "may be absent", not "may be forged"
        error = await refusal(port, client_context(pki, pki.stranger))
        assert "UNKNOWN_CA" in str(error), error
        assert alice["pid"] == anonymous["pid"] == herd.workers[0].pid


# -- protocol versions ------------------------------------------------------------------


async def test_tls_1_1_client_is_refused_by_the_default_minimum(pki: PKI) -> None:
    old_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old_server.load_cert_chain(pki.cert, pki.key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_server.minimum_version = ssl.TLSVersion.TLSv1_1
    old_server.set_ciphers("DEFAULT:@SECLEVEL=0")
    if handshake_in_memory(old_client_context(pki, "1.1"), old_server) != "TLSv1.1":
        # the refusal would be the client's own; the version floor is still tested by
        # test_tls_min_version_1_3_refuses_a_tls_1_2_client
        pytest.skip("this OpenSSL cannot speak TLS 1.1 at all")
    async with open_herd(app="apps.tls_apps:whoami", workers=1, **tls_options(pki)) as herd:
        _, port = address_of(herd)
        error = await refusal(port, old_client_context(pki, "1.1"))
        assert "ALERT_PROTOCOL_VERSION" in str(error), error  # the server said no
        # the same kind of client, allowed TLS 1.2, gets in: it was the version
        answer = await https_get(port, old_client_context(pki, "1.2"))
        assert answer["tls"]["version"] == "TLSv1.2"


async def test_tls_min_version_1_3_refuses_a_tls_1_2_client(pki: PKI) -> None:
    options = tls_options(pki, tls_min_version="1.3")
    async with open_herd(app="apps.tls_apps:whoami", workers=1, **options) as herd:
        _, port = address_of(herd)
        error = await refusal(port, old_client_context(pki, "1.2"))
        assert "ALERT_PROTOCOL_VERSION" in str(error), error
        answer = await https_get(port, client_context(pki))
        assert answer["tls"]["version"] == "TLSv1.3"


# -- hostile and confused clients cost only their own connection ----------------------

GARBAGE = {
    # case: (what the client sends, what the server answers before closing)
    "random bytes": (bytes(range(256)) * 4, b""),
    # a ClientHello record whose length fields disagree: OpenSSL answers with an alert
    "malformed ClientHello": (b"\x16\x03\x01\x00\x08\x01\x00\x00\x04junk", b"\x15"),
    "plain HTTP": (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b""),
}


@pytest.mark.parametrize(("payload", "answer_start"), GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_and_plain_http_get_a_closed_connection(
    cli_herd: Any, pki: PKI, payload: bytes, answer_start: bytes
) -> None:
    herd = cli_herd(
        "apps.tls_apps:whoami", "--workers", "1", "--log-level", "debug", *tls_args(pki)
    )
    herd.wait_ready()
    context = client_context(pki)
    pid = sync_get(herd.port, context)["pid"]
    with socket.create_connection(("127.0.0.1", herd.port), timeout=30) as sock:
        sock.sendall(payload)
        answer = read_until_closed(sock)
    if answer_start:
        assert answer.startswith(answer_start), answer  # a TLS alert: the client learns why
    else:
        assert answer == b"", answer  # closed; nothing is ever answered in the clear
    assert sync_get(herd.port, context)["pid"] == pid  # the same worker goes on serving
    assert wait_until(lambda: "TLS handshake failed" in herd.stderr, 10), herd.stderr
    assert herd.stop() == 0
    assert_no_crash(herd.stderr)


def test_client_stalling_mid_handshake_is_cut_by_the_timeout(cli_herd: Any, pki: PKI) -> None:
    herd = cli_herd(
        "apps.tls_apps:whoami",
        "--workers",
        "1",
        "--log-level",
        "debug",
        "--tls-handshake-timeout",
        "1",
        *tls_args(pki),
    )
    herd.wait_ready()
    context = client_context(pki)
    pid = sync_get(herd.port, context)["pid"]
    hello = client_hello()
    with socket.create_connection(("127.0.0.1", herd.port), timeout=30) as stalled:
        stalled.sendall(hello[: len(hello) // 2])
        # while it stalls, the one worker serves others
        assert [sync_get(herd.port, context)["pid"] for _ in range(3)] == [pid] * 3
        assert read_until_closed(stalled) == b""  # closed well within the 30 s bound
    assert "TLS handshake timed out" in herd.stderr
    assert sync_get(herd.port, context)["pid"] == pid
    assert herd.stop() == 0
    assert_no_crash(herd.stderr)


# -- misconfiguration: exit 2 before any worker, naming the option and the file --------

MISCONFIGURED = {
    # case: (options, the option the message names, the file it names)
    "missing certfile": (
        lambda p: ["--certfile", str(p.cert.parent / "missing.pem"), "--keyfile", str(p.key)],
        "--certfile",
        "missing.pem",
    ),
    "missing keyfile": (
        lambda p: ["--certfile", str(p.cert), "--keyfile", str(p.cert.parent / "no-key.pem")],
        "--keyfile",
        "no-key.pem",
    ),
    "certfile without a certificate": (
        lambda p: ["--certfile", str(p.garbage), "--keyfile", str(p.key)],
        "--certfile",
        "garbage.pem",
    ),
    "keyfile without a key": (
        lambda p: ["--certfile", str(p.cert), "--keyfile", str(p.garbage)],
        "--keyfile",
        "garbage.pem",
    ),
    "key of another certificate": (
        lambda p: ["--certfile", str(p.cert), "--keyfile", str(p.other_key)],
        "--keyfile",
        "other-key.pem",
    ),
    "wrong key password": (
        lambda p: [
            *["--certfile", str(p.cert), "--keyfile", str(p.encrypted_key)],
            *["--keyfile-password", "wrong"],
        ],
        "--keyfile-password",
        "encrypted-key.pem",
    ),
    "encrypted key without a password": (
        lambda p: ["--certfile", str(p.cert), "--keyfile", str(p.encrypted_key)],
        "--keyfile-password",
        "encrypted-key.pem",
    ),
    "missing ca-certs": (
        lambda p: [
            *tls_args(p, "--ca-certs", str(p.cert.parent / "no-ca.pem")),
            *["--client-cert", "required"],
        ],
        "--ca-certs",
        "no-ca.pem",
    ),
}


@pytest.mark.parametrize("case", MISCONFIGURED.values(), ids=MISCONFIGURED.keys())
def test_misconfiguration_exits_2_before_spawning(cli_herd: Any, pki: PKI, case: Any) -> None:
    make_args, option, filename = case
    herd = cli_herd("apps.tls_apps:whoami", "--log-level", "debug", *make_args(pki))
    assert herd.process.wait(60) == 2, herd.stderr
    error = herd.stderr
    assert f"trioherd: error: {option}: " in error, error
    assert filename in error, error
    assert "Traceback" not in error
    assert "Enter PEM pass phrase" not in error  # never a prompt on the terminal
    assert "spawned worker" not in error
    assert "listening on" not in error


def test_right_password_for_an_encrypted_key(cli_herd: Any, pki: PKI) -> None:
    herd = cli_herd(
        "apps.tls_apps:whoami",
        *["--workers", "1", "--certfile", str(pki.cert), "--keyfile", str(pki.encrypted_key)],
        env={"TRIOHERD_KEYFILE_PASSWORD": PASSWORD},  # not on the command line, not in ps
    )
    herd.wait_ready()
    assert sync_get(herd.port, client_context(pki))["scheme"] == "https"
    assert herd.stop() == 0


# -- certificate rotation -----------------------------------------------------------------


def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


async def test_rolling_reload_picks_up_a_renewed_certificate(pki: PKI, tmp_path: Path) -> None:
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(pki.cert.read_bytes())
    keyfile.write_bytes(pki.key.read_bytes())
    renewed = pki.ca.issue_cert("127.0.0.1", "localhost")
    old_der = der_of(pki.cert)
    context = client_context(pki)
    options = {"certfile": str(certfile), "keyfile": str(keyfile)}
    async with open_herd(app="apps.tls_apps:whoami", workers=2, **options) as herd:
        _, port = address_of(herd)
        assert await trio.to_thread.run_sync(served_certificate, port, context) == old_der

        # renew the files in place: running workers keep the context they built at boot
        certfile.write_bytes(b"".join(blob.bytes() for blob in renewed.cert_chain_pems))
        renewed.private_key_pem.write_to_path(keyfile)
        assert await trio.to_thread.run_sync(served_certificate, port, context) == old_der
        # a request in flight across the reload finishes on the connection it started on
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=context, https_compatible=True
        )
        async with stream:
            await stream.do_handshake()
            assert stream.getpeercert(binary_form=True) == old_der
            await stream.send_all(
                b"GET /?sleep=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            await trio.sleep(0.5)  # the request is in the app now
            await herd.reload()  # waits for the old workers to finish and exit
            assert (await receive_all(stream)).startswith(b"HTTP/1.1 200 ")
        new_der = der_of(certfile)
        for _ in range(4):  # every worker, whichever gets the connection
            assert await trio.to_thread.run_sync(served_certificate, port, context) == new_der

        # a broken renewal fails the reload; the workers that serve stay as they were
        keyfile.write_bytes(pki.other_key.read_bytes())
        pids = {worker.pid for worker in herd.workers}
        with pytest.raises(trioherd.ReloadError, match="--keyfile"):
            await herd.reload()
        assert {worker.pid for worker in herd.workers} == pids
        assert await trio.to_thread.run_sync(served_certificate, port, context) == new_der


# -- the library hook -------------------------------------------------------------------


async def test_ssl_context_factory_builds_the_context_in_each_worker(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TLS_TEST_CERTFILE", str(pki.cert))  # the workers inherit these
    monkeypatch.setenv("TLS_TEST_KEYFILE", str(pki.key))
    factory = "apps.tls_apps:tls12_only_context"
    async with open_herd(app="apps.tls_apps:whoami", ssl_context_factory=factory) as herd:
        assert herd.addresses[0].startswith("https://")
        _, port = address_of(herd)
        answers = [await https_get(port, client_context(pki)) for _ in range(4)]
        assert {a["pid"] for a in answers} == {w.pid for w in herd.workers}
        # the factory's context (TLS 1.2 at most), not one built from certfile options
        assert {a["tls"]["version"] for a in answers} == {"TLSv1.2"}
        assert {a["tls"]["alpn"] for a in answers} == {"http/1.1"}
        only_13 = client_context(pki)
        only_13.minimum_version = ssl.TLSVersion.TLSv1_3
        error = await refusal(port, only_13)
        assert "ALERT_PROTOCOL_VERSION" in str(error), error


async def test_ssl_context_factory_returning_something_else_is_a_boot_error() -> None:
    factory = "apps.tls_apps:not_a_context"
    with pytest.RaisesGroup(trioherd.WorkerBootError, flatten_subgroups=True) as caught:
        async with open_herd(
            app="apps.tls_apps:whoami", workers=1, max_boot_failures=1, ssl_context_factory=factory
        ):
            pass  # pragma: no cover - the herd never starts
    (error,) = caught.value.exceptions
    assert "--ssl-context-factory: returned 'certificate.pem', not an SSLContext" in str(error)


# -- the example ------------------------------------------------------------------------


@contextlib.contextmanager
def running(command: list[str]) -> Iterator[subprocess.Popen[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


def test_example_tls_server_serves_what_its_curl_command_fetches() -> None:
    example = ROOT / "examples" / "tls_server.py"
    command = [sys.executable, str(example), "--bind", "127.0.0.1:0", "--name", unique_name()]
    with running(command) as process:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.strip().startswith("curl "):
                break
        curl = shlex.split(seen[-1])
        assert curl[:2] == ["curl", "--cacert"], seen
        ca_pem = Path(curl[2])
        assert ca_pem.exists()
        assert curl[3].startswith("https://127.0.0.1:") and not curl[3].endswith(":0/"), seen
        result = subprocess.run(curl, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Hello over TLSv1.3"), result.stdout
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, process.stdout.read()
    assert not ca_pem.parent.exists()  # the throwaway CA went with the server


@pytest.mark.trio_only  # a stream handler: a Trio program
async def test_stream_handler_is_served_over_tls(pki: PKI) -> None:
    async with open_herd(app="apps.raw:echo", workers=1, **tls_options(pki)) as herd:
        assert herd.addresses[0].startswith("https://")
        _, port = address_of(herd)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, client_context(pki), server_hostname="localhost")
        async with stream:
            await stream.do_handshake()
            pid = int((await receive_until(stream, b"\n")).strip())
            assert pid == herd.workers[0].pid
            await stream.send_all(b"secret bytes")
            assert await receive_until(stream, b"bytes") == b"secret bytes"
