"""Forwarded headers: the client address and scheme a proxy in front of the herd reports.

Sans-IO. Only a peer in ``--forwarded-allow-ips`` is believed; from any other peer the
headers are passed to the app untouched and not applied, so a client cannot claim another
address. Of the two families, the de-facto ``X-Forwarded-For`` / ``X-Forwarded-Proto``
(what nginx, HAProxy, AWS ELB and Traefik set) and RFC 7239 ``Forwarded``, only the one
``--forwarded-headers`` names is read; the other is passed to the app untouched and never
applied, even from a trusted peer. A proxy appends to the family it sets and passes a
client's own headers of the other family through, so reading both would let a client
behind a trusted proxy claim any address and scheme.

The client is the right-most address of the chain that is not itself a trusted proxy:
each proxy appends the address it received the request from, so everything to the right
of that address was added by proxies we trust, and everything to its left was written by
the client and cannot be believed. Malformed values are ignored, never an error.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Address = tuple[str, int]
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_KNOWN_MAX = 1024
_SCHEMES = {b"http": "http", b"https": "https", b"ws": "http", b"wss": "https"}

X_FORWARDED = "x-forwarded"
FORWARDED = "forwarded"
FAMILIES = (X_FORWARDED, FORWARDED)
"""The values of ``--forwarded-headers``: which family of headers is read."""


class TrustedPeers:
    """The peers whose forwarded headers are believed: IPs and CIDRs, or ``*`` for all;
    ``family`` is the family of headers read from them (:data:`FAMILIES`)."""

    def __init__(self, spec: str, family: str = X_FORWARDED) -> None:
        if family not in FAMILIES:
            raise ValueError(f"no family of forwarded headers is called {family!r}")
        self.family = family
        self.everyone = False
        self.networks: list[_Network] = []
        # answers by host string: parsing an address costs ~4 us, on every request that
        # comes through a proxy; the same few peers (the proxies) come again and again
        self._known: dict[str, bool] = {}
        for item in (part.strip() for part in spec.split(",")):
            if item == "*":
                self.everyone = True
            elif item:
                self.networks.append(ipaddress.ip_network(item, strict=False))

    def __contains__(self, host: object) -> bool:
        if self.everyone:
            return True
        if not isinstance(host, str) or not self.networks:
            return False
        known = self._known.get(host)
        if known is None:
            known = self._look_up(host)
            if len(self._known) >= _KNOWN_MAX:
                self._known.clear()
            self._known[host] = known
        return known

    def _look_up(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def check_spec(spec: str) -> str | None:
    """What is wrong with a list of IPs and CIDRs (``--forwarded-allow-ips``,
    ``--proxy-protocol-allow-ips``), or None."""
    try:
        TrustedPeers(spec)
    except ValueError as exc:
        return str(exc)
    return None


def apply(
    headers: Sequence[tuple[bytes, bytes]],
    peer: Address | None,
    scheme: str,
    trusted: TrustedPeers,
) -> tuple[Address | None, str]:
    """(client, scheme) for a request from ``peer`` with these (lower-case) headers, read
    from the family ``trusted.family`` names only. A peer on a Unix socket (``None``) can
    only be local, and is trusted."""
    if peer is not None and peer[0] not in trusted:
        return peer, scheme
    if trusted.family == FORWARDED:
        forwarded = [value for name, value in headers if name == b"forwarded"]
        found = _from_forwarded(b",".join(forwarded), trusted) if forwarded else None
        if found is None:
            return peer, scheme
        client, proto = found
        return client or peer, proto or scheme
    xff: list[bytes] = []
    xfp: list[bytes] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            xff.append(value)
        elif name == b"x-forwarded-proto":
            xfp.append(value)
    if xff or xfp:
        return _from_x_forwarded(b",".join(xff), b",".join(xfp), peer, scheme, trusted)
    return peer, scheme


def _from_x_forwarded(
    xff: bytes, xfp: bytes, peer: Address | None, scheme: str, trusted: TrustedPeers
) -> tuple[Address | None, str]:
    hops = [hop.strip() for hop in xff.split(b",")] if xff else []
    chosen = _rightmost_untrusted(hops, trusted)
    client, index = (chosen[1], chosen[0]) if chosen is not None else (peer, -1)
    protos = [p.strip().lower() for p in xfp.split(b",")] if xfp else []
    if len(protos) == 1:
        scheme = _SCHEMES.get(protos[0], scheme)
    elif protos and len(protos) == len(hops) and index >= 0:
        scheme = _SCHEMES.get(protos[index], scheme)
    return client, scheme


def _rightmost_untrusted(hops: list[bytes], trusted: TrustedPeers) -> tuple[int, Address] | None:
    """(index, address) of the client in an X-Forwarded-For chain; None if the chain is
    empty or malformed where it has to be read."""
    for index in range(len(hops) - 1, -1, -1):
        node = _node(hops[index])
        if node is None:
            return None
        if node[0] not in trusted or index == 0:
            return index, node
    return None


def _from_forwarded(
    value: bytes, trusted: TrustedPeers
) -> tuple[Address | None, str | None] | None:
    """(client, proto) from an RFC 7239 Forwarded value, or None if it is malformed."""
    elements = []
    for element in value.split(b","):
        pairs: dict[bytes, bytes] = {}
        for pair in element.split(b";"):
            key, eq, val = pair.strip().partition(b"=")
            if not eq or not key:
                if pair.strip():
                    return None
                continue
            pairs[key.strip().lower()] = val.strip().strip(b'"')
        elements.append(pairs)
    client: Address | None = None
    proto: str | None = None
    for pairs in reversed(elements):
        if b"for" not in pairs:
            continue
        node = _node(pairs[b"for"])
        if node is None:
            if pairs[b"for"].lower() == b"unknown" or pairs[b"for"].startswith(b"_"):
                return client, proto  # a hidden hop: stop at it, keep what we have
            return None
        client = node
        proto = _SCHEMES.get(pairs.get(b"proto", b"").lower())
        if node[0] not in trusted:
            break
    if client is None:
        return None
    return client, proto


def _node(raw: bytes) -> Address | None:
    """An address with an optional port: ``1.2.3.4``, ``1.2.3.4:80``, ``[v6]``,
    ``[v6]:80`` or a bare IPv6 address (X-Forwarded-For); None if it is not one."""
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    port = 0
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        if rest:
            port_text = rest[1:]
            if not port_text.isdigit():
                return None
            port = int(port_text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            return None
        port = int(port_text)
    else:
        host = text
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    if port > 65535:
        return None
    return host, port
