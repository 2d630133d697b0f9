"""A Django WSGI app (Django's own handler, ``get_wsgi_application()``): detected as WSGI
and served with no flag; each view runs in a thread of the worker's pool."""

from __future__ import annotations

import threading

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

from django.core.signals import request_finished  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

FINISHED: list[str] = []  # the threads request_finished ran in (Django's close())


def _finished(sender: object, **kwargs: object) -> None:
    FINISHED.append(threading.current_thread().name)


request_finished.connect(_finished)


def hello(request: HttpRequest) -> HttpResponse:
    return HttpResponse(
        f"hello from django wsgi at {request.path} ({request.META['SCRIPT_NAME']})"
    )


@csrf_exempt
def echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body, content_type="application/octet-stream")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(f"part {i}\n" for i in range(3))


def finished(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(len(FINISHED)))


urlpatterns = [
    path("", hello),
    path("echo", echo),
    path("stream", stream),
    path("finished", finished),
]
django.setup()
app = get_wsgi_application()
