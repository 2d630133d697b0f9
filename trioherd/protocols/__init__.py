"""What is spoken on a connection, each protocol as a core without I/O and a Trio driver
around it: HTTP/1.1 (``h1core`` without I/O, ``http1`` the Trio connection, ``httptools``
for llhttp), response framing (``framing``, sans-IO), WebSocket (``ws_session`` and
``ws_incoming`` without I/O, ``ws_inflate`` the bounded permessage-deflate, ``ws_driver``
and ``websocket`` the Trio side, ``ws_handshake``), forwarded headers and the PROXY
protocol (both sans-IO), what the connections of a worker share (``shared`` without I/O,
``state`` with the sweeper), how they end (``closing``), and the raw socket and TLS
streams the hot path runs on (``rawstream``, ``tlsstream``)."""
