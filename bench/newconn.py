"""New connections at low concurrency: trioherd's default dispatch against --dispatch shared.

    python bench/newconn.py                     # 3 rounds, 4 clients, 5 s each
    python bench/newconn.py --rounds 5 --clients 8 --seconds 4

Each round starts ``python -m trioherd serve bench.hello_app:app --workers 2`` once per
dispatch mode (the order alternating between rounds) and runs CLIENTS threads that each
open a connection, send one GET with ``Connection: close``, read the answer to its end and
close, again and again for SECONDS. Prints requests per second and latency percentiles
for every run, then the medians. Only 127.0.0.1; every loop is bounded in time and count;
each server is stopped (SIGTERM, then SIGKILL after 10 s) before the next starts.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
MAX_PER_CLIENT = 200_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(dispatch: str, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "trioherd", "serve", "bench.hello_app:app"]
    command += ["--workers", "2", "--dispatch", dispatch, "--bind", f"127.0.0.1:{port}"]
    command += ["--name", f"newconn-{port}"]
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(REQUEST)
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return server
        except OSError:
            time.sleep(0.05)
    stop(server)
    raise SystemExit(f"trioherd --dispatch {dispatch} did not answer within 20 s")


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)
        server.wait()


def client(port: int, until: float, latencies: list[float]) -> None:
    for _ in range(MAX_PER_CLIENT):
        if time.monotonic() >= until:
            return
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(REQUEST)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer {answer[:40]!r}")
        latencies.append(time.perf_counter() - started)


def measure(port: int, clients: int, seconds: float) -> tuple[float, float, float]:
    """(requests per second, p50 µs, p99 µs)."""
    per_client: list[list[float]] = [[] for _ in range(clients)]
    until = time.monotonic() + seconds
    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(port, until, out)) for out in per_client]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    latencies = sorted(x for out in per_client for x in out)
    count = len(latencies)
    return (
        count / elapsed,
        latencies[count // 2] * 1e6,
        latencies[min(count - 1, int(count * 0.99))] * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 51), metavar="1..50")
    parser.add_argument("--clients", type=int, default=4, choices=range(1, 257), metavar="1..256")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if not 0.5 <= args.seconds <= 120:
        parser.error("--seconds: 0.5 to 120")
    results: dict[str, list[tuple[float, float, float]]] = {"round-robin": [], "shared": []}
    for round_ in range(args.rounds):
        modes = list(results) if round_ % 2 == 0 else list(reversed(results))
        for dispatch in modes:
            port = free_port()
            server = start(dispatch, port)
            try:
                rps, p50, p99 = measure(port, args.clients, args.seconds)
            finally:
                stop(server)
            results[dispatch].append((rps, p50, p99))
            print(
                f"round {round_ + 1} {dispatch:>11}: {rps:,.0f} req/s, p50 {p50:,.0f} µs, "
                f"p99 {p99:,.0f} µs",
                flush=True,
            )
    print(f"medians of {args.rounds} rounds, {args.clients} clients, new connection per request:")
    for dispatch, runs in results.items():
        rps, p50, p99 = (statistics.median(run[i] for run in runs) for i in range(3))
        print(
            f"  --dispatch {dispatch:>11}: {rps:,.0f} req/s, p50 {p50:,.0f} µs, p99 {p99:,.0f} µs"
        )


if __name__ == "__main__":
    main()
