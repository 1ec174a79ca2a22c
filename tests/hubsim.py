"""A stand-in for the Hugging Face hub on 127.0.0.1, for tests that drive the real huggingface_hub client.

It answers the routes the client calls to download files:

- GET  /api/models/{repo}[/revision/{rev}]       repo info: `sha` (the commit), `siblings`, `gated`
- GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (`recursive=true`), with LFS sha256 and sizes
- HEAD /{repo}/resolve/{rev}/{file}               X-Repo-Commit, ETag (sha256 for LFS files, git blob id
                                                  otherwise), Content-Length, Accept-Ranges
- GET  /{repo}/resolve/{rev}/{file}               the bytes, honouring `Range: bytes=START-[END]`

Errors carry the hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) which
the client turns into its exception classes. Faults can be injected per file: serve other bytes than announced,
cut a download after N bytes once, answer 404 for a listed file, gate a repo, fail a route with a status.
Every request is recorded so tests can assert what the client did.

    with HubSim() as hub:
        sha = hub.add_repo("org/model", {"model.gguf": path})
        fetch(..., endpoint=hub.endpoint)
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 1 << 20
TIMESTAMP = "2025-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class SimFile:
    """One file of a commit: where its bytes come from and what the hub announces about them."""

    name: str
    source: Path | bytes
    size: int
    sha256: str
    git_oid: str  # git blob id of the content, or of the LFS pointer for LFS files
    lfs: bool

    def open_range(self, start: int, end: int) -> Iterator[bytes]:
        if isinstance(self.source, bytes):
            yield self.source[start:end]
            return
        with self.source.open("rb") as stream:
            stream.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = stream.read(min(CHUNK, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class RouteFault:
    fragment: str
    status: int
    remaining: int | None  # None: every time


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, SimFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated_token: str | None = None
    gated: bool = False


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_hasher(size: int) -> hashlib._Hash:
    return hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)  # git's object id


def describe(name: str, source: Path | bytes) -> SimFile:
    """Hash a file in one streaming read and decide whether the hub would keep it in LFS."""
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    unannounced = SimFile(name, source, size, "", "", False)
    sha256, blob = hashlib.sha256(), git_blob_hasher(size)
    for chunk in unannounced.open_range(0, size):
        sha256.update(chunk)
        blob.update(chunk)
    lfs = name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
    if lfs:
        pointer = lfs_pointer(sha256.hexdigest(), size)
        blob = git_blob_hasher(len(pointer))
        blob.update(pointer)
    return SimFile(name=name, source=source, size=size, sha256=sha256.hexdigest(), git_oid=blob.hexdigest(), lfs=lfs)


class HubSim:
    """The hub on 127.0.0.1: register repos, inject faults, read the request log."""

    def __init__(self) -> None:
        self._repos: dict[str, Repo] = {}
        self._lock = threading.Lock()
        self._log: list[Request] = []
        self._served_bytes: dict[tuple[str, str], bytes] = {}
        self._cuts: dict[tuple[str, str], int] = {}
        self._hidden: set[tuple[str, str]] = set()
        self._route_faults: list[RouteFault] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def __enter__(self) -> HubSim:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="hubsim", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("HubSim is not started; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # repos

    def add_repo(self, repo_id: str, files: Mapping[str, Path | bytes], branch: str = "main") -> str:
        """Commit `files` as the new head of `branch` (earlier commits stay reachable) and return the sha."""
        described = {name: describe(name, source) for name, source in files.items()}
        with self._lock:
            repo = self._repos.setdefault(repo_id, Repo(repo_id))
            parent = repo.refs.get(branch, "")
            listing = "\n".join(f"{f.name} {f.sha256}" for f in sorted(described.values(), key=lambda f: f.name))
            commit = hashlib.sha1(f"{repo_id}\n{branch}\n{parent}\n{listing}".encode()).hexdigest()
            repo.commits[commit] = described
            repo.refs[branch] = commit
        return commit

    def add_tag(self, repo_id: str, tag: str, commit: str) -> None:
        with self._lock:
            repo = self._repos[repo_id]
            if commit not in repo.commits:
                raise KeyError(f"{repo_id} has no commit {commit}")
            repo.refs[tag] = commit

    # faults

    def serve_other_bytes(self, repo_id: str, filename: str, data: bytes) -> None:
        """GET answers `data` (with its own length) while the tree and HEAD keep announcing the real file."""
        with self._lock:
            self._served_bytes[(repo_id, filename)] = data

    def cut_once(self, repo_id: str, filename: str, after: int) -> None:
        """The next full GET of the file announces the whole length but sends `after` bytes, then hangs up."""
        with self._lock:
            self._cuts[(repo_id, filename)] = after

    def hide_file(self, repo_id: str, filename: str) -> None:
        """The file stays listed in the tree but HEAD/GET answer 404 EntryNotFound."""
        with self._lock:
            self._hidden.add((repo_id, filename))

    def gate(self, repo_id: str, token: str | None = None) -> None:
        """Downloads answer 401 GatedRepo unless the request carries `Authorization: Bearer <token>`."""
        with self._lock:
            repo = self._repos[repo_id]
            repo.gated = True
            repo.gated_token = token

    def fail_route(self, fragment: str, status: int, times: int | None = None) -> None:
        """Requests whose path contains `fragment` answer `status` (`times` times, or always)."""
        with self._lock:
            self._route_faults.append(RouteFault(fragment, status, times))

    def clear_faults(self) -> None:
        """Serve every file as announced again (gates stay: they are part of the repo)."""
        with self._lock:
            self._served_bytes.clear()
            self._cuts.clear()
            self._hidden.clear()
            self._route_faults.clear()

    # request log

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._log)

    def count(self, method: str | None = None, contains: str | None = None) -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and (contains is None or contains in r.path)
        )

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # internals used by the handler

    def _record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)

    def _route_fault(self, path: str) -> int | None:
        with self._lock:
            for fault in self._route_faults:
                if fault.fragment in path and fault.remaining != 0:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault.status
        return None

    def _repo(self, repo_id: str) -> Repo | None:
        with self._lock:
            return self._repos.get(repo_id)

    def _take_cut(self, key: tuple[str, str]) -> int | None:
        with self._lock:
            return self._cuts.pop(key, None)


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _resolve(repo: Repo | None, repo_id: str, revision: str) -> tuple[Repo, str]:
    if repo is None:
        raise HubError(401, "RepoNotFound", f"Repository not found: {repo_id}")
    commit = revision if revision in repo.commits else repo.refs.get(revision)
    if commit is None:
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
    return repo, commit


def _handler_for(hub: HubSim) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        sim = hub

    return Handler


API_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>[^/]+))?$")
API_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+|[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _HubHandler(BaseHTTPRequestHandler):
    sim: HubSim
    protocol_version = "HTTP/1.1"
    server_version = "hubsim/1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # the request log is kept by HubSim

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def _dispatch(self, send_body: bool) -> None:
        split = urlsplit(self.path)
        path = split.path
        status = 500
        try:
            fault = self.sim._route_fault(path)
            if fault is not None:
                raise HubError(fault, None, f"injected failure {fault}")
            if match := RESOLVE.match(path):
                status = self._resolve_file(match, send_body)
            elif send_body and (match := API_TREE.match(path)):
                status = self._tree(match, parse_qs(split.query))
            elif send_body and (match := API_INFO.match(path)):
                status = self._info(match)
            else:
                raise HubError(404, None, f"no route for {self.command} {path}")
        except HubError as error:
            status = error.status
            self._send_error(error, send_body)
        finally:
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.sim._record(Request(self.command, unquote(path), split.query, headers, status))

    # routes

    def _info(self, match: re.Match[str]) -> int:
        repo_id = match["repo"]
        repo, commit = _resolve(self.sim._repo(repo_id), repo_id, unquote(match["rev"] or "main"))
        files = repo.commits[commit]
        body = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "lastModified": TIMESTAMP,
            "createdAt": TIMESTAMP,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }
        return self._send_json(body, {"X-Repo-Commit": commit})

    def _tree(self, match: re.Match[str], query: dict[str, list[str]]) -> int:
        repo_id = match["repo"]
        repo, commit = _resolve(self.sim._repo(repo_id), repo_id, unquote(match["rev"]))
        base = unquote(match["path"] or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = _tree_entries(repo.commits[commit], base, recursive)
        if base and not entries:
            raise HubError(404, "EntryNotFound", f"{base} does not exist at {commit}")
        return self._send_json(entries, {"X-Repo-Commit": commit})

    def _resolve_file(self, match: re.Match[str], send_body: bool) -> int:
        repo_id = match["repo"]
        filename = unquote(match["file"])
        repo, commit = _resolve(self.sim._repo(repo_id), repo_id, unquote(match["rev"]))
        allowed = repo.gated_token is not None and self.headers.get("authorization") == f"Bearer {repo.gated_token}"
        if repo.gated and not allowed:
            raise HubError(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be authenticated.")
        hub_file = repo.commits[commit].get(filename)
        if hub_file is None or (repo_id, filename) in self.sim._hidden:
            raise HubError(404, "EntryNotFound", f"{filename} does not exist at {commit}")
        served = self.sim._served_bytes.get((repo_id, filename))
        source = hub_file if served is None else SimFile(filename, served, len(served), "", "", hub_file.lfs)
        etag = hub_file.sha256 if hub_file.lfs else hub_file.git_oid
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if hub_file.lfs:
            headers["X-Linked-Etag"] = f'"{hub_file.sha256}"'
            headers["X-Linked-Size"] = str(hub_file.size)
        if not send_body:
            headers["Content-Length"] = str(hub_file.size)
            return self._send(200, headers, iter(()))
        start, end, status = self._range(source.size)
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{source.size}"
        headers["Content-Length"] = str(end - start)
        cut = self.sim._take_cut((repo_id, filename)) if status == 200 else None
        if cut is not None:
            self.close_connection = True
            return self._send(status, headers, source.open_range(0, min(cut, source.size)))
        return self._send(status, headers, source.open_range(start, end))

    # helpers

    def _range(self, size: int) -> tuple[int, int, int]:
        header = self.headers.get("range")
        if header is None:
            return 0, size, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", header.strip())
        if match is None or int(match[1]) >= size:
            raise HubError(416, None, f"unsatisfiable range {header} for {size} bytes")
        start = int(match[1])
        end = min(int(match[2]) + 1, size) if match[2] else size
        return start, end, 206

    def _send(self, status: int, headers: Mapping[str, str], body: Iterator[bytes]) -> int:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        for chunk in body:
            self.wfile.write(chunk)
        self.wfile.flush()
        return status

    def _send_json(self, payload: object, headers: Mapping[str, str]) -> int:
        data = json.dumps(payload).encode()
        all_headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}
        return self._send(200, all_headers, iter([data]))

    def _send_error(self, error: HubError, send_body: bool) -> None:
        data = json.dumps({"error": error.message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        headers["X-Error-Message"] = error.message
        if error.code is not None:
            headers["X-Error-Code"] = error.code
        self._send(error.status, headers, iter([data] if send_body else []))


def _tree_entries(files: Mapping[str, SimFile], base: str, recursive: bool) -> list[dict[str, object]]:
    prefix = f"{base}/" if base else ""
    entries: list[dict[str, object]] = []
    folders: set[str] = set()
    for name in sorted(files):
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if folder not in folders and (recursive or depth == 1):
                folders.add(folder)
                oid = hashlib.sha1(folder.encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
        if len(parts) > 1 and not recursive:
            continue
        hub_file = files[name]
        entry: dict[str, object] = {"type": "file", "oid": hub_file.git_oid, "size": hub_file.size, "path": name}
        if hub_file.lfs:
            pointer_size = len(lfs_pointer(hub_file.sha256, hub_file.size))
            entry["lfs"] = {"oid": hub_file.sha256, "size": hub_file.size, "pointerSize": pointer_size}
        entries.append(entry)
    return entries
