"""The edge tells the truth (issue 24): from a trusted peer only the family of forwarded
headers ``--forwarded-headers`` names is applied; PROXY headers are believed only from
``--proxy-protocol-allow-ips``; and ``--drain-delay`` keeps a stopping herd serving while
its ``/readyz`` turns the balancers away.

On Linux every 127.x address is the loopback, so a client bound to 127.0.0.2 or 127.0.0.3
is a peer of its own: one machine holds a trusted proxy and a stranger.
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

import httpx
import pytest
import trio
from test_proxies import INFO, body_of, pid_of, proxy_v2

from helpers import address_of, open_herd, receive_all
from trioherd import WorkerState

# every test here runs on both worker runtimes (conftest.runtime)
pytestmark = pytest.mark.usefixtures("runtime")

BALANCER = "127.0.0.2"  # the proxy the tests trust or allow
STRANGER = "127.0.0.3"  # in no list (127.0.0.1 is in the default lists)


async def open_from(herd: Any, source: str) -> trio.SocketStream:
    """A TCP connection to the herd's first listener from the local address ``source``."""
    host, port = address_of(herd)
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def exchange_from(herd: Any, source: str, *pieces: bytes) -> bytes:
    """Send ``pieces`` (a short pause between two) from ``source``, then read until the
    server closes the connection: b"" if it closed it unanswered."""
    async with await open_from(herd, source) as stream:
        for index, piece in enumerate(pieces):
            if index:
                await trio.sleep(0.05)  # the worker has likely peeked at the first piece
            await stream.send_all(piece)
        with trio.fail_after(30):
            return await receive_all(stream)


def client_from(herd: Any, source: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    return httpx.AsyncClient(base_url=herd.addresses[0], timeout=30, transport=transport)


# -- forwarded headers: one family, from trusted peers only -------------------------------

# what a proxy of each family passes on: the client's own header of the other family, a
# spoof, untouched, and its own family, where the client's spoof is the first hop
THROUGH_THE_PROXY = {
    "x-forwarded": {
        "x-forwarded-for": "6.6.6.6, 198.51.100.7",
        "x-forwarded-proto": "http",
        "forwarded": "for=7.7.7.7;proto=https",
    },
    "forwarded": {
        "forwarded": "for=6.6.6.6;proto=https, for=198.51.100.7;proto=http",
        "x-forwarded-for": "7.7.7.7",
        "x-forwarded-proto": "https",
    },
}


@pytest.mark.parametrize("family", ["x-forwarded", "forwarded"])
async def test_spoofed_forwarded_headers_of_either_family_are_never_applied(
    family: str,
) -> None:
    headers = THROUGH_THE_PROXY[family]
    async with open_herd(
        app="apps.proxy_apps:asgi_client",
        workers=1,
        forwarded_allow_ips=BALANCER,
        forwarded_headers=family,
    ) as herd:
        async with client_from(herd, BALANCER) as through_proxy:
            seen = (await through_proxy.get("/", headers=headers)).json()
        # the proxy's own hop of the chosen family, not the client's spoofs of either
        assert seen["client"] == ["198.51.100.7", 0] and seen["scheme"] == "http"
        # both families reach the app as they came
        for name, value in headers.items():
            assert seen[name] == value
        async with client_from(herd, STRANGER) as stranger:
            reply = await stranger.get("/", headers=headers)
            seen = reply.json()
        assert seen["client"][0] == STRANGER and seen["scheme"] == "http"
        for name, value in headers.items():
            assert seen[name] == value


# -- PROXY headers: only from the allowed peers --------------------------------------------

XFF_INFO = INFO.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 7.7.7.7\r\n\r\n")
LINE = re.compile(
    r"WARNING cut (\d+) connections? \(proxy_refused: PROXY header from a peer not in "
    r"--proxy-protocol-allow-ips\); last from ([0-9.]+):\d+"
)


def v1(source: str, port: int = 51234) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 80\r\n".encode()


async def test_a_proxy_header_from_a_peer_not_allowed_is_refused_and_counted(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async with open_herd(
        app="apps.http_apps:native",
        workers=1,
        proxy_protocol=True,
        proxy_protocol_allow_ips=BALANCER,  # --forwarded-allow-ips: 127.0.0.1,::1
    ) as herd:
        began = time.monotonic()
        # a stranger claims to be 127.0.0.1, trusted for forwarded headers, in v1 or v2,
        # whole or in pieces: closed unanswered, and X-Forwarded-For is not believed
        forged = [
            (STRANGER, v1("127.0.0.1") + XFF_INFO),
            (STRANGER, proxy_v2("127.0.0.1", 4242) + XFF_INFO),
            (STRANGER, b"PRO", b"XY TCP4 127.0.0.1 127.0.0.1 1 80\r\n" + XFF_INFO),
            ("127.0.0.1", proxy_v2("198.51.100.9", 1) + INFO),  # trusted, but not allowed
        ]
        for source, *pieces in forged:
            assert await exchange_from(herd, source, *pieces) == b"", (source, pieces)
        # without a header a stranger is served as itself, its X-Forwarded-For not applied
        reply = await exchange_from(herd, STRANGER, XFF_INFO)
        first_pid = pid_of(reply)
        assert body_of(reply)["client"][0] == STRANGER
        # the allowed balancer's header is believed, and trust follows what it names
        reply = await exchange_from(herd, BALANCER, v1("198.51.100.7") + XFF_INFO)
        assert body_of(reply)["client"] == ["198.51.100.7", 51234]
        reply = await exchange_from(herd, BALANCER, v1("127.0.0.1") + XFF_INFO)
        assert body_of(reply)["client"] == ["7.7.7.7", 0]
        # and from the balancer a header is a must
        assert await exchange_from(herd, BALANCER, INFO) == b""
        # a burst of forgeries: every one counted, in lines at most one a second
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(exchange_from, herd, STRANGER, v1("10.0.0.1") + INFO)
        total = len(forged) + 10
        seen: list[tuple[int, str]] = []
        with trio.fail_after(30):
            while sum(count for count, _ in seen) < total:
                await trio.sleep(0.05)
                found = LINE.findall(capfd.readouterr().err)
                seen += [(int(count), last) for count, last in found]
        elapsed = time.monotonic() - began
        assert sum(count for count, _ in seen) == total
        assert seen[0] == (1, STRANGER)  # the first is logged at once
        assert len(seen) <= int(elapsed) + 1, (seen, elapsed)
        # and counted as cuts in the heartbeat, for the metrics
        (worker,) = herd.workers
        with trio.fail_after(30):
            while worker.stats.get("cuts", {}).get("proxy_refused") != total:
                await trio.sleep(0.05)
        # the worker serves on
        assert pid_of(await exchange_from(herd, BALANCER, v1("192.0.2.1") + INFO)) == first_pid


# -- the drain delay: still serving while /readyz says stopping ----------------------------


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(url)


async def refused(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_drain_delay_serves_while_readyz_is_503_then_refuses() -> None:
    delay = 5.0
    async with open_herd(
        app="apps.http_apps:native",
        workers=2,
        metrics_bind="127.0.0.1:0",
        drain_delay=delay,
    ) as herd:
        assert herd.metrics_url is not None
        readyz = herd.metrics_url.removesuffix("/metrics") + "/readyz"
        host, port = address_of(herd)
        assert (await get(readyz)).status_code == 200
        # in flight across the delay and the drain after it
        slow = await trio.open_tcp_stream(host, port)
        await slow.send_all(f"GET /slow?s={delay + 1} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        async with trio.open_nursery() as nursery:
            before = trio.current_time()
            nursery.start_soon(herd.stop)
            with trio.fail_after(30):
                while not herd.stopping:
                    await trio.sleep(0.01)
            reply = await get(readyz)
            assert (reply.status_code, reply.text) == (503, "not ready: stopping\n")
            # the app port still takes new connections and answers them
            async with httpx.AsyncClient(base_url=herd.url, timeout=30) as client:
                for _ in range(10):
                    answer = await client.get("/", headers={"connection": "close"})
                    assert answer.status_code == 200 and answer.text == "Hello, World!"
            assert (await get(readyz)).status_code == 503
            # then the listeners close
            with trio.fail_after(60):
                while not await refused(host, port):
                    await trio.sleep(0.05)
            assert trio.current_time() - before >= delay
            # and the request in flight all along is answered in the drain
            with trio.fail_after(30):
                answer_bytes = await receive_all(slow)
            assert answer_bytes.startswith(b"HTTP/1.1 200") and b"slow done" in answer_bytes
        await slow.aclose()


def test_sigterm_with_a_drain_delay_logs_it_and_exits_0(cli_herd: Any) -> None:
    herd = cli_herd("apps.http_apps:native", "--workers", "1", "--drain-delay", "1")
    herd.wait_ready()
    herd.process.send_signal(signal.SIGTERM)  # once: a second one stops at once
    assert herd.process.wait(60) == 0
    text = herd.stderr
    delay = "stopping: /readyz answers 503; serving on for 1s (--drain-delay), then closing"
    assert delay in text, text
    assert text.index(delay) < text.index("stopping: disconnecting 1 worker")


async def test_during_the_drain_delay_a_dead_worker_is_replaced_and_no_reload_starts() -> None:
    async with open_herd(app="apps.http_apps:native", workers=2, drain_delay=60.0) as herd:
        first = {worker.pid for worker in herd.workers}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(herd.stop)
            with trio.fail_after(30):
                while not herd.stopping:
                    await trio.sleep(0.01)
            await herd.reload()  # ignored: the herd is stopping
            assert herd.reloads == 0 and {w.pid for w in herd.workers} == first
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            with trio.fail_after(60):  # its slot gets a new worker, ready, taking requests
                while not any(
                    w.pid not in first and w.state is WorkerState.READY for w in herd.workers
                ):
                    await trio.sleep(0.05)
            async with httpx.AsyncClient(base_url=herd.url, timeout=30) as client:
                for _ in range(6):
                    answer = await client.get("/", headers={"connection": "close"})
                    assert answer.status_code == 200
            herd.force_stop()  # rather than wait out the minute
