"""scripts/make_tiny_gguf.py writes a small model that llama.cpp really loads and generates from."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import gguf
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_tiny_gguf.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny_gguf", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


def test_same_seed_same_bytes(tmp_path: Path, script: ModuleType) -> None:
    first = script.make_tiny_gguf(tmp_path / "a.gguf", seed=7)
    second = script.make_tiny_gguf(tmp_path / "b.gguf", seed=7)
    other = script.make_tiny_gguf(tmp_path / "c.gguf", seed=8)

    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    assert first.stat().st_size < 1_000_000


def test_metadata_has_template_vocab_and_context(tmp_path: Path, script: ModuleType) -> None:
    path = script.make_tiny_gguf(tmp_path / "m.gguf", context_length=512)
    reader = gguf.GGUFReader(path)

    template = reader.get_field("tokenizer.chat_template")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    assert template is not None and "add_generation_prompt" in template.contents()
    assert tokens is not None and tokens.contents()[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens.contents()[3 + 0x41] == "<0x41>"
    assert reader.get_field("llama.context_length").contents() == 512  # type: ignore[union-attr]


def test_padding_adds_about_the_requested_size(tmp_path: Path, script: ModuleType) -> None:
    plain = script.make_tiny_gguf(tmp_path / "plain.gguf").stat().st_size
    padded = script.make_tiny_gguf(tmp_path / "padded.gguf", pad_mb=8).stat().st_size

    assert abs((padded - plain) - 8 * 2**20) < 2**20


def test_command_line_matches_the_function(tmp_path: Path, script: ModuleType) -> None:
    out = tmp_path / "cli.gguf"
    subprocess.run([sys.executable, str(SCRIPT), str(out), "--seed", "3", "--pad-mb", "1"], check=True)

    assert out.read_bytes() == script.make_tiny_gguf(tmp_path / "fn.gguf", seed=3, pad_mb=1).read_bytes()


def test_padding_is_streamed_with_flat_memory(tmp_path: Path) -> None:
    out = tmp_path / "big.gguf"
    measure = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}, {str(out)!r}, '--pad-mb', '256']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
        # VmHWM, not ru_maxrss: after fork+exec the latter may still carry the parent's (pytest's) peak
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    result = subprocess.run([sys.executable, "-c", measure], check=True, capture_output=True, text=True)
    peak_kib = int(result.stdout.split()[-1])

    assert out.stat().st_size > 256 * 2**20
    assert peak_kib < 160 * 1024, f"peak RSS {peak_kib} KiB while writing a 256 MiB file"


@pytest.mark.parametrize("pad_mb", [0, 4])
def test_llama_cpp_loads_and_generates(tmp_path: Path, script: ModuleType, pad_mb: int) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = script.make_tiny_gguf(tmp_path / "m.gguf", seed=1, pad_mb=pad_mb)

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, seed=1)
    completion = llm("Hello", max_tokens=4, temperature=0.0)
    chat = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=4)

    assert completion["usage"]["completion_tokens"] >= 1
    assert chat["usage"]["prompt_tokens"] > len("<|user|>\nhi")  # the template wrapped the message
    assert llm.metadata["tokenizer.chat_template"] == script.CHAT_TEMPLATE
