"""The examples run as a user would run them, and do what their docstrings say."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx

from helpers import ROOT, CLIHerd, wait_until

EXAMPLES = ROOT / "examples"


def test_echo_example(example: Callable[..., CLIHerd]) -> None:
    echo = example(str(EXAMPLES / "echo.py"), "--workers", "2")
    port = int(echo.wait_ready().rsplit(":", 1)[1])
    answers = set()
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"hello\n")
            answers.add(sock.recv(1000).decode())
    assert len(answers) == 2
    assert all(a.startswith("worker ") and a.endswith("says: hello\n") for a in answers)
    assert echo.stop() == 0


def test_hello_example(example: Callable[..., CLIHerd]) -> None:
    hello = example(str(EXAMPLES / "hello.py"), "--workers", "2")
    url = hello.wait_ready()
    with httpx.Client() as client:
        assert client.get(url + "/?name=herd").text == "Hello, herd!\n"
        assert client.post(url, content=b"back").text == "back"
    assert hello.stop() == 0


def test_asgi_example_through_the_cli(example: Callable[..., CLIHerd]) -> None:
    asgi = example("-m", "trioherd", "serve", "examples.asgi_app:app", "--workers", "2")
    with httpx.Client() as client:
        reply = client.get(asgi.wait_ready() + "/x").json()
    assert reply["path"] == "/x" and reply["worker_pid"] > 0
    assert asgi.stop() == 0


def test_count_requests_example_tallies_per_pid(example: Callable[..., CLIHerd]) -> None:
    counter = example(str(EXAMPLES / "count_requests.py"), "--workers", "2")
    url = counter.wait_ready()
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        pids = [client.get(url).text.split()[-1] for _ in range(10)]
    expected = {int(pid): pids.count(pid) for pid in set(pids)}

    def tallied() -> bool:
        lines = counter.out_path.read_text().splitlines()
        return bool(lines) and lines[-1] == f"tally: {dict(sorted(expected.items()))}"

    assert wait_until(tallied, 30), counter.out_path.read_text()
    assert len(expected) == 2
    assert counter.stop() == 0
