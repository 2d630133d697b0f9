"""A Flask app, unchanged: detected as WSGI and served with no flag."""

from __future__ import annotations

import os
import threading

from flask import Flask, Response, request, send_file

app = Flask(__name__)


@app.route("/")
def index() -> str:
    return "hello from flask"


@app.route("/form", methods=["POST"])
def form() -> dict[str, str]:
    return {"name": request.form["name"], "root": request.script_root, "url": request.url}


@app.route("/json", methods=["POST"])
def echo_json() -> dict[str, object]:
    return {"got": request.get_json(), "thread": threading.current_thread().name}


@app.route("/stream")
def stream() -> Response:
    def chunks() -> object:
        for i in range(3):
            yield f"line {i}\n"

    return Response(chunks(), content_type="text/plain")


@app.route("/file")
def download() -> Response:
    return send_file(os.environ.get("TRIOHERD_TEST_FILE", __file__))


@app.route("/boom")
def boom() -> str:
    raise RuntimeError("flask view failed on purpose")
