"""The SSRF guard: a subscription may only reach public addresses, or ones an operator allowed.

The host is resolved here and the caller connects to the very address that was checked, so a DNS
answer that changes between check and connect (rebinding) cannot smuggle a private target in.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(Exception):
    """The target is not allowed (or not resolvable); the message says why."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as written in the URL (SNI, certificate check, Host header)
    port: int
    path: str  # path + query
    ip: str  # the checked address to connect to

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def check_url(url: object) -> str:
    """Static checks at subscription time (no DNS): an absolute http(s) URL without credentials."""
    if not isinstance(url, str) or len(url) > 2048:
        raise ValueError("url must be a string of at most 2048 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("url must not carry credentials")
    if parts.fragment:
        raise ValueError("url must not have a fragment")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("url has an invalid port") from None
    return url


def why_forbidden(ip: IPAddress) -> str | None:
    """The reason an address is not public, or None when it is."""
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    for label, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return label
    if not ip.is_global:
        return "non-global"
    return None


def allowed(ip: IPAddress, allow: Iterable[Network]) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return any(ip in net or (mapped is not None and mapped in net) for net in allow)


def resolve(url: str, allow: Iterable[Network], resolver=socket.getaddrinfo) -> Target:  # type: ignore[no-untyped-def]
    """Resolve the URL's host and return a target pinned to a checked address, or raise Refused.

    Every address the name resolves to must pass; one forbidden answer refuses the lot.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("not an http(s) URL")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise Refused(f"cannot resolve {host}: {exc}") from None
    allow = tuple(allow)
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        reason = why_forbidden(ip)
        if reason and not allowed(ip, allow):
            raise Refused(f"{host} resolves to {ip}, a {reason} address (not in SHIPLINE_OUTBOUND_ALLOW)")
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise Refused(f"{host} has no address")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme=parts.scheme, host=host, port=port, path=path, ip=str(addresses[0]))
