"""The WSGI benchmark apps (bench/run.sh's ``wsgi2`` and ``wsgiblock`` modes, issue 27):
Flask views that every WSGI server of the benchmark serves unchanged.

- ``hello``: ``/`` answers the 13-byte "Hello, World!" (the ASGI benchmark's body);
- ``blocking``: ``/`` sleeps 10 ms (``time.sleep``: a view waiting on a database or an
  upstream service) and answers the same;
- ``files``: ``/file`` sends ``$BENCH_FILE`` with Flask's ``send_file`` (through
  ``wsgi.file_wrapper``, which servers may send with ``os.sendfile``), ``/`` the hello.
"""

from __future__ import annotations

import os
import time

from flask import Flask, Response, send_file

BODY = "Hello, World!"

hello = Flask("hello")
blocking = Flask("blocking")
files = Flask("files")


@hello.route("/")
@files.route("/")
def say_hello() -> Response:
    return Response(BODY, content_type="text/plain")


@blocking.route("/")
def block_then_hello() -> Response:
    time.sleep(0.010)
    return Response(BODY, content_type="text/plain")


@files.route("/file")
def send_big_file() -> Response:
    return send_file(os.environ["BENCH_FILE"], mimetype="application/octet-stream")
