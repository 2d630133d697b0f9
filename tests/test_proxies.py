"""Behind proxies: the PROXY protocol, forwarded headers, and the health endpoints a
balancer or an orchestrator polls."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from typing import Any

import httpx
import pytest
import trio
import trustme

import trioherd
from helpers import address_of, open_herd, receive_all

# every test here runs on both worker runtimes (conftest.runtime)
pytestmark = pytest.mark.usefixtures("runtime")

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 80) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return SIG + struct.pack("!BBH", 0x21, 0x11, len(body)) + body


async def exchange(herd: trioherd.Herd, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    host, port = address_of(herd)
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(data)
        with trio.fail_after(30):
            return await receive_all(stream)


INFO = b"GET /info HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def body_of(reply: bytes) -> Any:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def pid_of(reply: bytes) -> bytes:
    return reply.split(b"x-pid: ", 1)[1].split(b"\r\n", 1)[0]


async def test_proxy_protocol_v1_and_v2_set_the_client_address() -> None:
    async with open_herd(app="apps.http_apps:native", workers=1, proxy_protocol=True) as herd:
        v1 = b"PROXY TCP4 198.51.100.7 127.0.0.1 51234 80\r\n"
        reply = await exchange(herd, v1 + INFO)
        assert body_of(reply)["client"] == ["198.51.100.7", 51234]
        reply = await exchange(herd, proxy_v2("192.0.2.5", 4242) + INFO)
        assert body_of(reply)["client"] == ["192.0.2.5", 4242]
        v1_ipv6 = b"PROXY TCP6 2001:db8::7 ::1 51234 80\r\n"
        assert body_of(await exchange(herd, v1_ipv6 + INFO))["client"] == ["2001:db8::7", 51234]
        # LOCAL (the balancer's own health check) and UNKNOWN keep the socket's address
        local = SIG + b"\x20\x00\x00\x00"
        assert body_of(await exchange(herd, local + INFO))["client"][0] == "127.0.0.1"
        unknown = b"PROXY UNKNOWN\r\n"
        assert body_of(await exchange(herd, unknown + INFO))["client"][0] == "127.0.0.1"


async def test_a_connection_without_a_valid_proxy_header_is_closed_unanswered() -> None:
    async with open_herd(
        app="apps.http_apps:native", workers=1, proxy_protocol=True, header_timeout=1.0
    ) as herd:
        first = await exchange(herd, proxy_v2("192.0.2.5", 1) + INFO)
        assert first.startswith(b"HTTP/1.1 200")
        for bad in (INFO, b"PROXY TCP4 nonsense\r\n" + INFO, SIG + b"\x31\x11\x00\x00", b"PRO"):
            assert await exchange(herd, bad) == b""  # no answer, just the close
        # and the same worker serves on
        after = await exchange(herd, b"PROXY TCP4 192.0.2.9 127.0.0.1 7 80\r\n" + INFO)
        assert pid_of(after) == pid_of(first)


async def test_proxy_protocol_before_tls(tmp_path: Any) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    async with open_herd(
        app="apps.tls_apps:whoami",
        workers=1,
        proxy_protocol=True,
        certfile=str(certfile),
        keyfile=str(keyfile),
    ) as herd:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        host, port = address_of(herd)
        raw = await trio.open_tcp_stream(host, port)
        await raw.send_all(proxy_v2("203.0.113.50", 40123))
        tls = trio.SSLStream(raw, context, server_hostname="127.0.0.1")
        await tls.send_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        with trio.fail_after(30):
            reply = await receive_all(tls)
        await tls.aclose()
        body = body_of(reply)
        assert body["client_port"] == 40123 and body["scheme"] == "https"


async def test_forwarded_headers_from_a_trusted_peer_and_not_from_others() -> None:
    headers = {
        "x-forwarded-for": "198.51.100.7",
        "x-forwarded-proto": "https",
    }
    async with open_herd(app="apps.proxy_apps:asgi_client", workers=1) as herd:
        async with httpx.AsyncClient(base_url=herd.addresses[0], timeout=30) as client:
            seen = (await client.get("/", headers=headers)).json()
            assert seen["client"] == ["198.51.100.7", 0] and seen["scheme"] == "https"
            garbage = {"x-forwarded-for": "<script>", "forwarded": "for"}
            reply = await client.get("/", headers=garbage)
            assert reply.status_code == 200 and reply.json()["client"][0] == "127.0.0.1"
    # 127.0.0.1 is not trusted here: the headers reach the app untouched, not applied
    async with open_herd(
        app="apps.proxy_apps:asgi_client", workers=1, forwarded_allow_ips="10.0.0.0/8"
    ) as herd:
        async with httpx.AsyncClient(base_url=herd.addresses[0], timeout=30) as client:
            seen = (await client.get("/", headers=headers)).json()
            assert seen["client"][0] == "127.0.0.1" and seen["scheme"] == "http"
            assert seen["x-forwarded-for"] == "198.51.100.7"
    async with open_herd(app="apps.http_apps:native", workers=1) as herd:
        async with httpx.AsyncClient(base_url=herd.addresses[0], timeout=30) as client:
            seen = (await client.get("/info", headers=headers)).json()
            assert seen["client"] == ["198.51.100.7", 0]
    # RFC 7239 Forwarded, with --forwarded-headers forwarded
    async with open_herd(
        app="apps.proxy_apps:asgi_client", workers=1, forwarded_headers="forwarded"
    ) as herd:
        async with httpx.AsyncClient(base_url=herd.addresses[0], timeout=30) as client:
            ipv6 = {"forwarded": 'for="[2001:db8:cafe::17]:4711";proto=https'}
            seen = (await client.get("/", headers=ipv6)).json()
            assert seen["client"] == ["2001:db8:cafe::17", 4711] and seen["scheme"] == "https"


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(url)


async def test_livez_and_readyz_across_start_a_stuck_worker_and_a_stop() -> None:
    async with open_herd(
        app="apps.http_apps:blocking",
        workers=1,
        metrics_bind="127.0.0.1:0",
        worker_timeout=60,
        graceful_timeout=3.0,
    ) as herd:
        assert herd.metrics_url is not None
        base = herd.metrics_url.removesuffix("/metrics")
        live, ready = await get(base + "/livez"), await get(base + "/readyz")
        assert (live.status_code, ready.status_code) == (200, 200)
        assert ready.text == "ready: 1 of 1 workers\n"
        host, port = address_of(herd)
        blocker = await trio.open_tcp_stream(host, port)
        try:
            await blocker.send_all(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
            with trio.fail_after(30):  # its heartbeat stops: not ready, still alive
                while (reply := await get(base + "/readyz")).status_code == 200:
                    await trio.sleep(0.1)
            assert reply.status_code == 503
            assert reply.text == "not ready: no worker is ready to take connections\n"
            assert (await get(base + "/livez")).status_code == 200
        finally:
            await blocker.aclose()


async def test_readyz_answers_503_while_a_graceful_stop_drains() -> None:
    async with open_herd(
        app="apps.http_apps:native", workers=1, metrics_bind="127.0.0.1:0"
    ) as herd:
        assert herd.metrics_url is not None
        base = herd.metrics_url.removesuffix("/metrics")
        host, port = address_of(herd)
        slow = await trio.open_tcp_stream(host, port)
        await slow.send_all(b"GET /slow?2 HTTP/1.1\r\nHost: t\r\n\r\n")
        await trio.sleep(0.2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(herd.stop)
            with trio.fail_after(30):
                while not herd.stopping:
                    await trio.sleep(0.01)
            reply = await get(base + "/readyz")
            assert (reply.status_code, reply.text) == (503, "not ready: stopping\n")
            assert (await get(base + "/livez")).status_code == 200
            with trio.fail_after(30):
                answer = await receive_all(slow)
            assert b"slow done" in answer  # the drain finished the request in flight
        await slow.aclose()


@pytest.mark.parametrize("bad", ["10.0.0.300", "nonsense", "1.2.3.4/40"])
def test_a_bad_forwarded_allow_ips_is_a_usage_error(bad: str) -> None:
    with pytest.raises(trioherd.ConfigError, match="--forwarded-allow-ips"):
        trioherd.Config(forwarded_allow_ips=bad)


def test_readyz_is_503_while_the_workers_boot_then_200(cli_herd: Any) -> None:
    # the metrics listener is up before any worker: a balancer sees "not ready" during
    # boot, then ready
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    herd = cli_herd("apps.slow_boot:app", "--workers", "1", "--metrics-bind", f"127.0.0.1:{port}")
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and 200 not in seen:
        try:
            seen.append(httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code)
        except httpx.HTTPError:
            pass  # not bound yet
        time.sleep(0.1)
    assert seen and seen[0] == 503 and seen[-1] == 200, seen
    herd.wait_ready()
    assert herd.stop() == 0
