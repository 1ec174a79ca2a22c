"""Fetch files from a Hugging Face hub repository, pinned to one commit and checked against what the hub announced.

This is the only module that imports huggingface_hub. It is imported lazily, inside the functions, because the
library reads HF_ENDPOINT and other settings at import time; the endpoint is passed explicitly instead.
Downloads, the cache, HF_TOKEN, retries with resume and progress bars are huggingface_hub's; this module
resolves the revision once, picks the files, and hashes each downloaded file itself before trusting it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airgap import __version__
from airgap.errors import FetchError, IntegrityError
from airgap.streams.pipeline import Digest, digest_chunks, digest_file, iter_chunks

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from tqdm.auto import tqdm as base_tqdm

COMMIT_RE = re.compile(r"[0-9a-fA-F]{40}")


@dataclass(frozen=True)
class HubFile:
    """One fetched file: where it came from (repo, commit, filename) and the local copy with its size and sha256.

    `path` is the regular file in the hub cache (not the snapshot symlink); its name is not `filename`.
    """

    repo: str
    commit: str
    filename: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class _Announced:
    """What the hub's tree listing says about a file at the pinned commit."""

    filename: str
    size: int
    lfs_sha256: str | None  # set for LFS files
    git_oid: str  # git blob id of the content for non-LFS files


def fetch_hub_files(
    repo: str,
    revision: str,
    files: Sequence[str] | None,
    allow_patterns: Sequence[str] | None,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> list[HubFile]:
    """Download the named files and those matching `allow_patterns` (all files when both are None).

    The revision (branch, tag or commit) is resolved to a commit once and every file is downloaded at that
    commit. Raises FetchError when the hub cannot be reached or refuses, a file or pattern matches nothing,
    and IntegrityError when a downloaded file differs from the size or hash the hub announced.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name="airgap", library_version=__version__)
    commit = _resolve_commit(api, repo, revision)
    announced = _list_files(api, repo, revision, commit)
    wanted = _select(repo, revision, announced, files, allow_patterns)
    tqdm_class = None if progress else _quiet_tqdm()
    return [
        _fetch_one(repo, revision, commit, announced[name], cache_dir, endpoint, token, tqdm_class) for name in wanted
    ]


def fetch_card_metadata(
    repo: str,
    commit: str,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """The YAML front matter of the repository's card (README.md) at `commit`: licence and the like.

    Empty when the repository has no card; the card is read for the SBOM, never packed.
    """
    from huggingface_hub import errors, hf_hub_download
    from huggingface_hub.repocard import metadata_load

    with _hub_errors(repo, commit, "README.md"):
        try:
            local = hf_hub_download(repo, "README.md", revision=commit, cache_dir=cache_dir, endpoint=endpoint,
                                    token=token, library_name="airgap", library_version=__version__,
                                    tqdm_class=_quiet_tqdm())
        except errors.EntryNotFoundError:
            return {}
    try:
        metadata = metadata_load(Path(local))
    except Exception as exc:  # malformed YAML (yaml's own errors): say why, do not guess a licence
        raise FetchError(f"cannot read the card of {repo}@{commit[:12]}: {_first_line(exc)}") from exc
    return dict(metadata or {})


def _resolve_commit(api: HfApi, repo: str, revision: str) -> str:
    with _hub_errors(repo, revision):
        commit = api.repo_info(repo, revision=revision, repo_type="model").sha
    if commit is None or not COMMIT_RE.fullmatch(commit):
        raise FetchError(f"cannot fetch {repo}@{revision}: the hub answered no commit for it, got {commit!r}")
    if COMMIT_RE.fullmatch(revision) and revision.lower() != commit:
        raise FetchError(f"cannot fetch {repo}@{revision}: the hub resolved this commit to another one, {commit}")
    return commit


def _list_files(api: HfApi, repo: str, revision: str, commit: str) -> dict[str, _Announced]:
    from huggingface_hub.hf_api import RepoFile

    with _hub_errors(repo, revision):
        entries = [e for e in api.list_repo_tree(repo, revision=commit, recursive=True) if isinstance(e, RepoFile)]
    return {entry.path: _announced(entry) for entry in entries}


def _announced(entry: RepoFile) -> _Announced:
    if entry.lfs is not None:
        return _Announced(entry.path, entry.lfs.size, entry.lfs.sha256.lower(), entry.blob_id)
    return _Announced(entry.path, entry.size, None, entry.blob_id)


def _select(
    repo: str,
    revision: str,
    announced: dict[str, _Announced],
    files: Sequence[str] | None,
    allow_patterns: Sequence[str] | None,
) -> list[str]:
    """Named files in the order given, then pattern matches in name order; every name and pattern must hit."""
    if files is None and allow_patterns is None:
        return sorted(announced)
    wanted: dict[str, None] = {}
    for name in files or ():
        if name not in announced:
            raise FetchError(f"cannot fetch {repo}@{revision} {name}: no such file in the repository")
        wanted[name] = None
    for pattern in allow_patterns or ():
        matches = sorted(name for name in announced if _matches(name, pattern))
        if not matches:
            raise FetchError(f"cannot fetch {repo}@{revision}: pattern {pattern!r} matches no file in the repository")
        wanted.update(dict.fromkeys(matches))
    return list(wanted)


def _matches(name: str, pattern: str) -> bool:
    """huggingface_hub's allow_patterns rule: fnmatch, and a pattern ending in '/' takes the whole folder."""
    return fnmatch.fnmatch(name, pattern + "*" if pattern.endswith("/") else pattern)


def _fetch_one(
    repo: str,
    revision: str,
    commit: str,
    expected: _Announced,
    cache_dir: Path | None,
    endpoint: str | None,
    token: str | None,
    tqdm_class: type[base_tqdm[Any]] | None,
) -> HubFile:
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo, revision, expected.filename):
        local = hf_hub_download(
            repo,
            expected.filename,
            revision=commit,
            cache_dir=cache_dir,
            endpoint=endpoint,
            token=token,
            library_name="airgap",
            library_version=__version__,
            tqdm_class=tqdm_class,
        )
    path = Path(local).resolve()
    digest = _check(repo, revision, commit, expected, Path(local), path)
    return HubFile(repo, commit, expected.filename, path, digest.size, digest.sha256)


def _check(repo: str, revision: str, commit: str, expected: _Announced, link: Path, path: Path) -> Digest:
    """Hash the downloaded file and compare with the announcement; a mismatching copy leaves the cache."""
    where = f"{repo}@{revision} ({commit[:12]}) {expected.filename}"
    size = path.stat().st_size
    if size != expected.size:
        _evict(link, path)
        raise IntegrityError(f"{where}: downloaded {size} bytes, the hub announced {expected.size}")
    if expected.lfs_sha256 is not None:
        digest = digest_file(path)
        if digest.sha256 != expected.lfs_sha256:
            _evict(link, path)
            raise IntegrityError(f"{where}: sha256 is {digest.sha256}, the hub announced {expected.lfs_sha256}")
        return digest
    digest, git_oid = _digest_with_git_oid(path, size)
    if git_oid != expected.git_oid:
        _evict(link, path)
        raise IntegrityError(f"{where}: git blob id is {git_oid}, the hub announced {expected.git_oid}")
    return digest


def _digest_with_git_oid(path: Path, size: int) -> tuple[Digest, str]:
    """sha256 and git blob id in one read; the hub identifies small (non-LFS) files by the latter only."""
    git = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with path.open("rb", buffering=0) as stream:
        digest = digest_chunks(iter_chunks(stream), git.update)
    return digest, git.hexdigest()


def _evict(link: Path, path: Path) -> None:
    """Remove a corrupt download from the hub cache, so that the next fetch downloads it again."""
    for victim in (link, path):
        with suppress(OSError):  # best effort: the error raised next says what is wrong
            victim.unlink(missing_ok=True)


@cache
def _quiet_tqdm() -> type[base_tqdm[Any]]:
    """huggingface_hub's tqdm, always disabled: silences this fetch without touching the global switch."""
    from huggingface_hub.utils.tqdm import tqdm as hub_tqdm

    class QuietTqdm(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    return QuietTqdm


@contextmanager
def _hub_errors(repo: str, revision: str, filename: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's and its transport's exceptions into one-line FetchErrors naming what was fetched."""
    where = f"{repo}@{revision}" + (f" {filename}" if filename else "")
    try:
        yield
    except Exception as error:
        reason = _reason(error, repo, revision)
        if reason is None:
            raise
        raise FetchError(f"cannot fetch {where}: {reason}") from error


def _reason(error: BaseException, repo: str, revision: str) -> str | None:
    """Why a hub call failed, in a few words; None for exceptions that are not about fetching."""
    import httpx2
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return "the repository is gated; accept its terms on the hub and use a token that has access"
    if isinstance(error, errors.RepositoryNotFoundError):
        return "repository not found, or private and the token gives no access"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"revision {revision} not found in {repo}"
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return "the hub has no such file at this revision"
    if isinstance(error, errors.OfflineModeIsEnabled):
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    if isinstance(error, errors.LocalEntryNotFoundError):
        # raised when the metadata request failed and the cache has nothing; the cause says why it failed
        cause_reason = _reason(error.__cause__, repo, revision) if error.__cause__ is not None else None
        return cause_reason or f"not in the cache and the hub is unusable: {_first_line(error)}"
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "an error"
        return f"the hub answered HTTP {status}"
    if isinstance(error, errors.FileMetadataError):
        return f"the server does not answer like a hub: {_first_line(error)}"
    if isinstance(error, (httpx2.HTTPError, ConnectionError, TimeoutError)):
        return f"the hub could not be reached: {_first_line(error)}"
    if isinstance(error, (OSError, ValueError)):  # size consistency check, disk full, invalid repo id
        return f"download failed: {_first_line(error)}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def list_hub_files(
    repo: str, revision: str, endpoint: str | None = None, token: str | None = None,
) -> tuple[str, dict[str, int]]:
    """(the commit `revision` resolves to, {file name: size} at that commit), without downloading any file."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name="airgap", library_version=__version__)
    commit = _resolve_commit(api, repo, revision)
    return commit, {name: entry.size for name, entry in _list_files(api, repo, revision, commit).items()}


def read_hub_head(
    repo: str, commit: str, filename: str, length: int, endpoint: str | None = None, token: str | None = None,
) -> bytes:
    """The first `length` bytes of a file at a commit (one HTTP range request): enough to read a GGUF header."""
    from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status
    from huggingface_hub.utils._headers import build_hf_headers  # the headers (token, agent) of every hub call

    url = hf_hub_url(repo, filename, revision=commit, endpoint=endpoint)
    headers = {**build_hf_headers(token=token, library_name="airgap", library_version=__version__),
               "Range": f"bytes=0-{length - 1}"}
    with _hub_errors(repo, commit, filename):
        response = get_session().get(url, headers=headers, follow_redirects=True)
        hf_raise_for_status(response)
    data = bytes(response.content)
    if response.status_code == 200:  # a server that ignores Range sends the whole file
        data = data[:length]
    return data
