"""The asyncio benchmark apps (issue 26): each answers ``Hello, World!`` (13 bytes) as the
framework's users write it, awaiting asyncio once, so they need an asyncio loop: served
by trioherd ``--asyncio``, uvicorn and granian in bench/run.sh's ``aio-*`` modes.

- ``quart_app``: a Quart route.
- ``django_app``: a Django async view through Django's own ASGI handler.
- ``fastapi_app``: a FastAPI route that awaits ``asyncio.sleep(0)``.

Each framework is imported only when its app is asked for (``bench.asyncio_apps:quart_app``
imports Quart alone).
"""

from __future__ import annotations

import asyncio
from typing import Any

BODY = "Hello, World!"


def _quart() -> Any:
    from quart import Quart

    app = Quart(__name__)

    @app.route("/")
    async def index() -> str:
        await asyncio.sleep(0)
        return BODY

    return app


def _django() -> Any:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="only-for-the-benchmark",
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        USE_TZ=True,
    )
    django.setup()
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


async def _django_hello(request: Any) -> Any:
    from django.http import HttpResponse

    await asyncio.sleep(0)
    return HttpResponse(BODY)


def _urls() -> list[Any]:
    from django.urls import path

    return [path("", _django_hello)]


def _fastapi() -> Any:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI()

    @app.get("/", response_class=PlainTextResponse)
    async def index() -> str:
        await asyncio.sleep(0)
        return BODY

    return app


_MAKERS = {"quart_app": _quart, "django_app": _django, "fastapi_app": _fastapi}


def __getattr__(name: str) -> Any:
    if name == "urlpatterns":  # Django's ROOT_URLCONF is this module
        return _urls()
    if name in _MAKERS:
        app = _MAKERS[name]()
        globals()[name] = app
        return app
    raise AttributeError(name)
