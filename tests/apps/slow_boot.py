"""An app whose import takes seconds, like one that warms a cache at start."""

import time

time.sleep(3)


async def app(request: object) -> None:
    raise AssertionError("never served in the tests")
