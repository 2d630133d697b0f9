"""The examples run as a user would run them, and do what their docstrings say."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, unique_name, wait_until

EXAMPLES = ROOT / "examples"


class Example:
    def __init__(self, args: list[str], tmp_path: Path) -> None:
        self.log_path = tmp_path / "example.log"
        self.out_path = tmp_path / "example.out"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.out = open(self.out_path, "wb")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, *args, "--bind", "127.0.0.1:0", "--name", unique_name()],
            stdout=self.out, stderr=self.log, env=env, cwd=ROOT,
        )

    def url(self) -> str:
        def ready() -> bool:
            return "listening on" in self.log_path.read_text() or self.process.poll() is not None

        assert wait_until(ready, 60), self.log_path.read_text()
        for line in self.log_path.read_text().splitlines():
            if "listening on " in line:
                return line.split("listening on ", 1)[1].strip()
        raise AssertionError(self.log_path.read_text())

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()
        self.out.close()


@pytest.fixture
def example(tmp_path: Path) -> Iterator[object]:
    started: list[Example] = []

    def start(*args: str) -> Example:
        started.append(Example(list(args), tmp_path))
        return started[-1]

    yield start
    for item in started:
        item.close()


def test_echo_example(example: object) -> None:
    echo = example(str(EXAMPLES / "echo.py"), "--workers", "2")  # type: ignore[operator]
    port = int(echo.url().rsplit(":", 1)[1])
    answers = set()
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"hello\n")
            answers.add(sock.recv(1000).decode())
    assert len(answers) == 2
    assert all(a.startswith("worker ") and a.endswith("says: hello\n") for a in answers)
    assert echo.stop() == 0


def test_hello_example(example: object) -> None:
    hello = example(str(EXAMPLES / "hello.py"), "--workers", "2")  # type: ignore[operator]
    url = hello.url()
    with httpx.Client() as client:
        assert client.get(url + "/?name=herd").text == "Hello, herd!\n"
        assert client.post(url, content=b"back").text == "back"
    assert hello.stop() == 0


def test_asgi_example_through_the_cli(example: object) -> None:
    asgi = example("-m", "trioherd", "serve", "examples.asgi_app:app", "--workers", "2")  # type: ignore[operator]
    with httpx.Client() as client:
        reply = client.get(asgi.url() + "/x").json()
    assert reply["path"] == "/x" and reply["worker_pid"] > 0
    assert asgi.stop() == 0


def test_count_requests_example_tallies_per_pid(example: object) -> None:
    counter = example(str(EXAMPLES / "count_requests.py"), "--workers", "2")  # type: ignore[operator]
    url = counter.url()
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        pids = [client.get(url).text.split()[-1] for _ in range(10)]
    expected = {int(pid): pids.count(pid) for pid in set(pids)}

    def tallied() -> bool:
        lines = counter.out_path.read_text().splitlines()
        return bool(lines) and lines[-1] == f"tally: {dict(sorted(expected.items()))}"

    assert wait_until(tallied, 30), counter.out_path.read_text()
    assert len(expected) == 2
    assert counter.stop() == 0
