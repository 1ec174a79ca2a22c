"""The whole product on a tiny model: build with llama-cpp-python from the package registry and weights
from the hub stand-in, install with no network, serve with no network, and talk to it with the official
`openai` client, as an app written for a hosted API would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import KeyPair
from tests.hubsim import HubSim
from tests.support import REPO, airgap, engine_table

CLIENT = textwrap.dedent("""
    import json, sys, time, urllib.request
    import openai
    base = f"http://127.0.0.1:{sys.argv[1]}"
    for _ in range(600):
        try:
            if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.2)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)
    models = [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, stream=True))
    try:
        urllib.request.urlopen("http://192.0.2.1/", timeout=2)
        outside = "reached"
    except OSError as exc:
        outside = str(exc)
    print(json.dumps({"models": models, "reply_model": reply.model, "tokens": reply.usage.completion_tokens,
                      "stream_chunks": len(chunks), "outside": outside}))
""")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a fresh machine compiles llama-cpp-python once (minutes on two cores)
def test_build_install_serve_offline(tmp_path: Path, tiny_model: Path, keys: KeyPair) -> None:
    spec = tmp_path / "tiny-chat.toml"
    spec.write_text(
        '[bundle]\nname = "tiny-chat"\nversion = "1.0.0"\n\n'
        '[[models]]\nid = "tiny"\nrepo = "acme/tiny-GGUF"\nfile = "tiny.gguf"\n\n'
        '[python]\nrequirements = ["llama-cpp-python[server]==0.3.36"]\n\n' + engine_table()
    )
    with HubSim() as hub:
        hub.add_repo("acme/tiny-GGUF", {"tiny.gguf": tiny_model})
        built = airgap("build", spec, "--key", keys.private, "-o", tmp_path / "dist", "-q", "--hub-endpoint",
                       hub.endpoint, env={"HF_HOME": str(tmp_path / "hf")}, timeout=3600)
    assert built.code == 0, built.stderr[-3000:]
    bundle = Path(built.stdout.split()[-1])
    manifest = json.loads(airgap("inspect", bundle, "--json").stdout)
    llama = next(f for f in manifest["files"] if f["path"].startswith("wheels/llama_cpp_python-"))
    assert llama["source"]["type"] == "built" and "GGML_NATIVE=OFF" in llama["source"]["cmake_args"]
    assert spec.with_name("tiny-chat.toml.lock").is_file()

    prefix = tmp_path / "prefix"
    installed = airgap("install", bundle, "--trust", keys.public, "--prefix", prefix, "-q", no_network=True)
    assert installed.code == 0, installed.stderr[-3000:]
    python = prefix / "current" / "venv" / "bin" / "python"
    model = prefix / "current" / "models" / "tiny" / "tiny.gguf"
    load = subprocess.run(["unshare", "-n", str(python), "-c",
                           f"import llama_cpp; m = llama_cpp.Llama({str(model)!r}, verbose=False); "
                           "print(m.n_vocab())"], capture_output=True, text=True, check=False)
    assert load.returncode == 0 and int(load.stdout) == 259, load.stderr[-2000:]

    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    port = "18087"
    script = (f"ip link set lo up && ({sys.executable} -m airgap serve --prefix {prefix} --port {port} "
              f"2>{tmp_path}/serve.log & echo $! > {tmp_path}/pid) && {sys.executable} {client} {port}; "
              f"status=$?; kill $(cat {tmp_path}/pid); exit $status")
    done = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["models"] == ["tiny"] and outcome["reply_model"] == "tiny"
    assert outcome["tokens"] > 0 and outcome["stream_chunks"] > 1
    assert "unreachable" in outcome["outside"]
