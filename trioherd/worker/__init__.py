"""A worker process: its boot, its channels to the primary and the Trio runtime that
drives connections (``main``), and the bridge for asyncio apps (``aio``)."""
