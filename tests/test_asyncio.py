"""The asyncio runtime (``--asyncio``, issue 26): asyncio apps on the herd with their own
loop for the worker's whole life. The protocol tests run on it through conftest's
``http_parser`` and ``runtime`` fixtures; here is what is the asyncio runtime's own: the
loop a worker runs (uvloop or asyncio's), what an app makes at startup working in every
request, the frameworks, recycling, logs and counters, and the hint without the flag."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from websockets.sync.client import connect as ws_connect

from helpers import connect, open_herd, receive_all

STATEFUL = "apps.asyncio_apps:stateful"


@pytest.mark.parametrize(("loop", "module"), [("auto", "uvloop"), ("asyncio", "asyncio")])
async def test_startup_objects_serve_every_request_on_the_chosen_loop(
    loop: str, module: str
) -> None:
    async with open_herd(app=STATEFUL, workers=2, asyncio=True, loop=loop) as herd:
        pids = {worker.pid for worker in herd.workers}
        async with httpx.AsyncClient(timeout=30) as client:
            answers: list[str] = []

            async def ask(i: int) -> None:
                reply = await client.post(herd.url + "/", content=f"req{i}".encode())
                assert reply.status_code == 200
                answers.append(reply.text)

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(ask, i)
    assert len(answers) == 40
    bodies = sorted(answer.split()[0] for answer in answers)
    assert bodies == sorted(f"REQ{i}" for i in range(40))
    assert {answer.split()[1] for answer in answers} == {module}
    served_by = {int(answer.split()[4]) for answer in answers}
    assert served_by <= pids and len(served_by) == 2  # round robin: both workers
    for pid in served_by:  # each worker's lock counted its own requests, one by one
        counts = sorted(int(a.split()[3]) for a in answers if int(a.split()[4]) == pid)
        assert counts == list(range(1, len(counts) + 1))


async def test_django_quart_and_fastapi_run_on_the_asyncio_runtime() -> None:
    async with (
        open_herd(app="apps.django_app:app", workers=1, asyncio=True) as django,
        open_herd(app="apps.quart_app:app", workers=1, asyncio=True) as quart,
        open_herd(app="apps.asyncio_apps:fastapi_app", workers=1, asyncio=True) as fast,
    ):
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.get(django.url + "/")
            assert (reply.status_code, reply.text) == (200, "hello from django on Loop")
            reply = await client.get(django.url + "/sync")  # in asgiref's own thread
            assert (reply.status_code, reply.text) == (200, "sync view")
            reply = await client.post(django.url + "/echo", content=b"x" * 100_000)
            assert reply.status_code == 200 and reply.content == b"x" * 100_000
            reply = await client.get(quart.url + "/")
            assert (reply.status_code, reply.text) == (200, "hello from quart")
            reply = await client.post(quart.url + "/echo", content=b"body")
            assert (reply.status_code, reply.content) == (200, b"body")
            reply = await client.get(fast.url + "/")
            assert (reply.status_code, reply.json()) == (200, {"hello": "from a task"})


async def test_max_requests_recycles_an_asyncio_worker_without_a_failed_request() -> None:
    async with open_herd(
        app=STATEFUL, workers=1, asyncio=True, max_requests=20, max_requests_jitter=0
    ) as herd:
        first = herd.workers[0].pid
        async with httpx.AsyncClient(timeout=30) as client:
            pids = set()
            for i in range(60):
                reply = await client.post(herd.url + "/", content=b"x")
                assert reply.status_code == 200, i
                pids.add(int(reply.text.split()[4]))
        assert first in pids and len(pids) >= 3  # 60 requests, 20 a worker
        # every request counted, the recycled workers' last heartbeats included
        with trio.fail_after(30):
            while herd.totals()["requests"] < 60:
                await trio.sleep(0.05)


async def test_access_log_json_and_counters_come_from_the_asyncio_worker(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async with open_herd(
        app=STATEFUL, workers=1, asyncio=True, access_log=True, log_format="json"
    ) as herd:
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(4):
                assert (await client.post(herd.url + "/x?y=1", content=b"a")).status_code == 200
        async with await connect(herd) as stream:  # a malformed head: 400, the worker lives
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n")
            assert (await receive_all(stream)).startswith(b"HTTP/1.1 400 ")
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(herd.url + "/x?y=1", content=b"a")).status_code == 200
        with trio.fail_after(30):
            while herd.totals()["requests"] < 6:
                await trio.sleep(0.05)
        stats = herd.totals()
        assert stats["status"].get("2xx") == 5 and stats["status"].get("4xx") == 1
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line]
    access = [line for line in lines if line["logger"] == "trioherd.access"]
    assert sorted((line["status"], line["path"] or "-") for line in access) == [
        (200, "/x?y=1")
    ] * 5 + [(400, "-")]


async def test_an_asyncio_app_with_websockets_runs_on_the_trio_asyncio_bridge() -> None:
    # the asyncio runtime serves no WebSockets yet: --loop trio-asyncio runs the app in a
    # Trio worker through trio-asyncio, WebSockets included
    async with open_herd(
        app="apps.quart_app:app", workers=1, asyncio=True, loop="trio-asyncio"
    ) as herd:
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.get(herd.url + "/")
            assert (reply.status_code, reply.text) == (200, "hello from quart")

        def talk() -> list[str]:
            with ws_connect(herd.url.replace("http://", "ws://") + "/ws") as socket:
                answers = []
                for word in ("one", "two"):
                    socket.send(word)
                    answers.append(str(socket.recv(timeout=30)))
                return answers

        assert await trio.to_thread.run_sync(talk) == ["echo one", "echo two"]
