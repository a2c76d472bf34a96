"""Which URLs may be fetched: http(s) only, and by default never an address inside the machine's networks."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from . import classes as C

ALLOWED_SCHEMES = ("http", "https")


class PrivateAddressError(OSError):
    """A host resolved only to private, loopback, link-local or otherwise non-public addresses."""


def is_public_ip(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def literal_ip(host: str | None) -> str | None:
    """The host when it is an IP literal (aiohttp connects to those without asking the resolver)."""
    if not host:
        return None
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


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
