"""What is spoken on a connection: HTTP/1.1 (``http1`` with h11, ``httptools`` with
llhttp), response framing (``framing``, sans-IO), WebSocket (``websocket``, wsproto),
forwarded headers and the PROXY protocol (both sans-IO), and the raw socket stream the
HTTP hot path runs on (``rawstream``)."""
