"""A Django ASGI app (Django's own handler, unchanged): asyncio-only, served with --asyncio.

``/`` is an async view that awaits asyncio; ``/sync`` a plain view, which Django runs in a
thread through asgiref's sync_to_async (its own executor); ``/echo`` reads the body."""

from __future__ import annotations

import asyncio

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    SECRET_KEY="only-for-tests",
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    USE_TZ=True,
)

from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


async def hello(request: HttpRequest) -> HttpResponse:
    await asyncio.sleep(0)
    loop = type(asyncio.get_running_loop()).__name__
    return HttpResponse(f"hello from django on {loop}")


def sync_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse("sync view")


@csrf_exempt
async def echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body)


urlpatterns = [path("", hello), path("sync", sync_view), path("echo", echo)]
django.setup()
app = get_asgi_application()
