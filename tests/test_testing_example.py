"""A pytest-trio test of an app on a real herd, with trioherd.testing.open_herd."""

import httpx
import pytest

import trioherd
from trioherd.testing import open_herd


async def app(request: trioherd.Request) -> trioherd.Response:
    worker = trioherd.current_worker()
    assert worker is not None
    return trioherd.Response(f"hello from worker {worker.id}")


@pytest.mark.trio
async def test_every_worker_answers() -> None:
    async with open_herd(app, workers=2) as herd:
        fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection per request
        async with httpx.AsyncClient(base_url=herd.url, limits=fresh) as client:
            answers = {(await client.get("/")).text for _ in range(4)}
        assert answers == {f"hello from worker {w.id}" for w in herd.workers}


@pytest.mark.trio
async def test_two_herds_side_by_side() -> None:
    async with open_herd(app, workers=1) as first, open_herd("trioherd._demo:app") as second:
        assert first.url != second.url
        async with httpx.AsyncClient() as client:
            assert (await client.get(first.url)).text == "hello from worker 1"
            assert (await client.get(second.url)).headers["cache-control"] == "no-store"
