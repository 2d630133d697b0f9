"""Forwarded headers, synchronously: who is trusted, which family of headers is read,
which address is the client."""

from __future__ import annotations

import pytest

from trioherd.protocols.forwarded import TrustedPeers, apply, check_spec

PROXY = ("127.0.0.1", 40000)
STRANGER = ("203.0.113.9", 40000)
LOCAL = TrustedPeers("127.0.0.1,::1")  # --forwarded-headers x-forwarded, the default
LOCAL_RFC = TrustedPeers("127.0.0.1,::1", "forwarded")


def _h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def test_trusted_peers_take_ips_cidrs_and_star() -> None:
    peers = TrustedPeers("10.0.0.0/8, 192.168.1.7,::1")
    assert "10.2.3.4" in peers and "192.168.1.7" in peers and "::1" in peers
    assert "192.168.1.8" not in peers and "::2" not in peers and "junk" not in peers
    assert "::ffff:10.0.0.1" in peers  # an IPv4 peer on a dual-stack socket
    assert "198.51.100.1" in TrustedPeers("*")
    assert "127.0.0.1" not in TrustedPeers("")
    assert check_spec("10.0.0.0/8,*") is None
    assert check_spec("10.0.0.300") is not None
    assert LOCAL.family == "x-forwarded" and LOCAL_RFC.family == "forwarded"
    with pytest.raises(ValueError, match="'x-real-ip'"):
        TrustedPeers("127.0.0.1", "x-real-ip")


def test_x_forwarded_from_a_trusted_peer_sets_client_and_scheme() -> None:
    headers = _h(("x-forwarded-for", "198.51.100.7"), ("x-forwarded-proto", "https"))
    assert apply(headers, PROXY, "http", LOCAL) == (("198.51.100.7", 0), "https")


def test_x_forwarded_from_an_untrusted_peer_is_not_applied() -> None:
    headers = _h(("x-forwarded-for", "198.51.100.7"), ("x-forwarded-proto", "https"))
    assert apply(headers, STRANGER, "http", LOCAL) == (STRANGER, "http")


def test_the_client_is_the_rightmost_address_that_is_not_a_trusted_proxy() -> None:
    trusted = TrustedPeers("127.0.0.1,10.0.0.0/8")
    # the client wrote a fake first hop; 10.0.0.2 is our own second proxy
    headers = _h(("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.2"))
    assert apply(headers, PROXY, "http", trusted) == (("198.51.100.7", 0), "http")
    # all trusted: the left-most
    headers = _h(("x-forwarded-for", "10.0.0.3, 10.0.0.2"))
    assert apply(headers, PROXY, "http", trusted) == (("10.0.0.3", 0), "http")
    # several headers are one list
    headers = _h(("x-forwarded-for", "198.51.100.7"), ("x-forwarded-for", "10.0.0.2"))
    assert apply(headers, PROXY, "http", trusted)[0] == ("198.51.100.7", 0)


def test_a_proto_list_follows_the_chosen_hop() -> None:
    trusted = TrustedPeers("127.0.0.1,10.0.0.0/8")
    headers = _h(
        ("x-forwarded-for", "198.51.100.7, 10.0.0.2"), ("x-forwarded-proto", "https, http")
    )
    assert apply(headers, PROXY, "http", trusted) == (("198.51.100.7", 0), "https")


def test_rfc_7239_forwarded_with_ipv6_and_port() -> None:
    headers = _h(("forwarded", 'for="[2001:db8:cafe::17]:4711";proto=https;by=203.0.113.43'))
    assert apply(headers, PROXY, "http", LOCAL_RFC) == (("2001:db8:cafe::17", 4711), "https")
    headers = _h(("forwarded", "for=192.0.2.60;proto=http, for=127.0.0.1;proto=https"))
    assert apply(headers, PROXY, "https", LOCAL_RFC) == (("192.0.2.60", 0), "http")


def test_only_the_chosen_family_is_read() -> None:
    both = _h(
        ("x-forwarded-for", "198.51.100.7"),
        ("x-forwarded-proto", "http"),
        ("forwarded", "for=192.0.2.60;proto=https"),
    )
    assert apply(both, PROXY, "http", LOCAL) == (("198.51.100.7", 0), "http")
    assert apply(both, PROXY, "http", LOCAL_RFC) == (("192.0.2.60", 0), "https")
    # the other family alone is not applied either
    rfc_only = _h(("forwarded", "for=192.0.2.60;proto=https"))
    assert apply(rfc_only, PROXY, "http", LOCAL) == (PROXY, "http")
    x_only = _h(("x-forwarded-for", "198.51.100.7"), ("x-forwarded-proto", "https"))
    assert apply(x_only, PROXY, "http", LOCAL_RFC) == (PROXY, "http")


def test_a_client_behind_a_trusted_proxy_cannot_spoof_with_the_other_family() -> None:
    # nginx (proxy_add_x_forwarded_for) and HAProxy (option forwardfor) append the client to
    # X-Forwarded-For and pass the client's own Forwarded header through
    through_nginx = _h(
        ("forwarded", "for=6.6.6.6;proto=https"),
        ("x-forwarded-for", "198.51.100.7"),
        ("x-forwarded-proto", "http"),
    )
    assert apply(through_nginx, PROXY, "http", LOCAL) == (("198.51.100.7", 0), "http")
    # a proxy that sets Forwarded (HAProxy's option forwarded) passes X-Forwarded-* through
    through_rfc_proxy = _h(
        ("x-forwarded-for", "7.7.7.7"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=198.51.100.7;proto=http"),
    )
    assert apply(through_rfc_proxy, PROXY, "http", LOCAL_RFC) == (("198.51.100.7", 0), "http")
    # and from a peer that is not trusted, neither family is applied
    for trusted in (LOCAL, LOCAL_RFC):
        assert apply(through_nginx, STRANGER, "http", trusted) == (STRANGER, "http")
        assert apply(through_rfc_proxy, STRANGER, "http", trusted) == (STRANGER, "http")


@pytest.mark.parametrize(
    "headers",
    [
        _h(("x-forwarded-for", "not an address")),
        _h(("x-forwarded-for", "198.51.100.7:99999")),
        _h(("x-forwarded-for", "[::1")),
        _h(("x-forwarded-for", "")),
        _h(("x-forwarded-proto", "gopher")),
        _h(("forwarded", "for")),
        _h(("forwarded", 'for="[::1]x"')),
        _h(("forwarded", "proto=https")),
        _h(("x-forwarded-for", "\xff\xfe")),
    ],
)
def test_malformed_values_are_ignored(headers: list[tuple[bytes, bytes]]) -> None:
    assert apply(headers, PROXY, "http", LOCAL) == (PROXY, "http")
    assert apply(headers, PROXY, "http", LOCAL_RFC) == (PROXY, "http")


def test_a_hidden_hop_keeps_the_address_before_it() -> None:
    headers = _h(("forwarded", "for=_hidden, for=192.0.2.60"))
    trusted = TrustedPeers("127.0.0.1,192.0.2.60", "forwarded")
    assert apply(headers, PROXY, "http", trusted)[0] == ("192.0.2.60", 0)


def test_a_peer_on_a_unix_socket_is_local_and_trusted() -> None:
    headers = _h(("x-forwarded-for", "198.51.100.7"), ("x-forwarded-proto", "https"))
    assert apply(headers, None, "http", LOCAL) == (("198.51.100.7", 0), "https")
    assert apply([], None, "http", LOCAL) == (None, "http")
    rfc = _h(("forwarded", "for=198.51.100.7;proto=https"))
    assert apply(rfc, None, "http", LOCAL_RFC) == (("198.51.100.7", 0), "https")
