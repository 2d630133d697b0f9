"""--preload (issue 29): workers forked from a mold that imported the app once; one
generation of the code at a time, with and without --preload.

Real herds on 127.0.0.1. The leak fixture checks that no process of the test (molds and
the workers they forked carry its marker too) and no fd outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
import websockets
from websockets.sync.client import connect

import trioherd
from helpers import CLIHerd, address_of, marked_processes, open_herd, wait_until
from trioherd.primary.control import socket_path

VERSION_APP = """
import os
from trioherd import Response

BODY = {body!r}

async def app(request):
    return Response(BODY)
"""

SLOW_START_APP = """
import trio

BODY = {body!r}

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await trio.sleep({startup})  # a worker of this code takes this long to be ready
        await send({{"type": "lifespan.startup.complete"}})
        await receive()
        await send({{"type": "lifespan.shutdown.complete"}})
        return
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": BODY.encode()}})
"""

FAILING_STARTUP_APP = """
async def app(scope, receive, send):
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database today"})
"""


def write(path: Path, text: str) -> None:
    """As an editor saves: a new file renamed over the old one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def get(url: str, **options: Any) -> str:
    """One request on a connection of its own (so round-robin moves to the next worker)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=30, **options) as client:
        response = await client.get(url)
        assert response.status_code == 200, response.text
        return response.text


async def bodies(url: str, count: int = 8) -> set[str]:
    return {await get(url) for _ in range(count)}


def gone(pid: int) -> bool:
    """Exited and reaped (a zombie would still be there)."""
    return not os.path.exists(f"/proc/{pid}")


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on the import path of the herds of this test (workers and molds get
    the primary's sys.path), with PYTHONDONTWRITEBYTECODE so edits within one second are
    seen."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    return tmp_path


# -- every interface, forked from the mold ----------------------------------------------


@pytest.mark.parametrize(
    ("app", "options"),
    [
        ("apps.preload_apps:asgi", {}),
        ("apps.preload_apps:native", {}),
        ("apps.preload_apps:wsgi", {}),
        ("apps.preload_apps:asyncio_only", {"asyncio": True}),
    ],
)
async def test_every_interface_is_served_by_workers_forked_from_the_mold(
    app: str, options: dict[str, Any]
) -> None:
    async with open_herd(app=app, workers=2, preload=True, **options) as herd:
        (mold,) = herd.generations.describe()
        workers = {worker.pid for worker in herd.workers}
        seen = await bodies(herd.url, 6)
        assert seen == {f"imported {mold['pid']} served {pid}\n" for pid in workers}
        assert herd.generation == 1 and {w.generation for w in herd.workers} == {1}


async def test_a_stream_handler_with_tls_is_forked_from_the_mold(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    options = {"certfile": str(tmp_path / "server.pem"), "preload": True}
    async with open_herd(app="apps.preload_apps:stream", **options) as herd:
        (mold,) = herd.generations.describe()
        host, port = address_of(herd)
        for _ in range(2):
            stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context)
            async with stream:
                line = await stream.receive_some(100)
            imported, served = line.split()[1::2]
            assert int(imported) == mold["pid"]
            assert int(served) in {worker.pid for worker in herd.workers}


async def test_https_asgi_with_preload(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        tmp_path / "server.pem"
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    options = {"certfile": str(tmp_path / "server.pem"), "preload": True}
    async with open_herd(app="apps.preload_apps:asgi", **options) as herd:
        (mold,) = herd.generations.describe()
        text = await get(herd.url, verify=context)
        assert text.startswith(f"imported {mold['pid']} served ")


# -- generations ---------------------------------------------------------------------


async def test_a_respawn_after_the_file_changed_serves_the_old_generation(app_dir: Path) -> None:
    write(app_dir / "gen_app.py", VERSION_APP.format(body="one"))
    async with open_herd(app="gen_app:app", workers=2, preload=True) as herd:
        assert await bodies(herd.url) == {"one"}
        write(app_dir / "gen_app.py", VERSION_APP.format(body="two"))
        victim = herd.workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        with trio.fail_after(30):
            while victim in herd.workers or len(herd.workers) < 2:
                await trio.sleep(0.05)
            while any(worker.state != "ready" for worker in herd.workers):
                await trio.sleep(0.05)
        assert wait_until(lambda: gone(victim.pid), 5)  # reaped by its mold
        await herd.scale(3)  # a scale-up forks from the mold too
        assert await bodies(herd.url, 9) == {"one"}
        assert {worker.generation for worker in herd.workers} == {1}
        await herd.reload()
        assert await bodies(herd.url, 9) == {"two"}
        assert herd.generation == 2 and {w.generation for w in herd.workers} == {2}
        with trio.fail_after(10):  # the first mold goes once its last worker has
            while [m["generation"] for m in herd.generations.describe()] != [2]:
                await trio.sleep(0.05)


async def test_a_broken_reload_changes_nothing(app_dir: Path) -> None:
    write(app_dir / "broken_later.py", VERSION_APP.format(body="good"))
    async with open_herd(app="broken_later:app", workers=2, preload=True) as herd:
        pids = {worker.pid for worker in herd.workers}
        (mold,) = herd.generations.describe()
        write(app_dir / "broken_later.py", "raise ImportError('half-deployed release')\n")
        with pytest.raises(trioherd.ReloadError, match="half-deployed release"):
            await herd.reload()
        assert {worker.pid for worker in herd.workers} == pids
        assert herd.generations.describe() == [mold]
        assert herd.generation == 1 and (herd.reloads, herd.reloads_failed) == (0, 1)
        assert await bodies(herd.url) == {"good"}


@pytest.mark.parametrize("preload", [True, False])
async def test_a_reload_whose_new_workers_cannot_start_changes_nothing(
    app_dir: Path, preload: bool
) -> None:
    """The new code imports, but its lifespan startup fails in every new worker: the
    ones that failed are let go, and the old generation serves on, all of it."""
    write(app_dir / "fails_later.py", SLOW_START_APP.format(body="old", startup=0))
    async with open_herd(app="fails_later:app", workers=2, preload=preload) as herd:
        pids = {worker.pid for worker in herd.workers}
        write(app_dir / "fails_later.py", FAILING_STARTUP_APP)
        with pytest.raises(trioherd.ReloadError, match="no database today"):
            await herd.reload()
        assert {worker.pid for worker in herd.workers} >= pids
        assert await bodies(herd.url) == {"old"}
        with trio.fail_after(20):  # the failed ones exit, and their mold with them
            while {worker.pid for worker in herd.workers} != pids:
                await trio.sleep(0.05)
            while preload and len(herd.generations.describe()) != 1:
                await trio.sleep(0.05)
        assert herd.generation == 1


def test_an_edit_then_a_broken_edit_during_its_reload_leaves_one_version(
    cli_herd: Any, tmp_path: Path
) -> None:
    """The issue's sequence with --reload: edit to "two"; while the reload's new workers
    start (their lifespan takes a second), save a broken edit. The herd serves "two"
    from every worker, and the broken edit's reload fails and changes nothing."""
    app_file = tmp_path / "edit_app.py"
    write(app_file, SLOW_START_APP.format(body="one", startup=0))
    herd = cli_herd(
        "edit_app:app", "--workers", "2", "--reload", env={"PYTHONDONTWRITEBYTECODE": "1"}
    )
    url = herd.wait_ready()
    assert wait_until(lambda: "watching " in herd.stderr, 10), herd.stderr
    write(app_file, SLOW_START_APP.format(body="two", startup=1))
    assert wait_until(lambda: "generation 2: the app imported" in herd.stderr, 30), herd.stderr
    write(app_file, "def app(request:\n")  # a syntax error, while generation 2 starts
    assert wait_until(lambda: "the new code could not boot" in herd.stderr, 30), herd.stderr
    status = json.loads(herd.control("status", "--json").stdout)
    assert (status["reloads"], status["reloads_failed"]) == (1, 1), herd.stderr
    assert status["generation"] == 2
    assert [worker["generation"] for worker in status["workers"]] == [2, 2]
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        assert {client.get(url).text for _ in range(20)} == {"two"}
    assert herd.stop() == 0


async def test_without_preload_a_reload_leaves_one_version_whatever_lands_during_it(
    app_dir: Path,
) -> None:
    """Without --preload each new worker imports the files for itself: a broken edit
    that lands while they boot fails the reload, and the old version serves on; no herd
    of two versions, whichever way it goes."""
    write(app_dir / "racy_app.py", VERSION_APP.format(body="one"))
    async with open_herd(app="racy_app:app", workers=2) as herd:
        write(app_dir / "racy_app.py", VERSION_APP.format(body="two"))
        async with trio.open_nursery() as nursery:

            async def reload() -> None:
                try:
                    await herd.reload()
                except trioherd.ReloadError:
                    pass

            nursery.start_soon(reload)
            async for _ in herd.events("online"):
                break  # the first new worker is spawned: it may read either file
            write(app_dir / "racy_app.py", "def app(request:\n")
        versions = await bodies(herd.url)
        assert len(versions) == 1 and versions <= {"one", "two"}
        assert len({worker.generation for worker in herd.workers}) == 1


# -- WebSocket clients through a reload -------------------------------------------------


class Client(threading.Thread):
    """A WebSocket client that reconnects 0.1 s after the server closes it, counting the
    closes the server made (as the chat example's browsers do)."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = stop
        self.closes = 0
        self.pids: list[int] = []
        self.connected = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.session()
                time.sleep(0.1)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def session(self) -> None:
        with connect(self.url, open_timeout=30) as ws:
            ws.send("pid")
            self.pids.append(int(ws.recv(timeout=30)))
            self.connected.set()
            while not self.stop.is_set():
                try:
                    ws.recv(timeout=0.1)
                except TimeoutError:
                    continue
                except websockets.ConnectionClosed:
                    self.closes += 1
                    self.connected.clear()
                    return


@pytest.fixture
def stop_clients() -> Iterator[threading.Event]:
    stop = threading.Event()
    yield stop
    stop.set()


@pytest.mark.parametrize("preload", [True, False])
async def test_websocket_clients_are_disconnected_once_per_reload(
    preload: bool, stop_clients: threading.Event
) -> None:
    async with open_herd(app="apps.preload_apps:asgi", workers=2, preload=preload) as herd:
        url = herd.url.replace("http", "ws", 1) + "/echo"
        clients = [Client(url, stop_clients) for _ in range(10)]
        for client in clients:
            client.start()
        await trio.to_thread.run_sync(lambda: all(c.connected.wait(30) for c in clients))
        old = {worker.pid for worker in herd.workers}
        await herd.reload()  # returns once the old workers have exited
        new = {worker.pid for worker in herd.workers}
        assert not old & new

        def settled() -> bool:
            return all(c.connected.is_set() and c.pids[-1] in new for c in clients)

        assert await trio.to_thread.run_sync(wait_until, settled, 30)
        stop_clients.set()
        await trio.to_thread.run_sync(lambda: [c.join(30) for c in clients])
        assert [client.error for client in clients] == [None] * 10
        assert [client.closes for client in clients] == [1] * 10
        assert all(client.pids[0] in old for client in clients)


# -- no orphans ----------------------------------------------------------------------


def status_of(herd: CLIHerd) -> dict[str, Any]:
    return json.loads(herd.control("status", "--json").stdout)


def test_a_preload_that_fails_exits_3_with_the_apps_traceback(cli_herd: Any) -> None:
    herd = cli_herd("apps.broken:app", "--workers", "2", "--preload")
    assert herd.process.wait(60) == 3
    text = "RuntimeError: this app cannot boot: database password missing"
    assert herd.stderr.count(text) == 1, herd.stderr
    assert "Traceback (most recent call last)" in herd.stderr
    assert "listening on" not in herd.stderr


def test_sigkill_of_the_primary_leaves_no_mold_and_no_worker(cli_herd: Any) -> None:
    herd = cli_herd("apps.preload_apps:native", "--workers", "3", "--preload")
    herd.wait_ready()
    status = status_of(herd)
    pids = [worker["pid"] for worker in status["workers"]] + [status["molds"][0]["pid"]]
    herd.process.kill()
    herd.process.wait(10)
    # the kernel kills the mold (its death signal), and the mold's death its workers
    assert wait_until(lambda: all(gone(pid) for pid in pids), 10), marked_processes()
    Path(socket_path(herd.name)).unlink()  # what a SIGKILLed primary cannot remove


def test_sigkill_of_the_mold_makes_a_new_generation_and_no_orphan(cli_herd: Any) -> None:
    herd = cli_herd("apps.preload_apps:native", "--workers", "2", "--preload")
    url = herd.wait_ready()
    status = status_of(herd)
    mold = status["molds"][0]["pid"]
    workers = [worker["pid"] for worker in status["workers"]]
    os.kill(mold, signal.SIGKILL)
    assert wait_until(lambda: all(gone(pid) for pid in [mold, *workers]), 10)

    def recovered() -> bool:
        now = status_of(herd)
        ready = [w for w in now["workers"] if w["state"] == "ready" and w["generation"] == 2]
        return now["generation"] == 2 and len(ready) == 2

    assert wait_until(recovered, 30), herd.stderr
    (new_mold,) = status_of(herd)["molds"]
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        assert client.get(url).text.startswith(f"imported {new_mold['pid']} served ")
    assert "the mold of generation 1" in herd.stderr and "died" in herd.stderr
    assert herd.stop() == 0


async def test_sigkill_of_a_worker_is_reaped_by_its_mold_and_respawned() -> None:
    async with open_herd(app="apps.preload_apps:native", workers=2, preload=True) as herd:
        victim = herd.workers[1]
        os.kill(victim.pid, signal.SIGKILL)
        with trio.fail_after(30):
            async for event in herd.events("exit"):
                if event.pid == victim.pid:
                    break
        assert event.signal == "SIGKILL" and not event.requested
        assert wait_until(lambda: gone(victim.pid), 5)
        with trio.fail_after(30):
            while len([w for w in herd.workers if w.state == "ready"]) < 2:
                await trio.sleep(0.05)
        assert herd.respawns == {"crash": 1}


def test_status_shows_generations(cli_herd: Any) -> None:
    herd = cli_herd("apps.preload_apps:native", "--workers", "2", "--preload")
    herd.wait_ready()
    herd.control("reload")
    table = herd.control("status").stdout.splitlines()
    assert "  generation 2 (mold pid " in table[0]
    assert table[1].split()[4] == "gen"
    assert [line.split()[4] for line in table[2:]] == ["2", "2"]
    assert herd.stop() == 0


def test_unix_sockets_and_shared_dispatch_work_with_preload(cli_herd: Any, tmp_path: Path) -> None:
    path = tmp_path / "herd.sock"
    herd = cli_herd(
        "apps.preload_apps:native", "--uds", str(path), "--dispatch", "shared", "--preload"
    )
    herd.wait_ready()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and b"imported " in answer
    assert herd.stop() == 0
