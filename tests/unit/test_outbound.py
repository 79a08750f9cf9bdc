"""The outbound-URL policy: the decision as a table and as properties, the registration check,
and the connect-time check through aiohttp's resolver hook against a real server on loopback."""

from __future__ import annotations

import ipaddress

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver
from hypothesis import given
from hypothesis import strategies as st

from bridgeway.security.outbound import (
    OutboundPolicy,
    PolicyResolver,
    PolicySession,
    check_url,
    client_session,
    decide,
    describe,
)
from tests.support.sink import Sink

DEFAULT = OutboundPolicy()
ip = ipaddress.ip_address


@pytest.mark.parametrize(
    ("address", "host", "policy", "allowed", "why"),
    [
        ("169.254.169.254", None, DEFAULT, False, "link-local"),
        ("::ffff:169.254.169.254", None, DEFAULT, False, "link-local"),  # IPv4-mapped
        ("fe80::1", None, DEFAULT, False, "link-local"),
        ("0.0.0.0", None, DEFAULT, False, "unspecified"),
        ("::", None, DEFAULT, False, "unspecified"),
        ("100.100.100.200", None, DEFAULT, False, "metadata"),
        ("fd00:ec2::254", None, DEFAULT, False, "metadata"),
        ("224.0.0.1", None, DEFAULT, False, "multicast"),
        ("127.0.0.1", None, DEFAULT, True, ""),  # loopback and private stay allowed by default
        ("10.1.2.3", None, DEFAULT, True, ""),
        ("192.168.0.10", "hooks.internal", DEFAULT, True, ""),
        ("93.184.216.34", None, DEFAULT, True, ""),
        # explicit: an allow CIDR inside the special range; a broad one is not enough
        ("169.254.169.254", None, OutboundPolicy.of(allow=["169.254.169.254/32"]), True, ""),
        ("169.254.169.254", None, OutboundPolicy.of(allow=["0.0.0.0/0"]), False, "link-local"),
        (
            "169.254.169.254",
            "metadata.internal",
            OutboundPolicy.of(allow=["metadata.internal"]),
            False,
            "link",
        ),
        # the deny list wins, by address or by name
        ("127.0.0.1", None, OutboundPolicy.of(deny=["127.0.0.0/8"]), False, "outbound.deny"),
        ("10.0.0.5", None, OutboundPolicy.of(allow=["10.0.0.0/8"], deny=["10.0.0.5"]), False, "deny"),
        ("10.0.0.5", "evil.example.com", OutboundPolicy.of(deny=["*.example.com"]), False, "deny"),
        # an allow list admits only what it names
        ("10.0.0.5", None, OutboundPolicy.of(allow=["10.0.0.0/8"]), True, ""),
        ("192.168.1.1", None, OutboundPolicy.of(allow=["10.0.0.0/8"]), False, "not in outbound.allow"),
        ("192.168.1.1", "a.hooks.example", OutboundPolicy.of(allow=["*.hooks.example"]), True, ""),
        ("192.168.1.1", "hooks.example", OutboundPolicy.of(allow=["*.hooks.example"]), False, "allow"),
        # an IPv6 address carrying an IPv4 one is refused as either
        ("::169.254.169.254", None, DEFAULT, False, "::a9fe:a9fe (169.254.169.254) is link-local"),
        ("64:ff9b::169.254.169.254", None, DEFAULT, False, "(169.254.169.254) is link-local"),
        ("2002:a9fe:a9fe::1", None, DEFAULT, False, "(169.254.169.254) is link-local"),
        ("64:ff9b::7f00:1", None, OutboundPolicy.of(deny=["127.0.0.0/8"]), False, "outbound.deny"),
        ("2002:a9fe:a9fe::1", None, OutboundPolicy.of(deny=["2002::/16"]), False, "outbound.deny"),
        ("2001:db8::1", None, OutboundPolicy.of(deny=["127.0.0.0/8"]), True, ""),
        # loopback is one range in both families: denying 127.0.0.0/8 denies ::1
        ("::1", None, DEFAULT, True, ""),
        ("::1", None, OutboundPolicy.of(deny=["127.0.0.0/8"]), False, "::1 (127.0.0.1) is in outbound.deny"),
        ("::1", None, OutboundPolicy.of(deny=["::1/128"]), False, "::1 is in outbound.deny"),
        # ... but the carried address never widens an allow list
        ("64:ff9b::a00:5", None, OutboundPolicy.of(allow=["10.0.0.0/8"]), False, "not in outbound.allow"),
        ("64:ff9b::a00:5", None, OutboundPolicy.of(allow=["64:ff9b::/96"]), True, ""),
    ],
)
def test_decide(address, host, policy, allowed, why):
    verdict = decide(ip(address), host, policy)
    assert verdict.allowed is allowed
    assert why in verdict.reason


link_local = st.integers(0, 2**16 - 1).map(lambda n: ipaddress.IPv4Address(0xA9FE0000 + n))
ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
cidrs = st.sampled_from(["0.0.0.0/0", "10.0.0.0/8", "169.0.0.0/8", "::/0", "hooks.example"])


@given(link_local, st.lists(cidrs, max_size=3))
def test_link_local_is_refused_whatever_broad_allow_list(address, allow):
    assert not decide(address, "hooks.example", OutboundPolicy.of(allow=allow)).allowed
    v4 = int(address)
    for carrier in (  # IPv4-mapped, IPv4-compatible, NAT64, 6to4
        ipaddress.IPv6Address(0xFFFF_0000_0000 | v4),
        ipaddress.IPv6Address(v4),
        ipaddress.IPv6Address(0x64_FF9B << 96 | v4),
        ipaddress.IPv6Address(0x2002 << 112 | v4 << 80 | 1),
    ):
        assert not decide(carrier, None, OutboundPolicy.of(allow=allow)).allowed, carrier


@given(ipv4)
def test_deny_everything_wins_over_allow_everything(address):
    assert not decide(address, None, OutboundPolicy.of(allow=["0.0.0.0/0"], deny=["0.0.0.0/0"])).allowed


@given(ipv4)
def test_by_default_only_the_special_ranges_are_refused(address):
    special = address in ipaddress.ip_network("169.254.0.0/16") or address in ipaddress.ip_network(
        "0.0.0.0/8"
    )
    special |= address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255")
    special |= address == ipaddress.IPv4Address("100.100.100.200")
    assert decide(address, None, DEFAULT).allowed is not special


@pytest.mark.parametrize(
    ("url", "policy", "allowed", "why"),
    [
        ("http://169.254.169.254/latest/meta-data", DEFAULT, False, "link-local"),
        ("http://[::ffff:a9fe:a9fe]/", DEFAULT, False, "link-local"),
        ("http://2852039166/", DEFAULT, False, "not a canonical IP"),  # 169.254.169.254 as a number
        ("http://0xa9.0xfe.0xa9.0xfe/", DEFAULT, False, "not a canonical IP"),
        ("ftp://example.com/x", DEFAULT, False, "http(s)"),
        ("file:///etc/passwd", DEFAULT, False, "http(s)"),
        ("http://example.com:99999/", DEFAULT, False, "not a valid URL"),
        ("http://127.0.0.1:8080/hook", DEFAULT, True, ""),
        ("https://hooks.example.com/x", DEFAULT, True, ""),
        ("https://hooks.example.com/x", OutboundPolicy.of(deny=["hooks.example.com"]), False, "deny"),
        ("https://other.example/x", OutboundPolicy.of(allow=["hooks.example.com"]), False, "allow"),
        # a name with an allow list of CIDRs: its addresses decide, at connect time
        ("https://other.example/x", OutboundPolicy.of(allow=["10.0.0.0/8"]), True, ""),
        # decided on the host as aiohttp connects to it: Unicode digits and dots are an IP literal
        ("http://１６９.２５４.１６９.２５４/", DEFAULT, False, "169.254.169.254 is link-local"),
        ("http://①⑥⑨.②⑤④.①⑥⑨.②⑤④/", DEFAULT, False, "169.254.169.254 is link-local"),
        ("http://169。254。169。254/", DEFAULT, False, "169.254.169.254 is link-local"),
        ("http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/", OutboundPolicy.of(deny=["localhost"]), False, "localhost is in outbound.deny"),
        ("https://bücher.example/", OutboundPolicy.of(deny=["xn--bcher-kva.example"]), False, "deny"),
        ("https://bücher.example/", DEFAULT, True, ""),
        ("http://169%2e254%2e169%2e254/", DEFAULT, False, "neither an IP address nor a host name"),
        ("http://[64:ff9b::a9fe:a9fe]/", DEFAULT, False, "(169.254.169.254) is link-local"),
        ("http://[::1]:8080/", OutboundPolicy.of(deny=["127.0.0.0/8"]), False, "outbound.deny"),
        ("http://127.0.0.1\\@a.example/", OutboundPolicy.of(deny=["127.0.0.0/8"]), False, "not a valid URL"),
    ],
)
def test_check_url(url, policy, allowed, why):
    verdict = check_url(url, policy)
    assert verdict.allowed is allowed and why in verdict.reason


def test_bad_list_entries_are_named():
    with pytest.raises(ValueError, match='outbound.allow: "not a host!"'):
        OutboundPolicy.of(allow=["not a host!"])


async def test_check_url_decides_on_the_address_aiohttp_connects_to():
    """A host in Unicode digits and dots is posted by aiohttp to the IP literal it stands for,
    past any resolver: the refusal names that address."""
    sink = Sink()
    port = sink.url.rpartition(":")[2]
    deny_loopback = OutboundPolicy.of(deny=["127.0.0.0/8"])
    try:
        async with client_session(PolicyResolver(lambda: deny_loopback), 5) as s:
            for host in ("１２７.０.０.１", "127。0。0。1"):
                url = f"http://{host}:{port}/{len(sink.requests)}"
                assert check_url(url, deny_loopback).reason == "127.0.0.1 is in outbound.deny (127.0.0.0/8)"
                async with s.post(url, data=b"{}") as resp:  # unchecked, it lands on 127.0.0.1
                    assert resp.status == 200
        assert [r.path for r in sink.requests] == ["/0", "/1"]
    finally:
        sink.close()


class FixedResolver(AbstractResolver):
    """Answers every name with one address: a DNS record that points where the test says."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host, port=0, family=0):
        return [{"hostname": host, "host": self.address, "port": port, "family": 2, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


async def test_a_name_resolving_to_a_refused_address_is_refused_at_connect_time():
    sink = Sink()
    port = sink.url.rpartition(":")[2]
    try:
        # the name resolves to the sink on loopback: allowed, and the post arrives
        async with (
            client_session(PolicyResolver(lambda: DEFAULT, FixedResolver("127.0.0.1")), 5) as s,
            s.post(f"http://hooks.example:{port}/ok", data=b"{}") as resp,
        ):
            assert resp.status == 200
        # rebound to metadata: refused before any connection is made
        async with client_session(PolicyResolver(lambda: DEFAULT, FixedResolver("169.254.169.254")), 5) as s:
            with pytest.raises(aiohttp.ClientError) as refused:
                await s.post(f"http://hooks.example:{port}/metadata", data=b"{}")
        assert "169.254.169.254 is link-local" in describe(refused.value)
        # the same address, refused by the deny list read at resolution time
        deny_loopback = OutboundPolicy.of(deny=["127.0.0.0/8"])
        async with client_session(PolicyResolver(lambda: deny_loopback, FixedResolver("127.0.0.1")), 5) as s:
            with pytest.raises(aiohttp.ClientError) as refused:
                await s.post(f"http://hooks.example:{port}/denied", data=b"{}")
        assert "outbound.deny" in describe(refused.value)
        assert [r.path for r in sink.requests] == ["/ok"]
    finally:
        sink.close()


async def test_a_changed_policy_closes_the_connections_kept_open():
    """A pooled keep-alive connection is reused without resolving again: after the policy
    changes, the next post to the same name opens (and vets) a new one."""
    sink = Sink()
    url = f"http://localhost:{sink.url.rpartition(':')[2]}/hook"
    policy = DEFAULT
    http = PolicySession(lambda: policy, 5)
    try:
        first = await http.get()
        async with first.post(url, data=b"{}") as resp:
            assert resp.status == 200
        assert await http.get() is first  # same policy: the connection stays in the pool
        policy = OutboundPolicy.of(deny=["127.0.0.0/8"])
        with pytest.raises(aiohttp.ClientError) as refused:
            await (await http.get()).post(url, data=b"{}")
        assert "127.0.0.1 is in outbound.deny" in describe(refused.value)
        assert first.closed and len(sink.requests) == 1
    finally:
        await http.close()
        sink.close()
