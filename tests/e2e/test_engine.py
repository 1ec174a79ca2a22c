"""llama-server in the bundle, served behind the guard, driven by the real `openai` and `mistralai` SDKs.

One bundle for the module (SmolLM2-135M-Instruct as a chat model and as an embedding model), built by the
real `airgap build`, installed with no network and served by `airgap serve` in a network namespace with only
loopback. Each test runs its client inside that namespace.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airgap.hardware.target import GGML_CPU_VARIANTS
from tests.conftest import KeyPair
from tests.e2e.engine_support import API_KEY, Served, build_and_install, start_serving, stop_serving
from tests.support import airgap, host_cpu_variant

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

OPENAI = textwrap.dedent("""
    import json, sys
    import openai
    client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2], max_retries=0, timeout=120)
    HI = [{"role": "user", "content": "Say hello."}]
""")
MISTRAL = textwrap.dedent("""
    import json, sys
    try:
        from mistralai.client import Mistral
    except ImportError:
        from mistralai import Mistral
    client = Mistral(api_key=sys.argv[2], server_url=sys.argv[1], timeout_ms=120000)
    HI = [{"role": "user", "content": "Say hello."}]
""")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Time in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}
RAW = textwrap.dedent("""
    import json, sys, urllib.request, urllib.error
    def call(path, body, key=sys.argv[2], method="POST", headers=None):
        request = urllib.request.Request(sys.argv[1] + path, data=body, method=method,
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                                  **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("engine")
    bundle, prefix = build_and_install(folder, keys.private, keys.public)
    server = start_serving(prefix, bundle, folder / "serve.log")
    yield server
    stop_serving(server)


def test_the_bundle_carries_a_portable_engine_installed_executable(served: Served) -> None:
    manifest = json.loads((served.prefix / "current" / "manifest.json").read_text())
    engine = {f["path"]: f for f in manifest["files"] if f["kind"] == "engine"}
    names = {Path(p).name for p in engine}
    best = host_cpu_variant()
    assert {"llama-server", "libstdc++.so.6", "libgcc_s.so.1", "libgomp.so.1"} <= names
    plan = json.loads(airgap("plan", "--prefix", served.prefix, "--json").stdout)
    carried = [v for v in GGML_CPU_VARIANTS if v in ("x64", best)]
    assert plan["host_check"]["cpu_variant"] == {"carried": carried, "runs": best, "best": best, "warning": None}
    # the spec's [engine] cpu_variants (this host's variant), and x64 for any other x86-64 host
    assert {n for n in names if n.startswith("libggml-cpu-")} == {"libggml-cpu-x64.so", f"libggml-cpu-{best}.so"}
    source = engine["engine/llama-server"]["source"]
    assert source["variants"] == " ".join(v for v in GGML_CPU_VARIANTS if v in ("x64", best))
    assert source["type"] == "built" and source["from"] == "llama_cpp_python-0.3.36.tar.gz"
    assert "GGML_BACKEND_DL=ON" in source["cmake_defines"] and "LLAMA_OPENSSL=OFF" in source["cmake_defines"]
    floor = tuple(map(int, source["glibc_floor"].split(".")))
    assert (2, 34) <= floor <= tuple(map(int, os.confstr("CS_GNU_LIBC_VERSION").split()[-1].split(".")))
    binary = served.prefix / "current" / "engine" / "llama-server"
    assert not binary.is_symlink() and stat.S_IMODE(binary.stat().st_mode) == 0o555
    store = served.prefix / "store" / "sha256" / engine["engine/llama-server"]["sha256"]
    assert not os.access(store, os.X_OK)  # the shared store never holds an executable
    dynamic = subprocess.run(["readelf", "-d", "-W", str(binary)], capture_output=True, text=True, check=True)
    assert "Library runpath: [$ORIGIN]" in dynamic.stdout and "libssl" not in dynamic.stdout
    # the CPU variant ggml chose on this host: the one airgap's table says ggml scores highest here, and
    # it computes (the chat tests below get tokens from it)
    engines = subprocess.run(["pgrep", "-P", str(served.process.pid), "-f", "llama-server"], capture_output=True,
                             text=True, check=True).stdout.split()
    for pid in engines:
        maps = Path(f"/proc/{pid}/maps").read_text()
        variants = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "libggml-cpu-" in line}
        assert variants == {f"libggml-cpu-{best}.so"}, variants
        assert str(served.prefix) in maps  # the engine's libraries come from the installed version
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"--api-key" not in argv and b"--offline" in argv and b"--kv-unified" in argv
        assert any(v.startswith(b"LLAMA_API_KEY=") for v in environ)  # its own key, in its environment
        assert not any(API_KEY.encode() in v for v in [*argv, *environ])  # never the clients' key


def test_openai_sdk_chat_stream_usage_and_max_completion_tokens(served: Served) -> None:
    outcome = served.json(OPENAI + textwrap.dedent("""
        models = [(m.id, getattr(m, "type", None)) for m in client.models.list().data]
        reply = client.chat.completions.create(model="smol", messages=HI, max_completion_tokens=5, seed=7,
                                               temperature=0.8)
        again = client.chat.completions.create(model="smol", messages=HI, max_completion_tokens=5, seed=7,
                                               temperature=0.8)
        chunks = list(client.chat.completions.create(model="smol", messages=HI, max_completion_tokens=6,
                                                     stream=True, stream_options={"include_usage": True}))
        plain = list(client.chat.completions.create(model="smol", messages=HI, max_tokens=4, stream=True))
        probs = client.chat.completions.create(model="smol", messages=HI, max_tokens=3, logprobs=True,
                                               top_logprobs=2)
        print(json.dumps({"models": models, "tokens": reply.usage.completion_tokens,
                          "same": reply.choices[0].message.content == again.choices[0].message.content,
                          "last_usage": chunks[-1].usage.completion_tokens if chunks[-1].usage else None,
                          "plain_usage": [c.usage for c in plain if c.usage],
                          "logprobs": len(probs.choices[0].logprobs.content)}))
    """))
    assert isinstance(outcome, dict)
    assert outcome["models"] == [["smol", "base"], ["smol-embed", "base"], ["tiny-code", "base"]]
    assert 1 <= outcome["tokens"] <= 5 and outcome["same"] is True
    assert 1 <= outcome["last_usage"] <= 6 and outcome["plain_usage"] == []
    assert outcome["logprobs"] >= 1


def test_openai_tools_every_tool_choice_and_json_schema(served: Served) -> None:
    outcome = served.json(OPENAI + f"TOOLS = {[WEATHER, CLOCK]!r}\n" + textwrap.dedent("""
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        def names(choice):
            reply = client.chat.completions.create(model="smol", messages=ask, tools=TOOLS, tool_choice=choice,
                                                   max_tokens=96, temperature=0)
            calls = reply.choices[0].message.tool_calls or []
            return [(c.function.name, json.loads(c.function.arguments)) for c in calls]
        schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                  "additionalProperties": False}
        structured = client.chat.completions.create(
            model="smol", messages=ask, max_tokens=64, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
        obj = client.chat.completions.create(model="smol", messages=ask, max_tokens=48, temperature=0,
                                             response_format={"type": "json_object"})
        print(json.dumps({"required": names("required"),
                          "named": names({"type": "function", "function": {"name": "get_time"}}),
                          "none": names("none"), "auto_ok": isinstance(names("auto"), list),
                          "structured": json.loads(structured.choices[0].message.content),
                          "object": isinstance(json.loads(obj.choices[0].message.content), dict)}))
    """))
    assert isinstance(outcome, dict)
    assert [name for name, _ in outcome["required"]] and all(n in ("get_weather", "get_time")
                                                              for n, _ in outcome["required"])
    assert [name for name, _ in outcome["named"]] and {n for n, _ in outcome["named"]} == {"get_time"}
    assert outcome["none"] == [] and outcome["auto_ok"] is True
    assert set(outcome["structured"]) == {"city"} and isinstance(outcome["structured"]["city"], str)
    assert outcome["object"] is True


def test_n_above_one(served: Served) -> None:
    outcome = served.json(OPENAI + textwrap.dedent("""
        reply = client.chat.completions.create(model="smol", messages=HI, max_tokens=4, n=2)
        try:
            client.chat.completions.create(model="smol", messages=HI, max_tokens=4, n=50)
            refused = None
        except openai.BadRequestError as error:
            refused = error.body["message"]
        print(json.dumps({"choices": len(reply.choices), "refused": refused}))
    """))
    assert outcome == {"choices": 2, "refused": "Field 'n' is 50; this server returns between 1 and 4 choices "
                                                "per request for model 'smol'."}


def test_mistral_sdk_models_chat_tools_stream_fim_and_embeddings(served: Served) -> None:
    outcome = served.json(MISTRAL + f"TOOLS = {[WEATHER]!r}\n" + textwrap.dedent("""
        models = [(m.id, m.type) for m in client.models.list().data]
        reply = client.chat.complete(model="smol", messages=HI, max_tokens=5, random_seed=3, safe_prompt=True)
        again = client.chat.complete(model="smol", messages=HI, max_tokens=5, random_seed=3, safe_prompt=True)
        forced = client.chat.complete(model="smol", messages=[{"role": "user", "content": "Weather in Rome?"}],
                                      tools=TOOLS, tool_choice="any", max_tokens=96, temperature=0)
        calls = [c.function.name for c in forced.choices[0].message.tool_calls or []]
        events = list(client.chat.stream(model="smol", messages=HI, max_tokens=6))
        last = events[-1].data
        fim = client.fim.complete(model="tiny-code", prompt="def add(a, b):\\n    return ", suffix="\\n",
                                  max_tokens=8)
        try:
            client.fim.complete(model="smol", prompt="x = ", suffix="", max_tokens=4)
            no_fim = None
        except Exception as error:
            no_fim = getattr(error, "status_code", repr(error))
        embedded = client.embeddings.create(model="smol-embed", inputs=["hello", "world"])
        print(json.dumps({"models": models, "tokens": reply.usage.completion_tokens,
                          "same": reply.choices[0].message.content == again.choices[0].message.content,
                          "calls": calls, "last_usage": last.usage.completion_tokens if last.usage else None,
                          "last_finish": last.choices[0].finish_reason if last.choices else None,
                          "fim": isinstance(fim.choices[0].message.content, str),
                          "fim_tokens": fim.usage.completion_tokens, "no_fim": no_fim,
                          "vectors": [len(d.embedding) for d in embedded.data]}))
    """))
    assert isinstance(outcome, dict)
    assert outcome["models"] == [["smol", "base"], ["smol-embed", "base"], ["tiny-code", "base"]]
    assert 1 <= outcome["tokens"] <= 5 and outcome["same"] is True
    assert outcome["calls"] == ["get_weather"]
    assert 1 <= outcome["last_usage"] <= 6 and outcome["last_finish"] in ("stop", "length")
    assert outcome["fim"] is True and 1 <= outcome["fim_tokens"] <= 8
    assert outcome["no_fim"] == 400  # SmolLM2 has no fill-in-the-middle tokens: a client error, not a 500
    assert outcome["vectors"] == [576, 576]  # SmolLM2-135M's embedding width


def test_openai_embeddings(served: Served) -> None:
    outcome = served.json(OPENAI + textwrap.dedent("""
        reply = client.embeddings.create(model="smol-embed", input=["a", "b", "c"])
        print(json.dumps([len(d.embedding) for d in reply.data]))
    """))
    assert outcome == [576, 576, 576]


def test_bad_requests_get_4xx_with_openai_bodies_and_the_server_keeps_serving(served: Served) -> None:
    outcome = served.json(RAW + textwrap.dedent("""
        import socket
        results = {}
        results["malformed"] = call("/v1/chat/completions", b'{"model": "smol", "messages": [')
        results["unknown_model"] = call("/v1/chat/completions", json.dumps(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode())
        import http.client
        port = int(sys.argv[1].rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Authorization", f"Bearer {sys.argv[2]}"), ("Content-Type", "application/json"),
                            ("Content-Length", str(17 << 20))):
            connection.putheader(name, value)
        connection.endheaders()
        try:
            for _ in range(17):
                connection.send(b" " * (1 << 20))
        except OSError:
            pass  # the server answered and closed before taking it all
        reply = connection.getresponse()
        results["huge"] = [reply.status, reply.read().decode()]
        results["negative"] = call("/v1/chat/completions", json.dumps(
            {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).encode())
        results["absurd"] = call("/v1/chat/completions", json.dumps(
            {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}).encode())
        results["too_long"] = call("/v1/chat/completions", json.dumps(
            {"model": "smol", "messages": [{"role": "user", "content": "word " * 60000}], "max_tokens": 4}).encode())
        results["unknown_fields"] = call("/v1/chat/completions", json.dumps(
            {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
             "frobnicate": {"x": 1}}).encode())
        results["no_key"] = call("/v1/models", None, key="wrong-key-0000000000", method="GET")
        results["metrics"] = call("/metrics", None, method="GET")
        results["metrics_no_key"] = call("/metrics", None, key="wrong-key-0000000000", method="GET")
        results["engine_only_path"] = call("/slots", None, method="GET")
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /v1/models HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n")
        results["websocket"] = [0, sock.recv(200).split(b"\\r\\n")[0].decode()]
        results["after"] = call("/v1/chat/completions", json.dumps(
            {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode())
        print(json.dumps(results))
    """))
    assert isinstance(outcome, dict)
    status = {name: code for name, (code, _) in outcome.items()}
    assert status == {"malformed": 400, "unknown_model": 404, "huge": 413, "negative": 400, "absurd": 400,
                      "too_long": 400, "unknown_fields": 200, "no_key": 401, "metrics": 200, "metrics_no_key": 401,
                      "engine_only_path": 404, "websocket": status["websocket"], "after": 200}
    assert outcome["websocket"][1].startswith("HTTP/1.1 4")  # refused (403, or 401 without a key), never 101
    for name in ("malformed", "unknown_model", "huge", "negative", "absurd", "too_long", "no_key"):
        body: dict[str, Any] = json.loads(outcome[name][1])
        assert set(body["error"]) == {"message", "type", "param", "code"}, name
        assert "/" not in body["error"]["message"] or name == "unknown_model", body
    assert json.loads(outcome["unknown_model"][1])["error"]["code"] == "model_not_found"
    assert "llamacpp:prompt_tokens_total" in outcome["metrics"][1]


def test_a_crashed_engine_is_restarted(served: Served) -> None:
    # unshare and sh exec into `airgap serve`, which execs the server: one PID all along
    found = subprocess.run(["pgrep", "-P", str(served.process.pid), "-f", "llama-server.*--alias smol "],
                           capture_output=True, text=True, check=False)
    pid = int(found.stdout.split()[0])
    os.kill(pid, 9)
    outcome = served.json(OPENAI + textwrap.dedent("""
        import time
        for _ in range(600):
            try:
                reply = client.chat.completions.create(model="smol", messages=HI, max_tokens=2)
                break
            except (openai.APIStatusError, openai.APIConnectionError) as error:
                time.sleep(0.2)
        print(json.dumps({"tokens": reply.usage.completion_tokens}))
    """))
    assert isinstance(outcome, dict) and 1 <= outcome["tokens"] <= 2
    assert served.process.poll() is None
    again = subprocess.run(["pgrep", "-P", str(served.process.pid), "-f", "llama-server.*--alias smol "],
                           capture_output=True, text=True, check=False)
    assert again.stdout.split() and int(again.stdout.split()[0]) != pid


def test_a_client_that_goes_away_frees_its_slot_at_once(served: Served) -> None:
    outcome = served.json(RAW + textwrap.dedent("""
        import http.client, re, time
        port = int(sys.argv[1].rsplit(":", 1)[1])
        def processing():
            text = call("/metrics", None, method="GET")[1]
            return int(float(re.search(r"^llamacpp:requests_processing (\\S+)", text, re.M).group(1)))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": "smol", "messages": [{"role": "user", "content": "Count to ten thousand."}], "stream": True,
            "max_tokens": 4000, "logit_bias": {"2": -100}}),
            headers={"Authorization": f"Bearer {sys.argv[2]}", "Content-Type": "application/json"})
        reply = connection.getresponse()
        reply.fp.readline()
        busy = processing()
        connection.sock.close()
        connection.close()
        started = time.monotonic()
        while processing() and time.monotonic() - started < 10:
            time.sleep(0.05)
        print(json.dumps({"busy": busy, "freed_after_s": time.monotonic() - started, "left": processing()}))
    """))
    assert isinstance(outcome, dict)
    assert outcome["busy"] == 1 and outcome["left"] == 0 and outcome["freed_after_s"] < 2


def test_stopping_serve_stops_every_engine(served: Served, tmp_path: Path) -> None:
    other = start_serving(served.prefix, served.bundle, tmp_path / "serve.log", port=18091)
    engines = subprocess.run(["pgrep", "-P", str(other.process.pid), "-f", "llama-server"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(engines) == 3
    stop_serving(other)
    deadline = time.monotonic() + 10
    while (alive := [pid for pid in engines if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive == []
    assert "restarting" not in other.log.read_text()  # a stopping serve restarts nothing


def test_an_engine_that_keeps_crashing_makes_serve_exit_non_zero_for_systemd(served: Served) -> None:
    """Runs last in this module: it ends the module's server on purpose."""

    def engine_pid() -> int | None:
        found = subprocess.run(["pgrep", "-P", str(served.process.pid), "-f", "llama-server.*--alias smol "],
                               capture_output=True, text=True, check=False)
        return int(found.stdout.split()[0]) if found.stdout.split() else None

    earlier = served.log.read_text().count("llama-server for model 'smol' exited with status -9; restarting")
    killed: list[int] = []
    deadline = time.monotonic() + 120
    while served.process.poll() is None and time.monotonic() < deadline:
        pid = engine_pid()
        if pid is not None and pid not in killed:
            os.kill(pid, 9)
            killed.append(pid)
        time.sleep(0.1)
    assert served.process.poll() == 1, served.log.read_text()[-2000:]
    assert earlier + len(killed) == 4  # three restarts, then the fourth crash within 5 minutes ends serve
    assert "exited with status -9 4 times within 300 s" in served.log.read_text()
    deadline = time.monotonic() + 10
    while (left := [p for p in _engines_of(served.prefix) if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []  # no engine outlives serve


def _engines_of(prefix: Path) -> list[str]:
    return subprocess.run(["pgrep", "-f", f"{prefix}/versions/.*/llama-server"], capture_output=True, text=True,
                          check=False).stdout.split()


def _running(pid: str) -> bool:
    """Alive and not a zombie waiting for its new parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
