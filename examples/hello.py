"""The smallest native trioherd app.

python -m trioherd serve examples.hello:app --workers 2        # from the repository root
python examples/hello.py --bind 127.0.0.1:8000                 # or as a script
curl http://127.0.0.1:8000/?name=herd
"""

from __future__ import annotations

import argparse
from urllib.parse import parse_qs

import trioherd
from trioherd import Request, Response


async def app(request: Request) -> Response:
    if request.method == "POST":
        body = await request.body()
        return Response(body, content_type=request.headers.get("content-type"))
    name = parse_qs(request.query).get("name", ["world"])[0]
    worker = trioherd.current_worker()
    return Response(
        f"Hello, {name}!\n",
        headers={"x-worker": str(worker.id if worker else 0)},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a native trioherd app")
    parser.add_argument("--bind", default="127.0.0.1:8000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="hello-example", help="herd name (control socket)")
    args = parser.parse_args()
    trioherd.run(app, workers=args.workers, bind=[args.bind], name=args.name)
