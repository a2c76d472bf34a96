"""Download one URL with aiohttp: bounded redirects, deadlines, byte cap, opt-outs, classified failures.

One `Downloader` owns one pooled session (connection reuse, DNS cache, limits in total and per host).
`fetch` never raises for a network problem: it returns a `Download` whose status is a failure class.
"""

from __future__ import annotations

import asyncio
import errno
import random
from dataclasses import dataclass

import aiohttp
from yarl import URL

from . import classes as C
from .safety import PrivateAddressError, check_url, resolver_kwargs

REDIRECTS = (301, 302, 303, 307, 308)
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
USER_AGENT_TOKEN = "ovis-data"
# Bodies that are certainly not images: refuse before reading them.
_NOT_IMAGE_TYPES = (
    "text/",
    "application/json",
    "application/xhtml",
    "application/xml",
    "application/javascript",
)


@dataclass(frozen=True)
class NetParams:
    connect_timeout: float = 10.0
    read_timeout: float = 20.0  # longest silence between two reads: a stalled server ends here
    total_timeout: float = 60.0  # one request, all hops' bytes included
    retries: int = 2  # extra attempts for transient failures (timeouts, resets, 429, 5xx, truncated)
    backoff_s: float = 0.5  # first retry delay; doubles each time, with jitter
    backoff_max_s: float = 10.0
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    concurrency: int = 256  # connections in total
    per_host: int = 16  # connections per host
    allow_private: bool = False
    honor_opt_out: bool = True
    user_agent: str = f"{USER_AGENT_TOKEN}/0.1 (Ovis data engine; image fetcher)"


@dataclass
class Download:
    status: str
    detail: str = ""
    data: bytes | None = None
    final_url: str = ""
    attempts: int = 0
    http_status: int = 0


def opted_out(values: list[str]) -> bool:
    """X-Robots-Tag opt-out, as img2dataset reads it: `noai, noimageai` or `<ua>: noai` for our agent."""
    for value in values:
        head, sep, rest = value.partition(":")
        agent = head.strip().lower() if sep and "," not in head else None
        directives = rest if agent is not None else value
        if agent not in (None, USER_AGENT_TOKEN):
            continue
        if any(d.strip().lower() in OPT_OUT_DIRECTIVES for d in directives.split(",")):
            return True
    return False


def classify_status(status: int) -> str:
    if status == 404:
        return C.HTTP_404
    if status == 429:
        return C.HTTP_429
    if 500 <= status <= 599:
        return C.HTTP_5XX
    if 400 <= status <= 499:
        return C.HTTP_4XX
    return C.HTTP_OTHER


def classify_exception(e: BaseException) -> str:
    """Map an aiohttp / OS exception to a stable failure class (order matters: subclasses first)."""
    if isinstance(e, aiohttp.ClientConnectorError) and isinstance(e.os_error, PrivateAddressError):
        return C.PRIVATE_ADDRESS
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return C.DNS_ERROR
    if isinstance(e, aiohttp.ClientSSLError | aiohttp.ClientConnectorCertificateError):
        return C.SSL_ERROR
    if isinstance(e, aiohttp.ClientConnectorError):
        return C.CONNECTION_REFUSED if e.os_error.errno == errno.ECONNREFUSED else C.CONNECTION_ERROR
    if isinstance(e, asyncio.TimeoutError | TimeoutError):
        return C.TIMEOUT
    if isinstance(e, aiohttp.ClientPayloadError):
        return C.TRUNCATED
    if isinstance(e, aiohttp.ServerDisconnectedError | ConnectionResetError | BrokenPipeError):
        return C.CONNECTION_RESET
    if isinstance(e, aiohttp.InvalidURL | ValueError):
        return C.INVALID_URL
    return C.CONNECTION_ERROR


class Downloader:
    """A pooled aiohttp session; use as `async with Downloader(params) as dl: await dl.fetch(url)`."""

    def __init__(self, params: NetParams) -> None:
        self.params = params
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Downloader:
        p = self.params
        connector = aiohttp.TCPConnector(
            limit=p.concurrency,
            limit_per_host=p.per_host,
            ttl_dns_cache=300,
            use_dns_cache=True,
            **resolver_kwargs(p.allow_private),
        )
        timeout = aiohttp.ClientTimeout(
            total=p.total_timeout,
            connect=p.connect_timeout,
            sock_connect=p.connect_timeout,
            sock_read=p.read_timeout,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": p.user_agent},
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # images need no cookies; skipping the jar saves CPU
            read_bufsize=1 << 18,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> Download:
        """Download with retries (exponential backoff with jitter) for transient failures only."""
        p = self.params
        attempt = 0
        while True:
            attempt += 1
            result = await self._once(url)
            result.attempts = attempt
            if result.status == C.SUCCESS or result.status not in C.RETRY_NOW or attempt > p.retries:
                return result
            delay = min(p.backoff_max_s, p.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            await asyncio.sleep(delay)

    async def _once(self, url: str) -> Download:
        p = self.params
        try:
            current = URL(url)
        except (ValueError, TypeError) as e:
            return Download(C.INVALID_URL, str(e)[:200])
        seen = {str(current)}
        try:
            for _ in range(p.max_redirects + 1):
                refused = check_url(current, p.allow_private)
                if refused:
                    return Download(refused, str(current)[:200], final_url=str(current))
                assert self._session is not None
                async with self._session.get(current, allow_redirects=False) as resp:
                    if resp.status in REDIRECTS:
                        location = resp.headers.get("Location")
                        if not location:
                            return Download(
                                C.HTTP_OTHER, "redirect without Location", http_status=resp.status
                            )
                        current = current.join(URL(location))
                        if str(current) in seen:
                            return Download(C.REDIRECT_LOOP, str(current)[:200], final_url=str(current))
                        seen.add(str(current))
                        continue
                    return await self._body(resp, str(current))
            return Download(C.TOO_MANY_REDIRECTS, f"more than {p.max_redirects}", final_url=str(current))
        except Exception as e:  # network errors of every kind become a class, never an exception
            return Download(classify_exception(e), f"{type(e).__name__}: {e}"[:200], final_url=str(current))

    async def _body(self, resp: aiohttp.ClientResponse, url: str) -> Download:
        p = self.params
        if not 200 <= resp.status <= 299:
            return Download(
                classify_status(resp.status), resp.reason or "", final_url=url, http_status=resp.status
            )
        if p.honor_opt_out and opted_out(resp.headers.getall("X-Robots-Tag", [])):
            return Download(C.OPTED_OUT, "X-Robots-Tag", final_url=url, http_status=resp.status)
        ctype = resp.content_type.lower()
        if ctype.startswith(_NOT_IMAGE_TYPES):
            return Download(C.NOT_IMAGE, ctype, final_url=url, http_status=resp.status)
        if resp.content_length is not None and resp.content_length > p.max_bytes:
            return Download(
                C.TOO_LARGE, f"{resp.content_length} bytes", final_url=url, http_status=resp.status
            )
        if resp.content_length is not None and "Content-Encoding" not in resp.headers:
            data = await resp.read()  # aiohttp stops at Content-Length, checked against max_bytes above
            if not data:
                return Download(C.NOT_IMAGE, "empty body", final_url=url, http_status=resp.status)
            return Download(C.SUCCESS, data=data, final_url=url, http_status=resp.status)
        chunks: list[bytes] = []
        size = 0
        while chunk := await resp.content.read(1 << 18):
            size += len(chunk)
            if size > p.max_bytes:
                return Download(
                    C.TOO_LARGE, f"over {p.max_bytes} bytes", final_url=url, http_status=resp.status
                )
            chunks.append(chunk)
        if size == 0:
            return Download(C.NOT_IMAGE, "empty body", final_url=url, http_status=resp.status)
        return Download(C.SUCCESS, data=b"".join(chunks), final_url=url, http_status=resp.status)
