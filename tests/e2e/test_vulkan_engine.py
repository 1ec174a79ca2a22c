"""The Vulkan engine end to end: `airgap build` with `[engine] vulkan = true` compiles the Vulkan ggml backend of
the pinned llama.cpp, packs it with the Vulkan loader beside llama-server, and the installed bundle plans and
serves on the CPU of this GPU-less host with its one line. Where Mesa's software Vulkan driver (lavapipe) is
installed, the installed engine also offloads every layer to it and answers: the carried backend and loader run
on a real Vulkan driver, with nothing else from the bundle's side.

Opt-in: the build takes a quarter of an hour or more on 2 cores and needs a Vulkan toolchain (glslc and headers
that define VK_EXT_layer_settings, found as `airgap build` finds them, e.g. through VULKAN_SDK). It runs when
AIRGAP_TEST_VULKAN=1, or when that build is already in the engine cache; otherwise it is skipped and says so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from airgap.build.sources import vulkan
from airgap.build.sources.engine import default_cache_dir
from airgap.errors import ResolveError
from tests.conftest import KeyPair
from tests.e2e.engine_support import serve_one_chat, smollm2_gguf, write_engine_spec
from tests.e2e.serve_support import free_port
from tests.support import airgap

SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # llama-cpp-python 0.3.36
VULKAN_FILES = {"libggml-vulkan.so", "libvulkan.so.1"}
LAVAPIPE = Path("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json")


def _vulkan_build_cached() -> bool:
    try:
        toolchain = vulkan.find_toolchain(os.environ)
        return vulkan.find_cached_vulkan(default_cache_dir(), SDIST_VERSION, SDIST_SHA256, toolchain) is not None
    except ResolveError:  # no toolchain here, or a damaged cache entry: not "cached"
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(7200),  # the suite's 900 s per test would stop the compile it exists to run
    pytest.mark.skipif(
        os.environ.get("AIRGAP_TEST_VULKAN") != "1" and not _vulkan_build_cached(),
        reason="the Vulkan backend build takes 15+ minutes on 2 cores and a Vulkan toolchain: set "
               "AIRGAP_TEST_VULKAN=1 to run it (it also runs once that build is in the engine cache)"),
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("vulkan")
    spec = write_engine_spec(folder, smollm2_gguf())
    spec.write_text(spec.read_text() + "vulkan = true\n")  # to its [engine] table
    built = airgap("build", spec, "--key", keys.private, "-o", folder / "dist", "-q", timeout=7200)
    assert built.code == 0, built.stderr[-3000:]
    bundle = Path(built.stdout.split()[-1])
    prefix = folder / "prefix"
    done = airgap("install", bundle, "--trust", keys.public, "--prefix", prefix, "-q", no_network=True)
    assert done.code == 0, done.stderr[-3000:]
    return prefix, bundle


def test_a_vulkan_bundle_carries_backend_and_loader_and_serves_on_cpu_without_a_gpu(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    prefix, bundle = installed
    manifest = json.loads((prefix / "current" / "manifest.json").read_text())
    engine = {Path(f["path"]).name: f for f in manifest["files"] if f["kind"] == "engine"}
    assert set(engine) >= VULKAN_FILES | {"llama-server"}
    cached = vulkan.find_cached_vulkan(default_cache_dir(), SDIST_VERSION, SDIST_SHA256,
                                       vulkan.find_toolchain(os.environ))
    assert cached is not None
    for file in cached.files:  # the bundle carries the cached build byte for byte
        assert (engine[file.name]["size"], engine[file.name]["sha256"]) == (file.size, file.sha256)
    source = engine["libggml-vulkan.so"]["source"]
    assert "GGML_VULKAN=ON" in source["cmake_defines"] and float(source["build_seconds"]) > 0
    assert source["vulkan_toolchain"].startswith("shaderc") and "Vulkan headers " in source["vulkan_toolchain"]
    assert engine["llama-server"]["source"]["sdist_sha256"] == source["sdist_sha256"] == SDIST_SHA256
    dynamic = subprocess.run(["readelf", "-d", "-W", str(prefix / "current" / "engine" / "libggml-vulkan.so")],
                             capture_output=True, text=True, check=True).stdout
    assert "Library runpath: [$ORIGIN]" in dynamic and "[libvulkan.so.1]" in dynamic

    planned = airgap("plan", "--prefix", prefix)
    assert planned.code == 0, planned.stderr[-2000:]
    assert planned.stderr.strip() == "airgap plan: no usable NVIDIA GPU (none found on this host): serving on the CPU"
    assert 1 <= serve_one_chat(prefix, bundle, tmp_path / "serve.log")["completion_tokens"] <= 3


@pytest.mark.skipif(not LAVAPIPE.is_file(), reason=f"no software Vulkan driver here ({LAVAPIPE}; Debian package "
                                                     "mesa-vulkan-drivers)")
def test_the_installed_vulkan_engine_offloads_to_a_real_vulkan_driver(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    prefix, _ = installed
    folder = prefix / "current" / "engine"
    model = next(p for p in (prefix / "current").rglob("*.gguf") if "tiny" not in p.name)  # SmolLM2
    # ggml takes only GPUs by default; lavapipe is a CPU-type Vulkan device, so it is asked for by index
    env = {"PATH": os.environ["PATH"], "GGML_VK_VISIBLE_DEVICES": "0", "HOME": str(tmp_path)}
    listed = subprocess.run([str(folder / "llama-server"), "--list-devices"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert "Vulkan0: llvmpipe" in listed.stdout + listed.stderr, listed.stderr[-2000:]
    port = free_port()
    log = tmp_path / "engine.log"
    with open(log, "wb") as sink:
        engine = subprocess.Popen([str(folder / "llama-server"), "--model", str(model), "--device", "Vulkan0",
                                   "--n-gpu-layers", "99", "--ctx-size", "512", "--host", "127.0.0.1",
                                   "--port", str(port), "--offline", "--no-webui", "-lv", "4"], env=env, stdout=sink,
                                  stderr=subprocess.STDOUT)
    try:
        answer = _complete(f"http://127.0.0.1:{port}", engine)
        assert answer["tokens_predicted"] == 4 and answer["content"]
        text = log.read_text(errors="replace")
        # the one device it was given is lavapipe, so `--n-gpu-layers 99` puts every layer there (this build's
        # log does not print the placement; an unknown `--device` name stops llama-server at start instead)
        assert re.search(r"- Vulkan0 : llvmpipe .*MiB free", text), text[-3000:]
    finally:
        engine.terminate()
        engine.wait(timeout=30)


def _complete(base: str, engine: subprocess.Popen[bytes]) -> dict[str, object]:
    deadline = time.monotonic() + 300
    body = json.dumps({"prompt": "The capital of France is", "n_predict": 4}).encode()
    while True:
        assert engine.poll() is None, "llama-server exited"
        try:
            request = urllib.request.Request(base + "/completion", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as reply:
                answer: dict[str, object] = json.loads(reply.read())
                return answer
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
