"""Downloads for `ovis-data get`: Hub files through huggingface_hub, plain URLs through aiohttp with Range
resume, and the size/sha256 check both go through. Every failure is a `SourceFailed` with one line."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import aiohttp

Bytes = Callable[[int], None]  # bytes just received (negative: a restart threw them away)
RETRIES = 4
BACKOFF_S = 0.5
CHUNK = 1 << 20


class SourceFailed(Exception):
    """One source could not be got; the message is the one line the user reads."""


@dataclass(frozen=True)
class Hub:
    """Where Hub requests go: endpoint None means huggingface_hub's own (HF_ENDPOINT, else the Hub);
    token None means its own lookup (HF_TOKEN, else `hf auth login`'s stored token)."""

    endpoint: str | None = None
    token: str | bool | None = None  # False: send none

    def base(self) -> str:
        from huggingface_hub import constants

        return (self.endpoint or constants.ENDPOINT).rstrip("/")


def _quiet_hub() -> None:
    # huggingface_hub logs retries and warnings of its own: get reports in its own words, one line each
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def _hub_error(e: Exception, hub: Hub, repo: str, what: str) -> SourceFailed:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError) or status in (401, 403):
        kind = "gated" if isinstance(e, GatedRepoError) else "gated, private or missing"
        return SourceFailed(
            f"{repo}: {kind} dataset repository (HTTP {status}): accept its terms at "
            f"{hub.base()}/datasets/{repo} with your account, then set HF_TOKEN or run `hf auth login`"
        )
    if type(e).__name__ == "LocalEntryNotFoundError":  # huggingface_hub's word for "could not connect"
        return SourceFailed(
            f"{repo}: {what}: cannot reach {hub.base()} (no connection, or a wrong HF_ENDPOINT?)"
        )
    if isinstance(e, RevisionNotFoundError):
        return SourceFailed(f"{repo}: revision of {what} not found on the Hub")
    if isinstance(e, RemoteEntryNotFoundError):
        return SourceFailed(f"{repo}: {what} not found in the repository")
    if isinstance(e, RepositoryNotFoundError):
        return SourceFailed(f"{repo}: dataset repository not found")
    if isinstance(e, HfHubHTTPError):
        return SourceFailed(f"{repo}: {what}: HTTP {status} from the Hub")
    return SourceFailed(f"{repo}: {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _transient(e: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError):
        return status is not None and (status >= 500 or status in (408, 429))
    name = type(e).__name__
    return name.endswith(("ConnectError", "TimeoutException", "ReadTimeout", "RemoteProtocolError")) or (
        isinstance(e, OSError) and not isinstance(e, FileNotFoundError)
    )


def _tqdm_class(on_bytes: Bytes) -> type:
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Counter(hf_tqdm):  # type: ignore[misc]
        """Forwards huggingface_hub's byte counts to get's progress, draws nothing itself."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if kwargs.get("initial"):
                on_bytes(int(kwargs["initial"]))  # type: ignore[arg-type]

        def update(self, n: float | None = 1) -> bool | None:
            on_bytes(int(n or 0))
            return None

    return Counter


def hub_download(hub: Hub, repo: str, path: str, revision: str, local_dir: Path, on_bytes: Bytes) -> Path:
    """One file of a Hub dataset repository into local_dir/<path> (huggingface_hub's local-dir mode: a
    completed file is not downloaded again; a dropped connection resumes where it stopped). Transient
    failures (5xx, 429, connection errors) are retried with backoff."""
    from huggingface_hub import hf_hub_download

    _quiet_hub()
    for attempt in range(RETRIES + 1):
        try:
            got = hf_hub_download(
                repo,
                path,
                repo_type="dataset",
                revision=revision,
                local_dir=local_dir,
                endpoint=hub.endpoint,
                token=hub.token,
                tqdm_class=_tqdm_class(on_bytes),
            )
            return Path(got)
        except Exception as e:
            if attempt < RETRIES and _transient(e):
                time.sleep(BACKOFF_S * 2**attempt)
                continue
            raise _hub_error(e, hub, repo, path) from e
    raise AssertionError("unreachable")


def forget_hub_file(local_dir: Path, path: str) -> None:
    """Remove a Hub file fetched into local_dir and huggingface_hub's record of it."""
    (local_dir / path).unlink(missing_ok=True)
    meta = local_dir / ".cache" / "huggingface" / "download" / f"{path}.metadata"
    meta.unlink(missing_ok=True)


def hub_list(hub: Hub, repo: str, revision: str, pattern: str) -> list[tuple[str, int]]:
    """Repository files matching a glob (fnmatch on the repo path), with sizes, in name order."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    _quiet_hub()
    try:
        tree = HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_tree(
            repo, repo_type="dataset", revision=revision, recursive=True
        )
        return sorted((f.path, f.size) for f in tree if isinstance(f, RepoFile) and fnmatch(f.path, pattern))
    except Exception as e:  # huggingface_hub retries transient failures of API calls itself
        raise _hub_error(e, hub, repo, f"listing for {pattern!r}") from e


def hub_sizes(hub: Hub, repo: str, revision: str, paths: list[str]) -> dict[str, int]:
    """Sizes of repository files as the Hub lists them (for a plan whose sizes are not recorded)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    _quiet_hub()
    try:
        infos = HfApi(endpoint=hub.endpoint, token=hub.token).get_paths_info(
            repo, paths, repo_type="dataset", revision=revision
        )
    except Exception as e:
        raise _hub_error(e, hub, repo, "sizes") from e
    return {i.path: i.size for i in infos if isinstance(i, RepoFile)}


# -- plain URLs -----------------------------------------------------------------------------------------


def url_download(url: str, dest: Path, on_bytes: Bytes, size: int | None = None) -> Path:
    """A plain HTTP(S) file into dest, through dest.part: an interrupted transfer (a dropped connection,
    or this process killed) continues from the part's length with a Range request."""
    if dest.is_file() and (size is None or dest.stat().st_size == size):
        on_bytes(dest.stat().st_size)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_url_download(url, dest, on_bytes))


async def _url_download(url: str, dest: Path, on_bytes: Bytes) -> Path:
    part = dest.with_name(dest.name + ".part")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    last: str = ""
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        for attempt in range(RETRIES + 1):
            have = part.stat().st_size if part.exists() else 0
            if attempt == 0 and have:
                on_bytes(have)
            headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else {}
            try:
                async with session.get(url, headers=headers) as r:
                    if r.status == 416 and have:  # the part is already whole
                        break
                    if r.status in (401, 403):
                        raise SourceFailed(f"{url}: HTTP {r.status}: not allowed (a login or a form first?)")
                    if r.status >= 400:
                        last = f"HTTP {r.status}"
                        if r.status >= 500 or r.status in (408, 429):
                            raise _Retry(last)
                        raise SourceFailed(f"{url}: {last}")
                    if r.status == 200 and have:  # the server ignored the Range: start over
                        on_bytes(-have)
                        have = 0
                    elif r.status == 206 and not (r.headers.get("Content-Range", "")).startswith(
                        f"bytes {have}-"
                    ):
                        raise SourceFailed(f"{url}: the server answered a Range request with another range")
                    expected = r.content_length
                    got = 0
                    with open(part, "ab" if have else "wb") as f:
                        async for chunk in r.content.iter_chunked(CHUNK):
                            f.write(chunk)
                            got += len(chunk)
                            on_bytes(len(chunk))
                    if expected is not None and got != expected:
                        raise _Retry(f"connection closed after {got:,} of {expected:,} bytes")
                break
            except (TimeoutError, _Retry, aiohttp.ClientError, ConnectionError) as e:
                last = str(e) or type(e).__name__
                if attempt == RETRIES:
                    raise SourceFailed(
                        f"{url}: {last} (after {RETRIES + 1} attempts; re-run to resume)"
                    ) from e
                await asyncio.sleep(BACKOFF_S * 2**attempt)
    os.replace(part, dest)
    return dest


class _Retry(Exception):
    pass


def url_size(url: str) -> int | None:
    """Content-Length of a HEAD request, None when the server does not say."""

    async def head() -> int | None:
        timeout = aiohttp.ClientTimeout(total=10)
        headers = {"Accept-Encoding": "identity"}
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.head(url, allow_redirects=True, headers=headers) as r,
        ):
            return r.content_length if r.status < 400 else None

    try:
        return asyncio.run(head())
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None


# -- verification ---------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK * 4):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, size: int | None, sha256: str | None, what: str) -> str | None:
    """Check a downloaded file against its recorded size and sha256; on a mismatch the file is deleted
    (it must never be extracted nor kept) and the source fails. Returns the sha256 when computed."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        path.unlink(missing_ok=True)
        raise SourceFailed(
            f"{what}: size {actual:,} bytes, expected {size:,}: deleted (re-run to get it again)"
        )
    if sha256 is None:
        return None
    digest = sha256_of(path)
    if digest != sha256:
        path.unlink(missing_ok=True)
        raise SourceFailed(f"{what}: sha256 {digest[:12]}... is not the recorded {sha256[:12]}...: deleted")
    return digest


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
