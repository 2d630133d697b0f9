"""What reading one request head costs, in process: h11, trioherd's llhttp path, gunicorn.

    python bench/parsers.py            # 50,000 heads each, best of 5

- h11: a fresh ``h11.Connection``, ``receive_data``, ``next_event`` (what trioherd does
  per request with ``--http h11``);
- llhttp: ``trioherd.protocols.httptools.plain_head`` (what it does with ``--http httptools``:
  the request line regex, a fresh llhttp parser through httptools, the header list);
- gunicorn: a fresh ``gunicorn.asgi.parser.PythonProtocol`` fed the same bytes (gunicorn's
  own Python parser, ``--http-parser python``), when gunicorn ≥ 24 is installed.

The head is the one wrk sends. In process, without the cache misses of a real server, so
these are lower than what each costs inside a worker (see docs/performance.md).
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h11

HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"
NUMBER = 50_000


def with_h11() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD)
    if type(conn.next_event()) is not h11.Request:
        raise RuntimeError("h11 did not read the head")


def candidates() -> dict[str, Callable[[], None]]:
    found: dict[str, Callable[[], None]] = {"h11": with_h11}
    try:
        from trioherd.protocols.httptools import plain_head
    except ImportError:
        print("llhttp: httptools is not installed (pip install 'trioherd[httptools]')")
    else:

        def with_llhttp() -> None:
            if plain_head(HEAD) is None:
                raise RuntimeError("llhttp did not read the head")

        found["llhttp (trioherd --http httptools)"] = with_llhttp
    try:
        from gunicorn.asgi.parser import PythonProtocol
    except ImportError:
        print("gunicorn: not installed (or older than 24)")
    else:

        def with_gunicorn() -> None:
            done: list[bool] = []
            parser = PythonProtocol(
                on_url=lambda url: None,
                on_header=lambda name, value: None,
                on_headers_complete=lambda: False,
                on_message_complete=lambda: done.append(True),
            )
            parser.feed(HEAD)
            if not done:
                raise RuntimeError("gunicorn did not read the head")

        found["gunicorn PythonProtocol"] = with_gunicorn
    return found


def main() -> None:
    for name, read in candidates().items():
        best = min(timeit.repeat(read, number=NUMBER, repeat=5)) / NUMBER
        print(f"{name:>36}: {best * 1e6:6.2f} µs a head")


if __name__ == "__main__":
    main()
