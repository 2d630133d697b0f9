"""A large download through ``wsgi.file_wrapper`` (issue 27): trioherd against gunicorn
``-k gthread`` (whose file_wrapper also uses sendfile) and granian ``--interface wsgi``,
all serving Flask's ``send_file`` of one file (bench/wsgi_app.py:files, ``/file``).

Each server runs 2 workers; ``wrk -t1 -c4`` downloads the file again and again for
DURATION seconds; reported: throughput (MB/s of body), and the CPU time the server's whole
process tree spent per GB sent (utime + stime from /proc). Servers are interleaved round
by round; medians of ROUNDS rounds. 127.0.0.1 only.

    python3 bench/wsgi_file.py                       # 100 MiB file, 3 rounds of 10 s
    SIZE_MB=20 ROUNDS=5 DURATION=5 python3 bench/wsgi_file.py

Runs with the venv bench/run.sh makes (``BENCH_VENV``, default /tmp/trioherd-bench-venv,
with gunicorn, granian and flask installed: run ``MODES=wsgi2 bash bench/run.sh`` once).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("BENCH_VENV", "/tmp/trioherd-bench-venv"))
SIZE_MB = int(os.environ.get("SIZE_MB", "100"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "4"))
APP = "bench.wsgi_app:files"
TICKS = os.sysconf("SC_CLK_TCK")


def command(server: str, port: int) -> list[str]:
    python = str(VENV / "bin" / "python")
    if server == "trioherd":
        return [python, "-m", "trioherd", "serve", APP, "--workers", "2",
                "--bind", f"127.0.0.1:{port}", "--name", f"bench-file-{port}"]  # fmt: skip
    if server == "gunicorn-gthread":
        return [str(VENV / "bin" / "gunicorn"), "-k", "gthread", "--threads", "8", "-w", "2",
                "-b", f"127.0.0.1:{port}", "--log-level", "warning", APP]  # fmt: skip
    return [str(VENV / "bin" / "granian"), "--interface", "wsgi", "--workers", "2",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", APP]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_ticks(root: int) -> int:
    """utime + stime of ``root`` and its descendants, in clock ticks."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, queue = 0, [root]
    while queue:
        pid = queue.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        queue.extend(children.get(pid, []))
    return total


def measure(server: str, path: Path) -> tuple[float, float]:
    """(MB/s of body, CPU seconds of the server per GB sent)."""
    port = free_port()
    env = {**os.environ, "BENCH_FILE": str(path), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command(server, port), cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=1) as reply:
                    reply.read()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{server} did not answer") from None
                time.sleep(0.1)
        with urllib.request.urlopen(url + "/file", timeout=60) as reply:
            assert len(reply.read()) == path.stat().st_size, server
        before = tree_ticks(process.pid)
        load = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}s", "--timeout", "30s"]
        wrk = subprocess.run(
            [*load, url + "/file"], capture_output=True, text=True, timeout=DURATION + 60,
            check=True,
        )  # fmt: skip
        cpu = (tree_ticks(process.pid) - before) / TICKS
        done = int(re.search(r"(\d+) requests in", wrk.stdout).group(1))  # type: ignore[union-attr]
        seconds = float(re.search(r"requests in ([\d.]+)s", wrk.stdout).group(1))  # type: ignore[union-attr]
        sent = done * path.stat().st_size
        return sent / seconds / 1e6, cpu / (sent / 1e9)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> None:
    servers = os.environ.get("SERVERS", "trioherd gunicorn-gthread granian-wsgi").split()
    results: dict[str, list[tuple[float, float]]] = {server: [] for server in servers}
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "big.bin"
        with open(path, "wb") as file:
            for _ in range(SIZE_MB):
                file.write(os.urandom(1 << 20))
        for round_ in range(ROUNDS):
            for k in range(len(servers)):
                server = servers[(k + round_) % len(servers)]
                rate, cpu = measure(server, path)
                results[server].append((rate, cpu))
                print(f"round {round_ + 1} {server}: {rate:,.0f} MB/s, {cpu:.2f} CPU s/GB",
                      file=sys.stderr)  # fmt: skip
    print(f"\n{SIZE_MB} MiB file, wrk -t1 -c{CONNECTIONS} -d{DURATION}s, medians of {ROUNDS}\n")
    print("| server | MB/s | server CPU s per GB | vs trioherd |")
    print("|---|---:|---:|---:|")
    ours = statistics.median(r for r, _ in results.get("trioherd", [(1.0, 0.0)]))
    for server, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"| {server} | {rate:,.0f} | {cpu:.2f} | {rate / ours:.2f}x |")


if __name__ == "__main__":
    main()
