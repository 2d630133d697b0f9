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


@pytest.fixture(params=["h11", "httptools"])
def http_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with each request parser (``--http``): h11 is the reference, and
    httptools must give the same answers. Herds started by the test take it from the
    environment (``TRIOHERD_HTTP``: ``serve`` reads it, ``helpers.open_herd`` passes it)."""
    monkeypatch.setenv("TRIOHERD_HTTP", request.param)
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
