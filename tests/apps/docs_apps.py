"""An app for tests/test_docs.py whose import fails while the file named by
``$DOCS_APP_FAIL`` exists: a worker killed then is respawned into a failed boot, so its
slot waits in back-off, and ``status`` shows it."""

import os

from trioherd import Request, Response

if os.path.exists(os.environ.get("DOCS_APP_FAIL", "")):
    raise RuntimeError(f"{os.environ['DOCS_APP_FAIL']} exists: this boot fails on purpose")


async def app(request: Request) -> Response:
    return Response("ok")
