"""A small Hugging Face Hub-compatible server on 127.0.0.1: the demo, tests and benchmarks get from it.

It serves folders as Hub *dataset* repositories, answering exactly what huggingface_hub asks for:
  GET  /api/datasets/{owner}/{name}[/revision/{rev}]         repo info: id, sha (the commit), siblings
  GET  /api/datasets/{owner}/{name}/tree/{rev}[/{path}]      listing (?recursive=true), no pagination
  POST /api/datasets/{owner}/{name}/paths-info/{rev}         sizes of given paths
  HEAD/GET /datasets/{owner}/{name}/resolve/{rev}/{path}     the file: Range, ETag, X-Repo-Commit
and plain files (no Hub headers) at /files/{path}, for `url` sources. A repository can be gated (401
without a token, 403 with a wrong one, with the Hub's X-Error-Code: GatedRepo), and a file can be given
faults that the next GETs meet: "500" (an error response) or "cut" (half the body, then the connection
closes), to test retries and resume.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..fetch.serve import serve_app


@dataclass
class HubServer:
    """`repos`: a folder holding OWNER/NAME/... repository folders; `files`: a folder served at /files/."""

    repos: Path
    files: Path | None = None
    gated: dict[str, set[str]] = field(default_factory=dict)  # repo -> tokens that may read it
    faults: dict[str, list[str]] = field(default_factory=dict)  # "OWNER/NAME/PATH" or "files/PATH"
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    url: str = ""

    # -- helpers --------------------------------------------------------------------------------------
    def _repo_dir(self, request: web.Request) -> tuple[str, Path]:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        return repo, self.repos / repo

    def _files(self, repo_dir: Path) -> list[Path]:
        return sorted(p for p in repo_dir.rglob("*") if p.is_file() and not p.name.startswith("."))

    def commit(self, repo: str) -> str:
        """The repository's commit: a hash of its file names, sizes and times (changes when they do)."""
        h = hashlib.sha1()
        repo_dir = self.repos / repo
        for p in self._files(repo_dir):
            st = p.stat()
            h.update(f"{p.relative_to(repo_dir).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def _deny(self, request: web.Request, repo: str, repo_dir: Path) -> web.Response | None:
        if not repo_dir.is_dir():
            return _error(401, "RepoNotFound", "Repository not found")
        if repo in self.gated:
            auth = request.headers.get("Authorization", "")
            token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
            if token is None:
                message = f"Access to dataset {repo} is restricted. You must be authenticated to access it."
                return _error(401, "GatedRepo", message)
            if token not in self.gated[repo]:
                message = f"Access to dataset {repo} is restricted and you are not in the authorized list."
                return _error(403, "GatedRepo", message)
        rev = request.match_info.get("rev")
        if rev is not None and rev not in ("main", self.commit(repo)):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    def _entry(self, repo_dir: Path, p: Path) -> dict:
        rel = p.relative_to(repo_dir).as_posix()
        if p.is_dir():
            return {
                "type": "directory",
                "oid": hashlib.sha1(rel.encode()).hexdigest(),
                "size": 0,
                "path": rel,
            }
        st = p.stat()
        oid = hashlib.sha1(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
        return {"type": "file", "oid": oid, "size": st.st_size, "path": rel}

    def _fault(self, key: str) -> str | None:
        queue = self.faults.get(key)
        return queue.pop(0) if queue else None

    # -- handlers -------------------------------------------------------------------------------------
    async def info(self, request: web.Request) -> web.Response:
        repo, repo_dir = self._repo_dir(request)
        self.requests.append((request.method, request.path, None))
        if (denied := self._deny(request, repo, repo_dir)) is not None:
            return denied
        siblings = [{"rfilename": p.relative_to(repo_dir).as_posix()} for p in self._files(repo_dir)]
        gated = "manual" if repo in self.gated else False
        body = {"_id": repo, "id": repo, "sha": self.commit(repo), "private": False, "gated": gated,
                "siblings": siblings, "tags": []}  # fmt: skip
        return web.json_response(body)

    async def tree(self, request: web.Request) -> web.Response:
        repo, repo_dir = self._repo_dir(request)
        self.requests.append((request.method, request.path, None))
        if (denied := self._deny(request, repo, repo_dir)) is not None:
            return denied
        base = repo_dir / request.match_info.get("path", "")
        if not base.is_dir():
            return _error(404, "EntryNotFound", f"{request.match_info.get('path')} does not exist")
        recursive = request.query.get("recursive", "false").lower() in ("1", "true")
        found = sorted(base.rglob("*") if recursive else base.iterdir())
        entries = [self._entry(repo_dir, p) for p in found if not p.name.startswith(".")]
        return web.json_response(entries)

    async def paths_info(self, request: web.Request) -> web.Response:
        repo, repo_dir = self._repo_dir(request)
        self.requests.append((request.method, request.path, None))
        if (denied := self._deny(request, repo, repo_dir)) is not None:
            return denied
        form = await request.post()
        paths = form.getall("paths", [])
        out = [self._entry(repo_dir, repo_dir / str(p)) for p in paths if (repo_dir / str(p)).exists()]
        return web.json_response(out)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo, repo_dir = self._repo_dir(request)
        self.requests.append((request.method, request.path, request.headers.get("Range")))
        if (denied := self._deny(request, repo, repo_dir)) is not None:
            return denied
        rel = request.match_info["path"]
        path = repo_dir / rel
        commit = self.commit(repo)
        if ".." in rel.split("/") or not path.is_file():
            return _error(404, "EntryNotFound", f"{rel} does not exist", {"X-Repo-Commit": commit})
        return await self._send(request, path, f"{repo}/{rel}", {"X-Repo-Commit": commit})

    async def plain(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Range")))
        rel = request.match_info["path"]
        if self.files is None or ".." in rel.split("/") or not (self.files / rel).is_file():
            return web.Response(status=404, text="not found")
        return await self._send(request, self.files / rel, f"files/{rel}", {})

    async def _send(self, request: web.Request, path: Path, key: str, headers: dict) -> web.StreamResponse:
        fault = self._fault(key) if request.method == "GET" else None
        if fault == "500":
            return web.Response(status=500, text="internal error (injected)")
        if fault == "cut":
            return await _cut(request, path, headers)
        st = path.stat()
        headers = {**headers, "Accept-Ranges": "bytes", "ETag": f'"{st.st_size:x}-{st.st_mtime_ns:x}"'}
        return web.FileResponse(path, headers=headers)

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_get("/api/datasets/{owner}/{name}", self.info)
        r.add_get("/api/datasets/{owner}/{name}/revision/{rev}", self.info)
        r.add_get("/api/datasets/{owner}/{name}/tree/{rev}", self.tree)
        r.add_get("/api/datasets/{owner}/{name}/tree/{rev}/{path:.*}", self.tree)
        r.add_post("/api/datasets/{owner}/{name}/paths-info/{rev}", self.paths_info)
        r.add_get("/datasets/{owner}/{name}/resolve/{rev}/{path:.*}", self.resolve)  # HEAD too
        r.add_get("/files/{path:.*}", self.plain)
        return app


def _error(status: int, code: str, message: str, extra: dict | None = None) -> web.Response:
    headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
    return web.json_response({"error": message}, status=status, headers=headers)


async def _cut(request: web.Request, path: Path, headers: dict) -> web.StreamResponse:
    """Announce the whole (requested) body, send half of it, then drop the connection."""
    size = os.path.getsize(path)
    start = 0
    status = 200
    rng = request.headers.get("Range", "")
    if rng.startswith("bytes=") and rng[6:].split("-")[0]:
        start = int(rng[6:].split("-")[0])
        status = 206
        headers = {**headers, "Content-Range": f"bytes {start}-{size - 1}/{size}"}
    span = size - start
    resp = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(span)})
    await resp.prepare(request)
    with open(path, "rb") as f:
        f.seek(start)
        await resp.write(f.read(span // 2))
    if request.transport is not None:
        request.transport.close()
    return resp


@contextmanager
def serve_hub(
    repos: str | Path,
    files: str | Path | None = None,
    gated: dict[str, set[str]] | None = None,
    port: int = 0,
) -> Iterator[HubServer]:
    """Serve `repos` (OWNER/NAME folders) as Hub dataset repositories on 127.0.0.1; yields the server,
    whose `.url` is the value for HF_ENDPOINT."""
    server = HubServer(Path(repos), Path(files) if files is not None else None, dict(gated or {}))
    with serve_app(server.app(), "127.0.0.1", port) as url:
        server.url = url
        yield server
