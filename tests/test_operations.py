"""Operations: rolling reload, scaling, the control socket, recycling, metrics."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from helpers import CLIHerd, address_of, open_herd, receive_until, wait_until

VERSION_APP = """
import os
from trioherd import Response

async def app(request):
    return Response("{body}", headers={{"x-pid": str(os.getpid())}})
"""


def write_app(directory: Path, body: str) -> None:
    (directory / "version_app.py").write_text(VERSION_APP.format(body=body))


def status_of(herd: CLIHerd) -> dict[str, Any]:
    return json.loads(herd.control("status", "--json").stdout)


class Load:
    """Clients hammering the herd from threads: fresh connections and keep-alive ones.
    Bounded: they stop when told, or after 120 s at the latest."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.errors: list[str] = []
        self.bodies: list[str] = []
        self.pids: set[str] = set()
        self.count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._fresh, daemon=True),
            threading.Thread(target=self._keep_alive, daemon=True),
            threading.Thread(target=self._keep_alive, daemon=True),
        ]

    def _record(self, response: httpx.Response) -> None:
        with self._lock:
            self.count += 1
            if response.status_code != 200:
                self.errors.append(f"status {response.status_code}")
            self.bodies.append(response.text)
            self.pids.add(response.headers["x-pid"])

    def _run(self, client: httpx.Client) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._record(client.get(self.url))
            except httpx.HTTPError as exc:
                with self._lock:
                    self.errors.append(repr(exc))

    def _fresh(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(limits=limits, timeout=30) as client:
            self._run(client)

    def _keep_alive(self) -> None:
        with httpx.Client(timeout=30) as client:
            self._run(client)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        assert wait_until(lambda: self.count > 20, 30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_reload_under_load_drops_nothing_and_serves_new_code(
    cli_herd: Any, tmp_path: Path
) -> None:
    write_app(tmp_path, "version one")
    herd = cli_herd("version_app:app", "--workers", "2")
    herd.wait_ready()
    old_pids = {w["pid"] for w in status_of(herd)["workers"]}
    write_app(tmp_path, "version two")
    with Load(herd.urls[0] + "/") as load:
        before = load.count
        result = herd.control("reload")
        assert "reloaded" in result.stdout
        assert wait_until(lambda: load.bodies[-1] == "version two", 30)
        seen = load.count
        assert wait_until(lambda: load.count > seen + 20, 30)
    assert load.errors == []
    assert load.count > before
    new_pids = {w["pid"] for w in status_of(herd)["workers"]}
    assert len(new_pids) == 2 and not (new_pids & old_pids)
    assert status_of(herd)["reloads"] == 1
    assert load.bodies[-1] == "version two"
    assert herd.stop() == 0


def test_reload_with_a_broken_app_keeps_the_old_workers(cli_herd: Any, tmp_path: Path) -> None:
    write_app(tmp_path, "still good")
    herd = cli_herd("version_app:app", "--workers", "2")
    herd.wait_ready()
    old_pids = {w["pid"] for w in status_of(herd)["workers"]}
    (tmp_path / "version_app.py").write_text("raise ImportError('half-deployed release')\n")
    result = herd.control("reload", check=False)
    assert result.returncode != 0
    assert "half-deployed release" in result.stderr
    assert {w["pid"] for w in status_of(herd)["workers"]} == old_pids
    with httpx.Client() as client:
        assert client.get(herd.urls[0]).text == "still good"
    assert "reload of slot 0 failed" in herd.stderr
    assert herd.stop() == 0


def test_scale_with_the_cli_and_with_signals(cli_herd: Any, tmp_path: Path) -> None:
    write_app(tmp_path, "scaled")
    herd = cli_herd("version_app:app", "--workers", "2")
    herd.wait_ready()

    def ready_workers() -> int:
        return sum(1 for w in status_of(herd)["workers"] if w["state"] == "ready")

    herd.control("scale", "+2")
    assert ready_workers() == 4 and status_of(herd)["size"] == 4
    herd.control("scale", "-2")
    assert wait_until(lambda: len(status_of(herd)["workers"]) == 2, 30)
    herd.control("scale", "3")
    assert ready_workers() == 3
    assert herd.control("scale", "0", check=False).returncode == 2  # a usage error
    assert herd.control("scale", "-3", check=False).returncode == 2  # found by the herd
    herd.process.send_signal(signal.SIGTTIN)
    assert wait_until(lambda: ready_workers() == 4, 30)
    herd.process.send_signal(signal.SIGTTOU)
    assert wait_until(lambda: len(status_of(herd)["workers"]) == 3, 30)
    # a scale survives a reload
    herd.control("reload")
    assert status_of(herd)["size"] == 3 and ready_workers() == 3
    table = herd.control("status").stdout
    assert "restarts" in table and table.count("ready") == 3
    assert herd.stop() == 0


def test_control_socket_permissions_and_second_herd_refused(cli_herd: Any, tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    first = cli_herd("--workers", "1", env=env)
    first.wait_ready()
    directory = runtime / "trioherd"
    path = directory / f"{first.name}.sock"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = cli_herd("--workers", "1", "--name", first.name, env=env)
    assert second.process.wait(60) == 2
    assert "already running" in second.stderr and "--name" in second.stderr
    assert first.stop() == 0
    assert not path.exists()
    # a stale socket (its herd was SIGKILLed) is cleaned up by the next herd
    third = cli_herd("--workers", "1", "--name", first.name, env=env)
    third.wait_ready()
    third.process.kill()
    third.process.wait(10)
    assert path.exists()
    fourth = cli_herd("--workers", "1", "--name", first.name, env=env)
    fourth.wait_ready()
    assert fourth.stop() == 0


async def test_max_requests_is_a_bound_and_recycling_loses_nothing() -> None:
    async with open_herd(
        app="apps.http_apps:native",
        workers=2,
        max_requests=50,
        max_requests_jitter=10,
        worker_timeout=2.0,
    ) as herd:
        events = herd.events()
        first_pids = {w.pid for w in herd.workers}
        failures = 0
        served: collections.Counter[str] = collections.Counter()
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=herd.addresses[0], timeout=30, limits=fresh
        ) as client:
            for _ in range(600):
                try:
                    response = await client.get("/")
                except httpx.HTTPError:
                    failures += 1
                    continue
                if response.status_code != 200:
                    failures += 1
                served[response.headers["x-pid"]] += 1
                assert sum(1 for w in herd.workers if w.state == "ready") >= 1
        assert failures == 0
        replaced = first_pids - {w.pid for w in herd.workers}
        assert replaced, "no worker was recycled"
        # the limit is 50 + up to 10 of jitter; one sequential client can overrun it only
        # by the connections passed before the worker's report reached the primary
        assert max(served.values()) <= 60 + 3, served
        assert len(served) >= 600 // 63
        kinds = []
        with trio.move_on_after(1):
            async for event in events:
                kinds.append(event.kind)
        assert "exit" in kinds and "ready" in kinds
        assert herd.respawns.get("max-requests", 0) >= 2


async def test_metrics_totals_match_the_requests_sent() -> None:
    async with open_herd(
        app="apps.http_apps:native", workers=2, metrics_bind="127.0.0.1:0"
    ) as herd:
        assert herd.metrics_url is not None
        async with httpx.AsyncClient(base_url=herd.addresses[0]) as client:
            for _ in range(37):
                assert (await client.get("/")).status_code == 200
            for _ in range(5):
                assert (await client.get("/boom")).status_code == 500
            too_many = {f"x-{i}": "1" for i in range(150)}
            assert (await client.get("/", headers=too_many)).status_code == 431
        # counters of replaced workers are kept: reload, then count
        await herd.reload()

        async def scrape() -> dict[str, float]:
            async with httpx.AsyncClient() as client:
                text = (await client.get(herd.metrics_url)).text
            values = {}
            for line in text.splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    values[name] = float(value)
            return values

        with trio.fail_after(30):
            while True:
                metrics = await scrape()
                if metrics['trioherd_requests_total{status="2xx"}'] == 37 and (
                    metrics['trioherd_requests_total{status="5xx"}'] == 5
                ):
                    break
                await trio.sleep(0.2)
        assert metrics["trioherd_workers"] == 2
        assert metrics['trioherd_requests_total{status="4xx"}'] == 1  # the 431
        assert metrics["trioherd_reloads_total"] == 1


async def test_a_heartbeat_has_the_shape_the_primary_totals_and_shed_is_counted() -> None:
    """What a live worker sends is exactly the shape ``_ipc`` defines (nothing sent that
    the primary would not total, nothing of the shape missing), and idle connections shed
    near --max-connections reach the totals and the metrics."""
    from trioherd import _ipc

    async with open_herd(
        app="apps.http_apps:native", workers=1, max_connections=10, metrics_bind="127.0.0.1:0"
    ) as herd:
        host, port = address_of(herd)
        (worker,) = herd.workers
        idle: list[trio.SocketStream] = []
        try:
            for _ in range(12):  # each served once, then idle; the 9th open is over 90 %
                stream = await trio.open_tcp_stream(host, port)
                idle.append(stream)
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                with trio.fail_after(30):
                    await receive_until(stream, b"\r\n\r\n")
            with trio.fail_after(30):
                while worker.stats.get("shed", 0) == 0:
                    await trio.sleep(0.05)
        finally:
            for stream in idle:
                await stream.aclose()
        assert set(worker.stats) == {*_ipc.COUNTERS, *_ipc.WORKER_COUNTS, _ipc.STATUS, _ipc.CUTS}
        assert herd.totals()["shed"] == worker.stats["shed"] >= 1
        assert herd.metrics_url is not None
        async with httpx.AsyncClient() as client:
            text = (await client.get(herd.metrics_url)).text
        assert f"trioherd_connections_shed_total {worker.stats['shed']}" in text.splitlines()


async def test_connections_the_server_cuts_are_counted_by_reason_and_logged(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A head that never ends (408), a head over the limit (431) and a client that never
    reads its answer (reset) are each counted under their reason in the heartbeat, the
    totals and ``trioherd_connections_cut_total``, and logged by the worker with the
    reason and the client."""
    from trioherd import _ipc

    async with open_herd(
        app="apps.http_edge_apps:app",
        workers=1,
        header_timeout=1.0,
        send_timeout=1.0,
        log_level="info",
        metrics_bind="127.0.0.1:0",
    ) as herd:
        host, port = address_of(herd)
        (worker,) = herd.workers
        async with await trio.open_tcp_stream(host, port) as slow:
            await slow.send_all(b"GET / HTTP/1.1\r\nHo")  # never finished: 408
            with trio.fail_after(30):
                assert (await receive_until(slow, b"\r\n\r\n")).startswith(b"HTTP/1.1 408 ")
        async with await trio.open_tcp_stream(host, port) as big:
            await big.send_all(b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
            with trio.fail_after(30):
                assert (await receive_until(big, b"\r\n\r\n")).startswith(b"HTTP/1.1 431 ")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        with sock:  # asks for 16 MiB and never reads: reset after the send timeout
            await trio.to_thread.run_sync(sock.connect, (host, port))
            sock.sendall(b"GET /big?mb=16 HTTP/1.1\r\nHost: t\r\n\r\n")
            expected = {"head_timeout": 1, "limit": 1, "send_timeout": 1}
            with trio.fail_after(30):
                while worker.stats.get(_ipc.CUTS) != expected:
                    await trio.sleep(0.05)
        assert herd.totals()[_ipc.CUTS] == expected
        assert herd.metrics_url is not None
        async with httpx.AsyncClient() as client:
            text = (await client.get(herd.metrics_url)).text.splitlines()
        for reason in _ipc.CUT_REASONS:
            line = f'trioherd_connections_cut_total{{reason="{reason}"}} {expected.get(reason, 0)}'
            assert line in text
    err = capfd.readouterr().err
    for reason in expected:
        assert re.search(rf"cut 1 connection \({reason}: .*\); last from 127\.0\.0\.1:\d+", err)


def test_sighup_reloads_and_sigterm_twice_stops_at_once(cli_herd: Any, tmp_path: Path) -> None:
    write_app(tmp_path, "hup")
    herd = cli_herd("version_app:app", "--workers", "2", "--graceful-timeout", "30")
    herd.wait_ready()
    old = {w["pid"] for w in status_of(herd)["workers"]}
    herd.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: not ({w["pid"] for w in status_of(herd)["workers"]} & old), 60)
    # a connection that never ends would hold a graceful stop for 30 s; a second signal
    # stops at once
    blocker = socket.create_connection(("127.0.0.1", herd.port))
    blocker.sendall(b"GET /slow?s=100 HTTP/1.1\r\nHost: t\r\n\r\n")
    time.sleep(0.3)
    herd.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    herd.process.send_signal(signal.SIGTERM)
    assert herd.process.wait(20) == 1
    blocker.close()
    herd.close()


def test_status_of_a_missing_herd_fails_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trioherd", "status", "--name", "no-such-herd-here"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert result.returncode == 1
    assert "no herd named 'no-such-herd-here' is running" in result.stderr


def test_sd_notify_ready_reloading_stopping(cli_herd: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(60)
    try:
        herd = cli_herd("--workers", "1", env={"NOTIFY_SOCKET": path})
        herd.wait_ready()

        def next_message() -> dict[str, str]:
            data = receiver.recv(4096).decode()
            return dict(line.split("=", 1) for line in data.splitlines())

        ready = next_message()
        assert ready["READY"] == "1" and ready["MAINPID"] == str(herd.process.pid)
        (worker,) = status_of(herd)["workers"]
        with open(f"/proc/{worker['pid']}/environ", "rb") as file:
            assert b"NOTIFY_SOCKET=" not in file.read()  # only the primary talks to systemd
        herd.process.send_signal(signal.SIGHUP)
        assert next_message()["RELOADING"] == "1"
        assert next_message()["READY"] == "1"
        herd.process.send_signal(signal.SIGTERM)
        assert next_message()["STOPPING"] == "1"
        assert herd.process.wait(60) == 0
    finally:
        receiver.close()


async def test_max_memory_recycles_a_worker_that_grows() -> None:
    async with open_herd(
        app="apps.http_apps:native", workers=1, max_memory=120, worker_timeout=1.0
    ) as herd:
        (worker,) = herd.workers
        async with httpx.AsyncClient(base_url=herd.addresses[0], timeout=30) as client:
            assert (await client.get("/grow?mb=150")).status_code == 200
            with trio.fail_after(30):
                while worker.pid in {w.pid for w in herd.workers}:
                    await trio.sleep(0.1)
            reply = await client.get("/")
            assert reply.status_code == 200 and reply.headers["x-pid"] != str(worker.pid)
        with trio.fail_after(30):  # counted once the replacement took over
            while herd.respawns.get("max-memory") != 1:
                await trio.sleep(0.05)
        assert worker.exit_code == 0 and worker.requested_disconnect


async def test_a_herd_whose_only_worker_keeps_crashing_is_never_left_empty(caplog: Any) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="trioherd")
    async with open_herd(app="apps.http_apps:native", workers=1, min_uptime=60) as herd:
        for expected_restarts in (1, 2, 3):
            (worker,) = herd.workers
            async with httpx.AsyncClient(base_url=herd.addresses[0], timeout=30) as client:
                try:
                    await client.get("/die")
                except httpx.HTTPError:
                    pass
            with trio.fail_after(30):
                while not any(w.pid != worker.pid and w.state == "ready" for w in herd.workers):
                    await trio.sleep(0.05)
            assert herd.workers[0].restarts == expected_restarts
        # a worker that served, then died, and no other serves: replaced at once each time
        # (the back-off of a slot is tested in tests/unit/test_policy.py)
        assert caplog.text.count("respawning slot 0 in 0.0s") == 3
        assert "died: exit code 1" in caplog.text
        assert herd.respawns["crash"] == 3


def test_access_log_line(cli_herd: Any, tmp_path: Path) -> None:
    herd = cli_herd(
        "apps.http_apps:native", "--workers", "1", "--access-log", "--log-level", "warning"
    )
    url = herd.wait_ready()
    with httpx.Client() as client:
        assert client.get(url + "/info?x=1").status_code == 200
    assert wait_until(lambda: '"GET /info?x=1 HTTP/1.1" 200 ' in herd.stderr, 10), herd.stderr
    line = next(line for line in herd.stderr.splitlines() if "/info?x=1" in line)
    # client, request line, status, bytes sent, duration, worker id
    assert " 127.0.0.1:" in line and line.rstrip().endswith("w1")
    fields = line.split('" 200 ', 1)[1].split()
    assert int(fields[0]) > 100 and fields[1].endswith("ms")
    assert herd.stop() == 0


def test_busy_metrics_port_is_a_usage_error_before_any_worker(cli_herd: Any) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        port = blocker.getsockname()[1]
        herd = cli_herd(
            "--workers", "2", "--metrics-bind", f"127.0.0.1:{port}", "--log-level", "debug"
        )
        assert herd.process.wait(60) == 2
        assert f"--metrics-bind: 127.0.0.1:{port}" in herd.stderr
        assert "spawned worker" not in herd.stderr
    finally:
        blocker.close()
