"""Fixtures for serve tests: a tiny real GGUF model and a fake installed prefix around it.

The model has random weights, so what it says is noise; what matters is that llama.cpp loads it, applies its
chat template and generates tokens, exactly as it would for a real model.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The virtualenv running the tests (scripts/test.sh uses the checkout's own .venv), wherever it lies.
TEST_VENV = Path(sys.prefix)

TINY_CONTEXT = 4096
TINY_LAYERS = 2
TINY_WIDTH = 64
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_FFN = 128
EOS_TOKEN_ID = 2
BYTE_TOKEN_OFFSET = 3  # token 3 + b is the byte b

# Request-side logit bias for the random model: never stop by chance, and emit only ASCII bytes. Random bytes
# are mostly invalid UTF-8, which llama-cpp-python's streaming path retries to decode on every token (cubic
# time); a real model emits valid UTF-8 and never hits that.
STEADY_ASCII = {str(EOS_TOKEN_ID): -100.0, **{str(BYTE_TOKEN_OFFSET + b): -100.0 for b in range(128, 256)}}

# ChatML, the template most chat models ship; llama-cpp-python renders it from the GGUF's metadata.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_vocab() -> tuple[list[str], list[int]]:
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    return tokens, [int(t) for t in types]


FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def write_tiny_gguf(path: Path, seed: int = 0, fim: bool = False) -> Path:
    """A random-weight llama model (2 layers of width 64, byte vocab, ChatML template) that llama.cpp runs;
    with `fim`, also fill-in-the-middle tokens, so that llama-server's /infill accepts it."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, types = byte_vocab()
    if fim:
        tokens += list(FIM_TOKENS)
        types += [int(gguf.TokenType.CONTROL)] * len(FIM_TOKENS)
    head_dim = TINY_WIDTH // TINY_HEADS
    kv_width = TINY_KV_HEADS * head_dim
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("airgap-tiny")
    writer.add_context_length(TINY_CONTEXT)
    writer.add_embedding_length(TINY_WIDTH)
    writer.add_block_count(TINY_LAYERS)
    writer.add_feed_forward_length(TINY_FFN)
    writer.add_head_count(TINY_HEADS)
    writer.add_head_count_kv(TINY_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(0)  # ALL_F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    writer.add_chat_template(CHAT_TEMPLATE)
    if fim:
        for name, token in zip(("pre", "suf", "mid"), FIM_TOKENS, strict=True):
            writer.add_uint32(f"tokenizer.ggml.fim_{name}_token_id", tokens.index(token))

    def weight(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), TINY_WIDTH))
    writer.add_tensor("output_norm.weight", np.ones(TINY_WIDTH, dtype=np.float32))
    writer.add_tensor("output.weight", weight(len(tokens), TINY_WIDTH))
    for i in range(TINY_LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(TINY_WIDTH, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(TINY_WIDTH, TINY_WIDTH))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_width, TINY_WIDTH))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_width, TINY_WIDTH))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(TINY_WIDTH, TINY_WIDTH))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(TINY_WIDTH, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(TINY_FFN, TINY_WIDTH))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(TINY_FFN, TINY_WIDTH))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(TINY_WIDTH, TINY_FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass(frozen=True)
class TestInstall:
    prefix: Path
    model_ids: tuple[str, ...]
    version: Path  # the installed version's folder, versions/<generation>


def make_installed_prefix(
    root: Path, model_ids: tuple[str, ...] = ("tiny-chat",), venv: Path = TEST_VENV,
) -> TestInstall:
    """A prefix made by the real code paths: tiny GGUFs, their metadata read by the builder's GGUF reader, a
    signed bundle from the real writer, installed by `install_bundle`. The bundle carries no wheels (a
    llama.cpp build per test would take minutes), so the one hand-made piece is the version's `venv`: a link
    to `venv`, the test environment that has llama-cpp-python."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from airgap.build.sources.gguf_meta import read_gguf_metadata
    from airgap.format.manifest import ModelEntry, check_gguf
    from airgap.prefix.install import install_bundle
    from airgap.trust.signing import TrustPolicy
    from tests.support import make_test_bundle

    work = root / "bundle"
    work.mkdir(parents=True)
    files: dict[str, bytes] = {}
    models: list[ModelEntry] = []
    for n, model_id in enumerate(model_ids):
        local = write_tiny_gguf(work / f"model-{n}.gguf", seed=n)
        rel = f"models/{model_id}/{model_id}.gguf"
        files[rel] = local.read_bytes()
        models.append(ModelEntry(id=model_id, files=(rel,), gguf=check_gguf(model_id, read_gguf_metadata(local))))
    key = Ed25519PrivateKey.generate()
    now = datetime.now(UTC).replace(microsecond=0)
    bundle = make_test_bundle(work, files, key, name="tiny", version="1.0.0", expires_days=30,
                              models=tuple(models), created=now)
    prefix = root / "prefix"
    report = install_bundle(bundle, prefix, TrustPolicy((key.public_key(),)), progress=False)
    version = prefix / "versions" / report.generation.id
    (version / "venv").symlink_to(venv)
    return TestInstall(prefix=prefix, model_ids=model_ids, version=version)


def overlay_venv(root: Path, venv: Path = TEST_VENV) -> Path:
    """A venv that imports this checkout's airgap first and everything else from `venv`.

    Stands in for the installed venv (which has airgap itself installed) where a test must not pass
    PYTHONPATH, e.g. when `serve()` builds the server's environment itself.
    """
    import subprocess
    import sysconfig

    target = root / "venv"
    subprocess.run([str(venv / "bin" / "python"), "-m", "venv", "--without-pip", str(target)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(target), "platbase": str(target)}))
    worktree = Path(__file__).resolve().parents[2]
    base_site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "00-airgap-checkout.pth").write_text(f"{worktree}\n{base_site}\n")
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worktree_env() -> dict[str, str]:
    """Let the served venv import this checkout's airgap rather than the one installed there."""
    return {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def environ_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET; (0, b"") when nothing answers."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on `port`, read from /proc/net/tcp{,6}."""
    import ipaddress

    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] != "0A" or int(hex_port, 16) != port or len(address) != width:
                continue
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, width, 8))
            found.add(str(ipaddress.ip_address(raw)))
    return found


def offline_roundtrip(prefix: Path) -> dict[str, Any]:
    """Serve `prefix` and chat with it once; meant to run inside `unshare -n` (only loopback up)."""
    import openai

    from airgap.serve import prepare_server, start_server

    outside: str
    try:
        with socket.create_connection(("192.0.2.1", 80), timeout=2):
            outside = "connected"
    except OSError as exc:
        outside = exc.strerror or str(exc)
    key = "offline-test-key-0123456789"
    launch = prepare_server(prefix, port=free_port(), environ={"AIRGAP_API_KEY": key, "PATH": os.defpath},
                            extra_env=worktree_env())
    server = start_server(launch)
    try:
        wait_until(lambda: server.poll() is not None or http_get(launch.base_url + "/health")[0] == 200, 60,
                   "the server to answer /health")
        client = openai.OpenAI(base_url=launch.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model=launch.config.model_ids[0], messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        )
        return {"outside": outside, "model": reply.model, "completion_tokens": reply.usage.completion_tokens
                if reply.usage else 0, "server_alive": server.poll() is None}
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(offline_roundtrip(Path(sys.argv[1]))))
