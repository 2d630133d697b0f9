"""--preload (issue 29): how fast a killed worker is replaced, and what the workers cost in
memory, with and without it.

    python bench/preload.py                  # 7 kills per case, then the memory runs
    python bench/preload.py --kills 11 --no-fastapi

Respawn: ``python -m trioherd serve APP --workers 1`` (with and without ``--preload``), for
the 13-byte hello app and for an app whose import takes 1 s (``time.sleep(1)`` at import,
as a cache warmed at start would). Each kill SIGKILLs the one worker and times, from the
kill, a request on a new connection until it is answered by another pid: the replacement
answering (the primary holds the connection until a worker is ready). Prints every time
and the median of each case.

Memory: ``--workers 4`` of an app holding about 80 MB of Python objects (a list of
tuples of str and int made at import), with and without ``--preload``; after 16 requests
(every worker served some), the sum of the workers' PSS from ``/proc/PID/smaps_rollup``,
and the mold's. Then the same for a FastAPI + SQLAlchemy hello app (an in-memory SQLite
engine, one query per request); SQLAlchemy is installed with pip into a temporary
directory if this Python lacks it (FastAPI must be there; the case is skipped if not).

Only 127.0.0.1; every wait is bounded; each herd is stopped (SIGTERM, then SIGKILL of its
process group after 10 s) before the next starts. CPU-bound work is small: the numbers do
not depend much on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SLOW_IMPORT_APP = """
import time

time.sleep(1.0)  # an import that takes a second
from bench.hello_app import app
"""

BIG_APP = """
# 80 MB of Python objects (tracemalloc): a list of 510,000 (str, int) tuples
DATA = [("item number %08d" % i, i * 7) for i in range(510_000)]
from bench.hello_app import app
"""

FASTAPI_APP = """
from fastapi import FastAPI
from sqlalchemy import create_engine, text

engine = create_engine("sqlite://")
app = FastAPI()


@app.get("/")
async def hello() -> dict:
    with engine.connect() as connection:
        return {"hello": connection.execute(text("select 'world'")).scalar()}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, timeout: float = 30) -> bytes:
    """One request on a new connection; the body (b"" if it failed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError:
        return b""
    head, _, body = answer.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.1 200") else b""


class Herd:
    def __init__(self, app: str, workers: int, preload: bool, path: list[str]) -> None:
        self.port = free_port()
        self.name = f"bench-preload-{self.port}"
        command = [sys.executable, "-m", "trioherd", "serve", app, "--workers", str(workers)]
        command += ["--bind", f"127.0.0.1:{self.port}", "--name", self.name]
        command += ["--preload" if preload else "--no-preload", "--log-level", "warning"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, str(ROOT)]))
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if get(self.port, timeout=5):
                return
            if self.process.poll() is not None:
                raise SystemExit(f"{app} exited {self.process.returncode}")
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"{app} did not answer within 60 s")

    def status(self) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "trioherd", "status", "--json", "--name", self.name],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        return json.loads(result.stdout)

    def ready_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["state"] == "ready"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def respawn_times(app: str, preload: bool, kills: int, path: list[str]) -> list[float]:
    herd = Herd(app, 1, preload, path)
    times = []
    try:
        for _ in range(kills):
            (victim,) = herd.ready_pids()
            began = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            # the one worker is dead: whatever answers is its replacement (a connection
            # passed to the dead one is moved to it)
            if not get(herd.port, timeout=60):
                raise SystemExit(f"{app}: no answer after the kill")
            times.append(time.monotonic() - began)
            deadline = time.monotonic() + 30  # settled: one ready worker, not the victim
            while time.monotonic() < deadline and herd.ready_pids() in ([], [victim]):
                time.sleep(0.05)
            time.sleep(0.5)
    finally:
        herd.stop()
    return times


def pss(pid: int) -> int:
    """Proportional set size in bytes (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory(app: str, preload: bool, path: list[str]) -> tuple[int, int]:
    """(sum of the 4 workers' PSS, the mold's PSS) in bytes."""
    herd = Herd(app, 4, preload, path)
    try:
        for _ in range(16):
            get(herd.port)
        time.sleep(1.0)
        status = herd.status()
        workers = sum(pss(w["pid"]) for w in status["workers"])
        molds = sum(pss(m["pid"]) for m in status.get("molds", []))
    finally:
        herd.stop()
    return workers, molds


def sqlalchemy_path(directory: str) -> list[str] | None:
    """Where SQLAlchemy can be imported from ([] if this Python has it), or None."""
    try:
        import fastapi  # noqa: F401
    except ImportError:
        print("FastAPI is not installed: the FastAPI + SQLAlchemy case is skipped")
        return None
    try:
        import sqlalchemy  # noqa: F401

        return []
    except ImportError:
        pass
    target = os.path.join(directory, "site")
    command = [sys.executable, "-m", "pip", "install", "-q", "--target", target, "sqlalchemy"]
    if subprocess.run(command, timeout=300).returncode != 0:
        print("SQLAlchemy could not be installed: the FastAPI + SQLAlchemy case is skipped")
        return None
    return [target]


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=7)
    parser.add_argument("--no-fastapi", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trioherd-bench-preload-") as directory:
        Path(directory, "slow_import_app.py").write_text(SLOW_IMPORT_APP)
        Path(directory, "big_app.py").write_text(BIG_APP)
        Path(directory, "fastapi_app.py").write_text(FASTAPI_APP)
        path = [directory]
        print("## Time from a worker's SIGKILL to its replacement answering (--workers 1)\n")
        print("| app | without --preload | with --preload | ratio |")
        print("|---|---|---|---|")
        for label, app in (
            ("hello (13 bytes)", "bench.hello_app:app"),
            ("import takes 1 s", "slow_import_app:app"),
        ):
            plain = respawn_times(app, False, args.kills, path)
            molded = respawn_times(app, True, args.kills, path)
            print(
                f"<!-- {label}: without {[round(t, 3) for t in plain]} "
                f"with {[round(t, 3) for t in molded]} -->"
            )
            a, b = statistics.median(plain), statistics.median(molded)
            print(f"| {label} | {a:.3f} s | {b:.3f} s | {b / a:.2f} |")
        print("\n## Memory: sum of the 4 workers' PSS (and the mold's)\n")
        print("| app | without --preload | with --preload | ratio (workers) | mold |")
        print("|---|---|---|---|---|")
        cases = [("80 MB of Python objects", "big_app:app", path)]
        extra = None if args.no_fastapi else sqlalchemy_path(directory)
        if extra is not None:
            cases.append(("FastAPI + SQLAlchemy hello", "fastapi_app:app", path + extra))
        for label, app, app_path in cases:
            plain, _ = memory(app, False, app_path)
            molded, mold = memory(app, True, app_path)
            print(
                f"| {label} | {mib(plain)} | {mib(molded)} | {molded / plain:.2f} | {mib(mold)} |"
            )


if __name__ == "__main__":
    main()
