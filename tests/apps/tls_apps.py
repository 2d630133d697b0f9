"""Apps and SSLContext factories for the TLS tests."""

from __future__ import annotations

import json
import os
import ssl
from typing import Any

import anyio

import trioherd


async def whoami(request: trioherd.Request) -> trioherd.Response:
    """The worker pid, the client's port (one per connection) and what TLS told the app;
    ``?sleep=S`` answers after S seconds."""
    if request.query.startswith("sleep="):
        await anyio.sleep(float(request.query[len("sleep=") :]))
    body = {
        "pid": os.getpid(),
        "client_port": request.client[1] if request.client else None,
        "scheme": request.scheme,
        "tls": request.tls,
    }
    return trioherd.Response(json.dumps(body), content_type="application/json")


async def asgi_whoami(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI view of the same: scheme and the TLS extension."""
    body = json.dumps(
        {"pid": os.getpid(), "scheme": scope["scheme"], "tls": scope["extensions"]["tls"]}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def tls12_only_context() -> ssl.SSLContext:
    """The library hook: a context built in the worker from files named by environment
    variables, which caps TLS at 1.2 so that a test can tell it from the default context."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.environ["TLS_TEST_CERTFILE"], os.environ["TLS_TEST_KEYFILE"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def not_a_context() -> object:
    return "certificate.pem"
