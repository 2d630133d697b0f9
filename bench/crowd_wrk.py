#!/usr/bin/env python3
"""What a slowloris crowd costs the normal clients of a server: wrk's keep-alive clients
alone, then beside CROWD slowloris sockets (bench/reliability.py's crowd: half trickle a
request head one byte per 0.5 s, half send nothing, reconnected when cut), in interleaved
pairs; prints each pair's throughput ratio and p99 ratio (crowd / alone).

    python3 bench/crowd_wrk.py                      # trioherd, 2 workers, 5 pairs
    PAIRS=3 CROWD=2000 CONNECTIONS=16 DURATION=10 python3 bench/crowd_wrk.py

The server is trioherd from this repository (``python -m trioherd serve bench.hello_app:app
--workers 2``), or with SERVER=uvicorn ``uvicorn --workers 2`` (install ``uvicorn[standard]``
into BENCH_PYTHON's environment), started once for all pairs; its python is BENCH_PYTHON
(default: this one); SERVER_ARGS are added to trioherd's command. Needs wrk on PATH
(Debian's package). All traffic goes to 127.0.0.1; every run is bounded by DURATION, and
the crowd is stopped and joined after each.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability import Crowd, env_number, free_port, one_request

REPO_ROOT = Path(__file__).resolve().parent.parent


def wrk(port: int, connections: int, duration: int) -> tuple[float, float]:
    """(requests per second, p99 in ms) of one wrk run."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}",
            "--latency",
            "--timeout",
            "10",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return rate, float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> None:
    pairs = int(env_number("PAIRS", 5, 1, 20))
    crowd_size = int(env_number("CROWD", 2000, 1, 20000))
    connections = int(env_number("CONNECTIONS", 16, 1, 1000))
    duration = int(env_number("DURATION", 10, 1, 120))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, crowd_size + 4096), hard))
    port = free_port()
    python = os.environ.get("BENCH_PYTHON", sys.executable)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if os.environ.get("SERVER", "trioherd") == "uvicorn":  # the peer, as its users run it
        command = [python, "-m", "uvicorn", "--workers", "2", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--no-access-log", "bench.hello_app:app"]
    else:
        command = [python, "-m", "trioherd", "serve", "bench.hello_app:app", "--workers", "2"]
        command += ["--bind", f"127.0.0.1:{port}", "--name", f"crowd-{os.getpid()}"]
        command += os.environ.get("SERVER_ARGS", "").split()
    server = subprocess.Popen([*command, "--log-level", "warning"], cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not one_request(port, 2.0)[0]:
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.2)
        print(f"| pair | alone req/s | p99 ms | crowd {crowd_size} | p99 ms | ratio | p99 ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for pair in range(1, pairs + 1):
            alone = wrk(port, connections, duration)
            crowd = Crowd(port, crowd_size)
            crowd.start()
            try:
                crowd.wait_held(30)
                beside = wrk(port, connections, duration)
            finally:
                crowd.stop()
            print(
                f"| {pair} | {alone[0]:,.0f} | {alone[1]:.2f} | {beside[0]:,.0f} | "
                f"{beside[1]:.2f} | {beside[0] / alone[0]:.2f} | {beside[1] / alone[1]:.2f} |",
                flush=True,
            )
            time.sleep(1)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


if __name__ == "__main__":
    main()
