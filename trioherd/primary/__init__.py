"""The primary's side: the herd (``herd``), the hand-off of accepted connections
(``handoff``, with its sans-IO rules in ``transit``), worker processes (``process``),
recycling, rolling reloads, the control socket, metrics, events and systemd. Nothing in
a worker process imports this package."""
