"""The real huggingface_hub client against HubSim on 127.0.0.1."""

from __future__ import annotations

import hashlib
import importlib
import socket
from pathlib import Path

import pytest
from hubsim import HubSim

from airgap.build.sources.gguf_meta import is_gguf, read_gguf_metadata
from airgap.build.sources.hf import HubFile, fetch_hub_files
from airgap.errors import FetchError, IntegrityError

REPO = "org/tiny"
README = b"# tiny\n"
CONFIG = b'{"context": 256}\n'


def fetch(hub: HubSim, cache: Path, revision: str = "main", **kwargs: object) -> list[HubFile]:
    options: dict[str, object] = {"files": None, "allow_patterns": None, "progress": False}
    options.update(kwargs)
    return fetch_hub_files(REPO, revision, cache_dir=cache, endpoint=hub.endpoint, **options)  # type: ignore[arg-type]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def repo(hub: HubSim, tiny_gguf: Path) -> str:
    return hub.add_repo(REPO, {"model.gguf": tiny_gguf, "README.md": README, "sub/config.json": CONFIG})


def test_branch_resolves_to_one_commit(hub: HubSim, repo: str, tmp_path: Path, tiny_gguf: Path) -> None:
    fetched = fetch(hub, tmp_path)

    assert [f.filename for f in fetched] == ["README.md", "model.gguf", "sub/config.json"]
    assert {f.commit for f in fetched} == {repo}
    assert {f.repo for f in fetched} == {REPO}
    by_name = {f.filename: f for f in fetched}
    assert by_name["model.gguf"].sha256 == sha256(tiny_gguf.read_bytes())
    assert by_name["README.md"].sha256 == sha256(README)
    assert by_name["sub/config.json"].size == len(CONFIG)
    for hub_file in fetched:
        assert hub_file.path.is_file() and not hub_file.path.is_symlink()
        assert tmp_path in hub_file.path.parents
    assert hub.count("GET", f"/api/models/{REPO}/revision/main") == 1
    downloads = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert downloads and all(f"/resolve/{repo}/" in path for path in downloads)


def test_downloaded_gguf_reads_back(hub: HubSim, repo: str, tmp_path: Path) -> None:
    (model,) = fetch(hub, tmp_path, files=["model.gguf"])

    assert is_gguf(model.path)
    assert read_gguf_metadata(model.path)["architecture"] == "llama"


def test_pinned_commit_and_tag_survive_a_moved_branch(hub: HubSim, repo: str, tmp_path: Path) -> None:
    newer = hub.add_repo(REPO, {"README.md": b"# newer\n"})
    hub.add_tag(REPO, "v1", repo)

    (old,) = fetch(hub, tmp_path, revision=repo, files=["README.md"])
    (tagged,) = fetch(hub, tmp_path, revision="v1", files=["README.md"])
    (head,) = fetch(hub, tmp_path, revision="main", files=["README.md"])

    assert (old.commit, old.path.read_bytes()) == (repo, README)
    assert tagged.commit == repo
    assert (head.commit, head.path.read_bytes()) == (newer, b"# newer\n")


def test_cached_file_is_rehashed_not_redownloaded(hub: HubSim, repo: str, tmp_path: Path) -> None:
    first = fetch(hub, tmp_path, files=["model.gguf"])
    hub.clear_log()

    second = fetch(hub, tmp_path, revision=repo, files=["model.gguf"])

    assert second == first
    assert hub.count(contains="/resolve/") == 0


def test_unknown_repo(hub: HubSim, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"org/tiny@main: repository not found") as raised:
        fetch(hub, tmp_path)
    assert "\n" not in str(raised.value)


def test_unknown_revision(hub: HubSim, repo: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="revision nope not found in org/tiny"):
        fetch(hub, tmp_path, revision="nope")


def test_named_file_missing_from_the_repo(hub: HubSim, repo: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"org/tiny@main other\.gguf: no such file"):
        fetch(hub, tmp_path, files=["other.gguf"])
    assert hub.count(contains="/resolve/") == 0


def test_listed_file_answering_404(hub: HubSim, repo: str, tmp_path: Path) -> None:
    hub.hide_file(REPO, "model.gguf")

    with pytest.raises(FetchError, match=r"org/tiny@main model\.gguf: the hub has no such file"):
        fetch(hub, tmp_path, files=["model.gguf"])


def test_gated_repo_without_access(hub: HubSim, repo: str, tmp_path: Path) -> None:
    hub.gate(REPO, token="hf_right")

    with pytest.raises(FetchError, match=r"org/tiny@main model\.gguf: the repository is gated"):
        fetch(hub, tmp_path, files=["model.gguf"], token="hf_wrong")


def test_gated_repo_with_token(hub: HubSim, repo: str, tmp_path: Path) -> None:
    hub.gate(REPO, token="hf_right")

    (model,) = fetch(hub, tmp_path, files=["model.gguf"], token="hf_right")

    assert model.commit == repo
    resolves = [r for r in hub.requests if "/resolve/" in r.path]
    assert resolves and all(r.headers.get("authorization") == "Bearer hf_right" for r in resolves)


def test_server_error(hub: HubSim, repo: str, tmp_path: Path) -> None:
    hub.fail_route("/api/models/", 500)

    with pytest.raises(FetchError, match="org/tiny@main: the hub answered HTTP 500"):
        fetch(hub, tmp_path)


def test_download_refused(hub: HubSim, repo: str, tmp_path: Path) -> None:
    hub.fail_route("/resolve/", 403)

    with pytest.raises(FetchError, match=r"org/tiny@main README\.md: the hub answered HTTP 403"):
        fetch(hub, tmp_path, files=["README.md"])


def test_unreachable_hub(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    with pytest.raises(FetchError, match="org/tiny@main: the hub could not be reached"):
        fetch_hub_files(REPO, "main", None, None, cache_dir=tmp_path, endpoint=f"http://127.0.0.1:{closed_port}")


def test_offline_mode(hub: HubSim, repo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(FetchError, match="offline mode"):
        fetch(hub, tmp_path)
    assert hub.requests == []


def test_invalid_repo_id(hub: HubSim, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="not a repo"):
        fetch_hub_files("not a repo!", "main", None, None, cache_dir=tmp_path, endpoint=hub.endpoint)


def test_interrupted_download_resumes_with_range(hub: HubSim, tmp_path: Path, padded_gguf: Path) -> None:
    size = padded_gguf.stat().st_size
    commit = hub.add_repo(REPO, {"big.gguf": padded_gguf})
    hub.cut_once(REPO, "big.gguf", after=size - 1024 * 1024)

    (model,) = fetch(hub, tmp_path)

    ranged = [r for r in hub.requests if r.method == "GET" and r.range is not None]
    assert len(ranged) == 1
    start = int(ranged[0].range.removeprefix("bytes=").split("-")[0])  # type: ignore[union-attr]
    assert 0 < start < size
    assert model.commit == commit
    assert model.size == size
    assert model.sha256 == sha256(padded_gguf.read_bytes())
    assert is_gguf(model.path)


def test_tampered_lfs_file_is_refused_and_evicted(hub: HubSim, repo: str, tmp_path: Path, tiny_gguf: Path) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    hub.serve_other_bytes(REPO, "model.gguf", bytes(data))

    with pytest.raises(IntegrityError, match=r"model\.gguf: sha256 is [0-9a-f]{64}, the hub announced") as raised:
        fetch(hub, tmp_path, files=["model.gguf"])
    assert sha256(tiny_gguf.read_bytes()) in str(raised.value)
    assert not list(tmp_path.glob("models--org--tiny/blobs/*")), "the corrupt copy must leave the cache"

    hub.clear_faults()
    (model,) = fetch(hub, tmp_path, files=["model.gguf"])
    assert model.sha256 == sha256(tiny_gguf.read_bytes())


def test_tampered_small_file_is_refused(hub: HubSim, repo: str, tmp_path: Path) -> None:
    hub.serve_other_bytes(REPO, "README.md", README.upper())

    with pytest.raises(IntegrityError, match=r"README\.md: git blob id is"):
        fetch(hub, tmp_path, files=["README.md"])


def test_served_size_differs_from_announced(hub: HubSim, repo: str, tmp_path: Path, tiny_gguf: Path) -> None:
    hub.serve_other_bytes(REPO, "model.gguf", tiny_gguf.read_bytes()[:-10])

    with pytest.raises(FetchError, match=r"org/tiny@main model\.gguf: download failed: .*size"):
        fetch(hub, tmp_path, files=["model.gguf"])


def test_allow_patterns(hub: HubSim, tmp_path: Path) -> None:
    files = {"a-Q4_K_M.gguf": b"a", "b-Q8_0.gguf": b"b", "README.md": b"r", "sub/x.json": b"x", "sub/y.json": b"y"}
    hub.add_repo(REPO, files)

    quantized = fetch(hub, tmp_path, allow_patterns=["*Q4_K_M.gguf"])
    folder = fetch(hub, tmp_path, allow_patterns=["sub/"])
    mixed = fetch(hub, tmp_path, files=["README.md"], allow_patterns=["*.gguf", "b-*"])

    assert [f.filename for f in quantized] == ["a-Q4_K_M.gguf"]
    assert [f.filename for f in folder] == ["sub/x.json", "sub/y.json"]
    assert [f.filename for f in mixed] == ["README.md", "a-Q4_K_M.gguf", "b-Q8_0.gguf"]
    assert hub.count(contains="/resolve/") == 2 * 5  # HEAD and GET once per distinct file, then the cache


def test_pattern_matching_nothing_is_named(hub: HubSim, repo: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"pattern '\*Q5_K_M\.gguf' matches no file"):
        fetch(hub, tmp_path, allow_patterns=["*.gguf", "*Q5_K_M.gguf"])
    assert hub.count(contains="/resolve/") == 0


def test_progress_bars_follow_the_flag(
    hub: HubSim, repo: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module; the package exports the class
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub then draws bars even without a terminal
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)  # read from the environment at import
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})

    fetch(hub, tmp_path / "quiet", files=["model.gguf"], progress=False)
    quiet = capfd.readouterr()
    fetch(hub, tmp_path / "loud", files=["model.gguf"], progress=True)
    loud = capfd.readouterr()

    assert quiet.out == "" and quiet.err == ""
    assert "model.gguf" in loud.err
