"""The asyncio runtime: a worker whose event loop is asyncio's (or uvloop's), for ASGI apps
that need one (``--asyncio``). It drives the same protocol code as the Trio worker
(``protocols.h1driver``) over asyncio transports, and speaks to the primary the same way."""
