"""Where the gateway may post on a caller's behalf: webhooks and job callbacks (the `outbound:`
section). Anyone allowed to register a webhook or enqueue a job with a callback_url names an
address the gateway then connects to, so without a policy they could reach cloud metadata
(169.254.169.254) or the gateway's own admin port (server-side request forgery).

The decision is a pure function of an address (and the host name it came from): `decide`. It is
applied twice: when a URL is registered (`check_url`: the scheme, an IP literal, the host name
against the lists; a clear refusal naming why), and when a connection is made, on every address
the name resolves to (`PolicyResolver`, aiohttp's resolver hook), so a name that resolves to an
allowed address at registration and to a refused one later (DNS rebinding) is refused then.

Rules, in order:
1. `deny` (CIDRs or host names) refuses, whatever else says.
2. Unspecified, link-local, cloud metadata, multicast and broadcast addresses are refused unless
   an `allow` CIDR inside that range names them (e.g. `169.254.169.254/32`): a broad
   `0.0.0.0/0` or a host name is not explicit enough.
3. With an `allow` list, only what it names is allowed: an address in one of its CIDRs, or a host
   name it lists (exactly, or `*.example.com` for the names under example.com).
4. Everything else is allowed: loopback and private ranges too, where platform services live.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Refused unless explicitly allowed (rule 2): (range, why).
SPECIAL: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "an unspecified address"),
        ("::/128", "an unspecified address"),
        ("169.254.0.0/16", "link-local (cloud metadata lives at 169.254.169.254)"),
        ("fe80::/10", "link-local"),
        ("100.100.100.200/32", "a cloud metadata address"),
        ("fd00:ec2::254/128", "a cloud metadata address"),
        ("224.0.0.0/4", "multicast, not a host"),
        ("ff00::/8", "multicast, not a host"),
        ("255.255.255.255/32", "broadcast, not a host"),
    )
)
_NAME = r"([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^{_NAME}\.?$")  # a URL's host, in its ASCII (IDNA) form
_HOST_PATTERN = re.compile(rf"^(\*\.)?{_NAME}$")  # a list entry
# Hosts that are numbers but not canonical dotted quads (2130706433, 0x7f.1, 127.1): the system
# resolver maps them onto addresses, so they are no names to match against the lists.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+))*\.?$")


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str  # why not, when refused; empty when allowed


ALLOWED = Verdict(True, "")


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    allow_nets: tuple[Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    deny_nets: tuple[Network, ...] = ()
    deny_hosts: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, allow: list[str] | tuple[str, ...] = (), deny: list[str] | tuple[str, ...] = ()
    ) -> OutboundPolicy:
        """From the config's lists; ValueError naming an entry that is neither a CIDR nor a host name."""
        return _compiled(tuple(allow), tuple(deny))

    @property
    def has_allow_list(self) -> bool:
        return bool(self.allow_nets or self.allow_hosts)


@lru_cache(maxsize=8)
def _compiled(allow: tuple[str, ...], deny: tuple[str, ...]) -> OutboundPolicy:
    allow_nets, allow_hosts = _split(allow, "allow")
    deny_nets, deny_hosts = _split(deny, "deny")
    return OutboundPolicy(allow_nets, allow_hosts, deny_nets, deny_hosts)


def _split(entries: tuple[str, ...], where: str) -> tuple[tuple[Network, ...], tuple[str, ...]]:
    nets: list[Network] = []
    hosts: list[str] = []
    for entry in entries:
        text = entry.strip().lower().rstrip(".")
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if not _HOST_PATTERN.match(text) or _NUMERIC_HOST.match(text):
            raise ValueError(f'outbound.{where}: "{entry}" is neither a CIDR (10.0.0.0/8) nor a host name')
        hosts.append(text)
    return tuple(nets), tuple(hosts)


def _host_matches(host: str, patterns: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
_LOOPBACK6 = ipaddress.ip_network("::1/128")


def _forms(address: Address) -> tuple[Address, ...]:
    """The address, and the IPv4 address an IPv6 one carries: NAT64 (64:ff9b::a.b.c.d), 6to4
    (2002:aabb:ccdd::/48), IPv4-compatible (::a.b.c.d), and ::1 as 127.0.0.1 (loopback is one
    thing in both families). An IPv4-mapped address (::ffff:a.b.c.d) is its IPv4 address only:
    the connection is IPv4."""
    if isinstance(address, ipaddress.IPv4Address):
        return (address,)
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address in _LOOPBACK6:
        carried = ipaddress.IPv4Address("127.0.0.1")
    elif address.sixtofour is not None:
        carried = address.sixtofour
    elif address in _NAT64 or address in _V4_COMPATIBLE:
        carried = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    else:
        return (address,)
    return (address, carried)


def _in(address: Address, net: Network) -> bool:
    return address.version == net.version and address in net


def _named(form: Address, address: Address) -> str:
    return str(form) if form == address else f"{address} ({form})"


def decide(address: Address, host: str | None, policy: OutboundPolicy) -> Verdict:
    """May the gateway connect to `address` (reached through the name `host`, if any)?

    An IPv6 address carrying an IPv4 one is refused when either is (deny list, special ranges);
    the allow list admits it by the address itself, so an embedded form never widens it."""
    forms = _forms(address)
    address = forms[0]
    for form in forms:
        for net in policy.deny_nets:
            if _in(form, net):
                return Verdict(False, f"{_named(form, address)} is in outbound.deny ({net})")
    if host is not None and _host_matches(host, policy.deny_hosts):
        return Verdict(False, f"{host} is in outbound.deny")
    for form in forms:
        for special, why in SPECIAL:
            if _in(form, special) and not any(
                _in(form, net) and net.subnet_of(special) for net in policy.allow_nets
            ):
                return Verdict(
                    False, f"{_named(form, address)} is {why}; allow it explicitly in outbound.allow"
                )
    if not policy.has_allow_list:
        return ALLOWED
    if any(_in(address, net) for net in policy.allow_nets):
        return ALLOWED
    if host is not None and _host_matches(host, policy.allow_hosts):
        return ALLOWED
    return Verdict(False, f"{host or address} is not in outbound.allow")


def check_url(url: str, policy: OutboundPolicy) -> Verdict:
    """What can be decided when a URL is registered: the scheme, an IP literal host, a host name
    against the lists. A name's addresses are decided at connect time.

    The URL is parsed as aiohttp parses it (yarl) and the host decided on is the one it connects
    to: yarl maps a host's Unicode form to ASCII (IDNA), so `１２７.０.０.１` or `127。0。0。1`
    is 127.0.0.1 and `ⓛⓞⓒⓐⓛⓗⓞⓢⓣ` is localhost, and an IP literal never reaches the resolver."""
    try:
        parts = URL(url)
    except (ValueError, TypeError):
        return Verdict(False, "not a valid URL")
    host = parts.raw_host
    if parts.scheme not in ("http", "https") or not host:
        return Verdict(False, "expected an http(s) URL with a host")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return decide(address, None, policy)
    if _NUMERIC_HOST.match(host):
        return Verdict(False, f"{host} is not a canonical IP address")
    if not _HOST_NAME.match(host):
        return Verdict(False, "the host is neither an IP address nor a host name")
    if _host_matches(host, policy.deny_hosts):
        return Verdict(False, f"{host} is in outbound.deny")
    if policy.has_allow_list and not policy.allow_nets and not _host_matches(host, policy.allow_hosts):
        return Verdict(False, f"{host} is not in outbound.allow")
    return ALLOWED


class OutboundRefused(OSError):
    """A connection the policy refuses; an OSError, so aiohttp reports it as a connect failure."""


class PolicyResolver(AbstractResolver):
    """aiohttp's resolver hook: the addresses a name resolves to, less those the policy refuses;
    none left is a refusal. (aiohttp skips the resolver for IP literals: `check_url` covers them,
    right before each post.)"""

    def __init__(self, policy: Callable[[], OutboundPolicy], inner: AbstractResolver | None = None) -> None:
        self.policy = policy  # read on each resolution: a reload applies at once
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        policy, kept, refusal = self.policy(), [], None
        for result in found:
            verdict = decide(ipaddress.ip_address(result["host"].split("%")[0]), host, policy)
            if verdict.allowed:
                kept.append(result)
            else:
                refusal = refusal or verdict.reason
        if not kept:
            raise OutboundRefused(f"{host} resolves to a refused address: {refusal or 'no address'}")
        return kept

    async def close(self) -> None:
        await self.inner.close()


def describe(exc: BaseException) -> str:
    """A failed post in a few words for logs and records: the policy's reason when it refused
    the connection (aiohttp wraps it), else the exception's kind (never its URL)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OutboundRefused):
            return f"refused by the outbound policy: {cause}"
        cause = getattr(cause, "os_error", None) or cause.__cause__
    return type(exc).__name__


def client_session(resolver: PolicyResolver, timeout: float | None = None) -> aiohttp.ClientSession:
    """An aiohttp session whose connections the policy vets: names resolved through `resolver`
    on every new connection (no DNS cache that would outlive a reload)."""
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))


class PolicySession:
    """The aiohttp session for the policy `policy()` returns, made anew when that changes: a
    pooled keep-alive connection is reused without resolving its host again, so one opened under
    the old policy would go on posting where the new one refuses."""

    def __init__(self, policy: Callable[[], OutboundPolicy], timeout: float | None = None) -> None:
        self.policy, self.timeout = policy, timeout
        self._session: aiohttp.ClientSession | None = None
        self._made_for: OutboundPolicy | None = None

    async def get(self) -> aiohttp.ClientSession:
        policy = self.policy()
        if self._session is None or policy != self._made_for:
            # swapped before the await, so concurrent posts all take the new session
            old = self._session
            self._session = client_session(PolicyResolver(self.policy), self.timeout)
            self._made_for = policy
            if old is not None:
                await old.close()  # a post in flight on it fails, and is retried under the new policy
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
