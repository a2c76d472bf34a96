"""Which URLs may be fetched: http(s) only, and by default never an address inside the machine's networks."""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import unquote

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from . import classes as C

ALLOWED_SCHEMES = ("http", "https")


class PrivateAddressError(OSError):
    """A host resolved only to private, loopback, link-local or otherwise non-public addresses."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries, which a dual-stack host or a gateway may connect to."""
    found = []
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        found.append(ip.ipv4_mapped)
    value = int(ip)
    if value >> 32 == 0 and value > 1:  # ::a.b.c.d (IPv4-compatible, deprecated but still routed by some)
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if ip in _NAT64_WELL_KNOWN or ip in _NAT64_LOCAL:  # 64:ff9b::a.b.c.d, 64:ff9b:1::/48
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if ip.sixtofour is not None:  # 2002:AABB:CCDD::
        found.append(ip.sixtofour)
    if ip.teredo is not None:  # 2001:0::/32: server and (obfuscated) client
        found.extend(ip.teredo)
    return found


_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def is_public_ip(address: str) -> bool:
    """Global unicast, and so is every IPv4 address it embeds (::ffff:, ::, NAT64, 6to4, Teredo)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if ip.ipv4_mapped is not None:
            candidates = embedded  # ::ffff:8.8.8.8 is 8.8.8.8, not a reserved IPv6 address
        else:
            candidates += embedded
    return all(c.is_global and not c.is_multicast for c in candidates)


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """What the C library's inet_aton (and so getaddrinfo) accepts as IPv4: one to four parts, each
    decimal, octal (leading 0) or hex (0x), the last part filling the remaining bytes: 2130706433,
    127.1, 0177.0.0.1, 0x7f.1 all mean 127.0.0.1."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        if re.fullmatch(r"0[xX][0-9a-fA-F]*", part):
            values.append(int(part[2:] or "0", 16))
        elif re.fullmatch(r"0[0-7]*", part):
            values.append(int(part, 8))
        elif re.fullmatch(r"[1-9][0-9]*", part):
            values.append(int(part))
        else:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    value = last
    for i, v in enumerate(head):
        value |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def literal_ip(host: str | None) -> str | None:
    """The address when the host is an IP literal in any spelling a resolver or aiohttp would accept
    (aiohttp connects to some of those without asking the resolver); None for a name."""
    if not host:
        return None
    text = unquote(host).strip("[]").rstrip(".")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        ip = _inet_aton(text)
        return str(ip) if ip is not None else None


def check_url(url: URL, allow_private: bool) -> str | None:
    """Why this URL must not be fetched (a failure class), or None when it may be."""
    if url.scheme not in ALLOWED_SCHEMES or not url.host:
        return C.UNSUPPORTED_SCHEME
    ip = literal_ip(url.host)
    if ip is not None and not allow_private and not is_public_ip(ip):
        return C.PRIVATE_ADDRESS
    return None


class PublicOnlyResolver(AbstractResolver):
    """DNS through aiohttp's resolver, dropping non-public answers: checked at connect time, so a
    redirect or a DNS answer that points inside the network is refused too (no rebinding window)."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        public = [a for a in answers if is_public_ip(a["host"])]
        if not public:
            raise PrivateAddressError(f"{host} resolves only to non-public addresses")
        return public

    async def close(self) -> None:
        await self._inner.close()


def resolver_kwargs(allow_private: bool) -> dict[str, Any]:
    return {} if allow_private else {"resolver": PublicOnlyResolver()}
