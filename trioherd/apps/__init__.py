"""The interfaces an app is served through: native (``native``), ASGI 3 (``asgi``, with
``lifespan``), and how an app is found and classified (``loading``)."""
