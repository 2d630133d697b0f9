"""What test modules share: a herd in this process (real worker processes), a herd run by
the CLI in a subprocess, clients for both, and the checks the leak fixture uses.

A plain module, imported as ``from helpers import ...`` (tests/ is on sys.path: pytest puts
it there for tests/conftest.py, which also adds it itself). The fixtures and the session
set-up (marker variable, runtime directory) are in conftest.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

import trioherd
from trioherd import testing
from trioherd.primary.control import control_dir

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# set by conftest.py to a value of this session; inherited by every process a test starts
MARKER = "TRIOHERD_TEST_MARKER"


def marked_processes() -> list[int]:
    """Processes (but this one) that carry this test session's marker, zombies excluded."""
    needle = f"{MARKER}={os.environ[MARKER]}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                if needle not in file.read():
                    continue
            with open(f"/proc/{entry}/stat", "rb") as file:
                if file.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def on_asyncio() -> bool:
    """The test runs its herds on the asyncio runtime (conftest.http_parser)."""
    return os.environ.get("TRIOHERD_ASYNCIO") == "1"


_APP_SPEC = re.compile(r"apps\.(\w+):(\w+)")


def runtime_app(spec: str) -> str:
    """A test app as the asyncio runtime serves it: its ASGI twin (``apps.twin``)."""
    match = _APP_SPEC.fullmatch(spec)
    return f"apps.twin:{match[1]}.{match[2]}" if match else spec


def unique_name() -> str:
    return "t" + uuid.uuid4().hex[:10]


def herd_config(**options: Any) -> trioherd.Config:
    defaults: dict[str, Any] = {
        "bind": ["127.0.0.1:0"],
        "workers": 2,
        "name": unique_name(),
        "graceful_timeout": 5.0,
        "log_level": "debug",
    }
    defaults.update(options)
    return trioherd.Config(**defaults)


@asynccontextmanager
async def open_herd(**options: Any) -> AsyncIterator[trioherd.Herd]:
    """A herd whose primary runs in this test's Trio run (``trioherd.testing.open_herd``,
    which also checks that none of its workers outlives it), with the suite's defaults:
    2 workers, debug logs, a 5 s graceful timeout, and its control socket in this
    session's runtime directory, where the leak fixture looks for leftovers."""
    defaults: dict[str, Any] = {
        "workers": 2,
        "name": unique_name(),
        "graceful_timeout": 5.0,
        "log_level": "debug",
        "control_dir": control_dir(),
    }
    if "TRIOHERD_HTTP" in os.environ:  # the parser the test runs with (conftest.http_parser)
        defaults["http"] = os.environ["TRIOHERD_HTTP"]
    if on_asyncio():  # the runtime too (conftest.http_parser's "asyncio")
        defaults["asyncio"] = True
    defaults.update(options)
    app = defaults.pop("app", None)
    if isinstance(app, str) and defaults.get("asyncio"):
        app = runtime_app(app)
    try:
        async with testing.open_herd(app, **defaults) as herd:
            yield herd
    except (trioherd.WorkerBootError, trioherd.StoppedBeforeReady) as exc:
        # tests written when this helper was a bare nursery expect these in a group
        raise ExceptionGroup("the herd did not start", [exc]) from None


def address_of(herd: trioherd.Herd) -> tuple[str, int]:
    url = herd.addresses[0]
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return host.strip("[]"), int(port)


async def connect(herd: trioherd.Herd) -> trio.SocketStream:
    host, port = address_of(herd)
    return await trio.open_tcp_stream(host, port)


async def receive_until(stream: trio.abc.ReceiveStream, end: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while end not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        assert len(data) < limit
    return data


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not chunk:
            break
        data += chunk
    return data


class CLIHerd:
    """``python -m trioherd serve ...`` in a subprocess, with its stderr in a file."""

    def __init__(
        self,
        args: list[str],
        tmp_path: Path,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ):
        """``python -m trioherd serve ARGS`` (port 0 and a unique name added unless
        given), or ``command`` as it is."""
        self.name = unique_name()
        self.log_path = tmp_path / f"{self.name}.log"
        self.out_path = tmp_path / f"{self.name}.out"
        self.log = open(self.log_path, "wb")
        self.out = open(self.out_path, "wb")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
        full_env.update(env or {})
        if command is None:
            if full_env.get("TRIOHERD_ASYNCIO") == "1":  # (conftest.http_parser)
                args = [runtime_app(arg) for arg in args]
            command = [sys.executable, "-m", "trioherd", "serve", *args]
            if "--name" not in args:
                command += ["--name", self.name]
            if not any(a.startswith("--bind") or a.startswith("--uds") for a in args):
                command += ["--bind", "127.0.0.1:0"]
        self.process = subprocess.Popen(
            command, stdout=self.out, stderr=self.log, env=full_env, cwd=tmp_path
        )
        self.urls: list[str] = []

    @property
    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> str:
        def ready() -> bool:
            self.urls = [
                line.split("listening on ", 1)[1].strip()
                for line in self.stderr.splitlines()
                if line.startswith("trioherd: listening on ")
            ]
            return bool(self.urls) or self.process.poll() is not None

        assert wait_until(ready, timeout), f"not ready in {timeout}s:\n{self.stderr}"
        assert self.urls, f"exited {self.process.returncode}:\n{self.stderr}"
        return self.urls[0]

    @property
    def port(self) -> int:
        return int(self.urls[0].rsplit(":", 1)[1])

    def control(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        result = subprocess.run(
            [sys.executable, "-m", "trioherd", *args, "--name", self.name],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()
        self.out.close()
