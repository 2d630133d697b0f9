"""Shared fixtures and session set-up: the leak check every test gets (no process it
started may outlive it, and the test process has no more open fds afterwards than before)
``cli_herd`` and ``example``. The helpers test modules import are in helpers.py."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    MARKER,
    ROOT,
    TESTS,
    CLIHerd,
    marked_processes,
    open_fds,
    unique_name,
    wait_until,
)

os.environ[MARKER] = uuid.uuid4().hex  # inherited by every process a test starts
# control sockets of test herds go to a directory of this session, not the user's own
RUNTIME_DIR = tempfile.mkdtemp(prefix="trioherd-tests-")
os.environ["XDG_RUNTIME_DIR"] = RUNTIME_DIR
atexit.register(shutil.rmtree, RUNTIME_DIR, True)
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = open_fds()
    yield
    assert wait_until(lambda: not marked_processes(), 10), (
        f"processes left behind: {marked_processes()}"
    )
    assert wait_until(lambda: len(open_fds()) <= len(before), 5), (
        f"fds left open: {sorted(open_fds() - before)}"
    )
    assert wait_until(lambda: not control_sockets(), 5), f"left behind: {control_sockets()}"


def control_sockets() -> list[str]:
    directory = Path(RUNTIME_DIR) / "trioherd"
    return sorted(p.name for p in directory.glob("*.sock")) if directory.exists() else []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``http_parser``'s runs: each parser on Trio, and the asyncio runtime (httptools)."""
    if "http_parser" in metafunc.fixturenames:
        metafunc.parametrize("http_parser", ["h11", "httptools", "asyncio"], indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """No asyncio run of a test (or one of its parameters) marked ``trio_only``: what it
    checks exists on the Trio runtime alone (a native WebSocket, a stream handler)."""
    trio_only = [
        item
        for item in items
        if item.get_closest_marker("trio_only") is not None
        and getattr(getattr(item, "callspec", None), "params", {}).get("http_parser") == "asyncio"
    ]
    if trio_only:
        config.hook.pytest_deselected(items=trio_only)
        items[:] = [item for item in items if item not in trio_only]


def _runs_of(item: pytest.Item) -> tuple[object, ...]:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (params.get("http_parser"), params.get("runtime"))


@pytest.fixture(params=["trio", "asyncio"])
def runtime(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on each worker runtime: Trio, and asyncio's loop (the native test apps
    behind their ASGI twins, ``apps.twin``), as ``http_parser``'s asyncio run does."""
    if request.param == "asyncio":
        monkeypatch.setenv("TRIOHERD_ASYNCIO", "1")
    return str(request.param)


@pytest.fixture
def http_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with each request parser (``--http``): h11 is the reference, and
    httptools must give the same answers; and once on the asyncio runtime (``asyncio``:
    httptools on asyncio's loop, the native test apps behind their ASGI twins,
    ``apps.twin``). Herds started by the test take it from the environment
    (``TRIOHERD_HTTP``, ``TRIOHERD_ASYNCIO``: ``serve`` reads them, ``helpers.open_herd``
    passes them)."""
    parser = "httptools" if request.param == "asyncio" else request.param
    monkeypatch.setenv("TRIOHERD_HTTP", parser)
    if request.param == "asyncio":
        monkeypatch.setenv("TRIOHERD_ASYNCIO", "1")
    return str(request.param)


@pytest.fixture
def cli_herd(tmp_path: Path) -> Iterator[Any]:
    started: list[CLIHerd] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CLIHerd:
        herd = CLIHerd(list(args), tmp_path, env)
        started.append(herd)
        return herd

    yield start
    for herd in started:
        herd.close()


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Callable[..., CLIHerd]]:
    """``python ARGS --bind 127.0.0.1:0 --name <unique>`` from the repository root, as a
    user would run an example; returned once it is ready, closed after the test."""
    started: list[CLIHerd] = []

    def start(*args: str) -> CLIHerd:
        command = [sys.executable, *args, "--bind", "127.0.0.1:0", "--name", unique_name()]
        herd = CLIHerd([], tmp_path, {"PYTHONPATH": str(ROOT)}, command)
        started.append(herd)
        herd.wait_ready()
        return herd

    yield start
    for herd in started:
        herd.close()
