"""Sizing for the target host, end to end through the CLI: probe -> build --target (hub stand-in) -> inspect shows
the target -> install -> plan warns on a host that differs from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KeyPair
from tests.hubsim import HubSim
from tests.support import airgap

REPO_ID = "acme/tiny-GGUF"
BIG = 2 * 10**9  # the "F16" file: the tiny model's bytes, then holes up to 2 GB (never downloaded)


def spec(folder: Path, wheelhouse: Path, file: str) -> Path:
    path = folder / f"target-{file.replace('*', 'x')}.toml"
    path.write_text(
        '[bundle]\nname = "sized"\nversion = "1.0.0"\n\n'
        f'[[models]]\nid = "tiny"\nrepo = "{REPO_ID}"\nfile = "{file}"\n\n'
        f'[python]\nfind_links = ["{wheelhouse}"]\n')
    return path


def edited_probe(source: Path, out: Path, **changes: Any) -> Path:
    """A probe of another host: this host's probe with some facts changed (e.g. less RAM)."""
    doc = json.loads(source.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        doc[section][key] = value
    out.write_text(json.dumps(doc))
    return out


@pytest.fixture
def hub_repo(tmp_path: Path, tiny_model: Path) -> tuple[Path, Path]:
    big = tmp_path / "tiny-F16.gguf"
    big.write_bytes(tiny_model.read_bytes())
    with big.open("r+b") as stream:
        stream.truncate(BIG)
    return tiny_model, big


@pytest.mark.slow
def test_probe_build_for_the_target_inspect_install_and_plan_warns_on_another_host(
        tmp_path: Path, wheelhouse: Path, keys: KeyPair, hub_repo: tuple[Path, Path]) -> None:
    prefix = tmp_path / "opt"
    here = tmp_path / "here.json"
    probed = airgap("probe", "--prefix", prefix, "-o", here)
    assert probed.code == 0, probed.stderr
    # the target: this host, but with 2.5 GiB of RAM, so the 2 GB file cannot fit and the tiny one can
    target = edited_probe(here, tmp_path / "target.json", memory__total=5 << 29, memory__available=5 << 29)
    small, big = hub_repo
    env = {"HF_HOME": str(tmp_path / "hf")}
    with HubSim() as hub:
        commit = hub.add_repo(REPO_ID, {"tiny-Q8_0.gguf": small, "tiny-F16.gguf": big, "README.md": b"# tiny\n"})
        # a named file that cannot fit: refused before anything is downloaded
        refused = airgap("build", spec(tmp_path, wheelhouse, "tiny-F16.gguf"), "--key", keys.private, "-o",
                         tmp_path / "d", "-q", "--hub-endpoint", hub.endpoint, "--target", target, env=env)
        assert refused.code != 0
        assert refused.error_line.startswith(
            "airgap: error: model 'tiny' does not fit the target host even at 2048 tokens of context: F16 (2.0 GB) "
            "needs ")
        assert "the largest quantization that would fit is Q8_0 (0.0 GB): name 'tiny-Q8_0.gguf'" in refused.error_line
        assert not list((tmp_path / "d").glob("*.airgap"))
        # `auto`: the largest that fits, explained; the 2 GB file's header is read with a range request only
        built = airgap("build", spec(tmp_path, wheelhouse, "auto"), "--key", keys.private, "-o", tmp_path / "d",
                       "-q", "--hub-endpoint", hub.endpoint, "--target", target, env=env)
        assert built.code == 0, built.stderr
        big_gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("tiny-F16.gguf")]
        assert big_gets and all(r.range == "bytes=0-2097151" for r in big_gets)
    out = built.stdout.splitlines()
    assert any(line.startswith("model tiny: chose Q8_0 (0.0 GB), the largest of 2 quantizations that fits the "
                               "target's 2.7 GB of available RAM; larger ones do not fit: F16 is ") for line in out)
    assert any(line.startswith("target: python ") and "engine cpu:" in line for line in out)
    bundle = Path(out[-1])

    shown = airgap("inspect", bundle)
    assert shown.code == 0 and "built for: python " in shown.stdout and "2.7 GB RAM" in shown.stdout
    manifest = json.loads(airgap("inspect", bundle, "--json").stdout)
    assert manifest["target"]["host"]["memory"]["total"] == 5 << 29
    assert manifest["target"]["engine"]["engine"] == "cpu"
    assert manifest["python"]["platforms"] == [json.loads(here.read_text())["platform"]["tags"][1]]
    model = next(f for f in manifest["files"] if f["kind"] == "model")
    assert model["source"] == {"type": "hub", "repo": REPO_ID, "commit": commit, "file": "tiny-Q8_0.gguf"}

    installed = airgap("install", bundle, "--trust", keys.public, "--prefix", prefix, "-q")
    assert installed.code == 0, installed.stderr
    # the host it was built for: no warning
    same = json.loads(airgap("plan", "--prefix", prefix, "--host-facts", target, "--json").stdout)
    assert same["host_check"]["warning"] is None and same["host_check"]["built_for"]["memory"]["total"] == 5 << 29
    # another host: older CPU level and another glibc -> one warning line, in text and in --json
    other = edited_probe(here, tmp_path / "other.json", cpu__x86_64_level=2, platform__glibc="2.31")
    text = airgap("plan", "--prefix", prefix, "--host-facts", other)
    assert text.code == 0, text.stderr
    warnings = [line for line in text.stdout.splitlines() if line.startswith("warning: this host differs")]
    assert len(warnings) == 1 and "CPU level x86-64-v2 here" in warnings[0] and "glibc 2.31 here" in warnings[0]
    as_json = json.loads(airgap("plan", "--prefix", prefix, "--host-facts", other, "--json").stdout)
    assert as_json["host_check"]["warning"] == warnings[0]
    assert as_json["host_check"]["driver"]["floor"] == 580


def test_auto_without_a_target_is_refused_in_one_line(tmp_path: Path, wheelhouse: Path, keys: KeyPair) -> None:
    result = airgap("build", spec(tmp_path, wheelhouse, "auto"), "--key", keys.private, "-o", tmp_path / "d", "-q")
    assert result.code != 0
    assert result.error_line == (
        "airgap: error: model 'tiny': file = 'auto' picks the largest quantization that fits a target host; "
        "pass --target PROBE.json (written by `airgap probe` on that host)")
