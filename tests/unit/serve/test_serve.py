from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from airgap.errors import ServeError
from airgap.format.manifest import FileEntry
from airgap.hardware.facts import GpuInfo, HostInfo
from airgap.hardware.sizing import NO_CHOICES, RUNTIME_VRAM_PER_GPU, PlanChoices, make_plan
from airgap.serve import (
    API_KEY_ENV,
    OFFLINE_ENV,
    SERVER_CONFIG_ENV,
    Guard,
    Installation,
    Message,
    Scope,
    ServerConfig,
    _plans,
    active_models,
    cpu_fallback_line,
    engine_settings,
    is_loopback,
    load_api_key,
    model_settings,
    plan_for,
    plans_json,
    prepare_server,
    read_installation,
    render_service,
    runtime_supports_gpu,
    sd_notify,
    select_models,
    start_server,
    systemd_quote,
    watchdog_interval,
)
from airgap.serve.engine import EngineModel, engine_argv
from tests.e2e import serve_support as support
from tests.support import REPO

KEY = "test-key-0123456789abcdef"
HOST = HostInfo(ram_total=8 << 30, ram_available=7 << 30, cpus=2, cores=2)


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> support.TestInstall:
    return support.make_installed_prefix(tmp_path_factory.mktemp("serve"), ("tiny-chat", "tiny-two"))


# --- the installed layout ------------------------------------------------------------------------------

def test_active_models_reads_the_current_version(install: support.TestInstall) -> None:
    models = active_models(install.prefix)
    assert [m.id for m in models] == ["tiny-chat", "tiny-two"]
    root = install.version.resolve()
    assert models[0].path == root / "models" / "tiny-chat" / "tiny-chat.gguf"
    assert models[0].size == models[0].path.stat().st_size
    assert models[0].shape().n_layer == support.TINY_LAYERS


def test_the_version_is_pinned_when_read(install: support.TestInstall) -> None:
    assert read_installation(install.prefix).root == install.version.resolve()
    assert read_installation(install.prefix).python == install.version / "venv" / "bin" / "python"


def test_missing_installation_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="no installed version"):
        active_models(tmp_path)


def test_a_truncated_model_file_is_caught(tmp_path: Path) -> None:
    fake = support.make_installed_prefix(tmp_path)
    target = (fake.prefix / "current" / "models" / "tiny-chat" / "tiny-chat.gguf").resolve()
    with target.open("r+b") as stream:
        stream.truncate(1000)
    with pytest.raises(ServeError, match="1000 bytes, the manifest says"):
        active_models(fake.prefix)


def test_select_models_by_id(install: support.TestInstall) -> None:
    models = active_models(install.prefix)
    assert select_models(models, None) == models
    assert [m.id for m in select_models(models, "tiny-two")] == ["tiny-two"]
    with pytest.raises(ServeError, match=r"no model 'gpt-4'.*tiny-chat, tiny-two"):
        select_models(models, "gpt-4")


def test_split_gguf_is_opened_at_its_first_part(tmp_path: Path) -> None:
    from airgap.serve import _entry_point

    parts = tuple(tmp_path / f"m-0000{i}-of-00003.gguf" for i in (2, 1, 3))
    assert _entry_point("m", parts) == tmp_path / "m-00001-of-00003.gguf"
    with pytest.raises(ServeError, match="one split set"):
        _entry_point("m", (tmp_path / "a.gguf", tmp_path / "b.gguf"))


def test_gpu_support_is_read_from_the_venv_libraries(tmp_path: Path) -> None:
    lib = tmp_path / "lib" / "python3.11" / "site-packages" / "llama_cpp" / "lib"
    lib.mkdir(parents=True)
    (lib / "libggml-cpu.so").touch()
    assert not runtime_supports_gpu(tmp_path)
    (lib / "libggml-cuda.so").touch()
    assert runtime_supports_gpu(tmp_path)
    assert not runtime_supports_gpu(support.TEST_VENV)  # this machine's build is CPU only


def test_plan_for_plans_every_model(install: support.TestInstall) -> None:
    plans = plan_for(install.prefix, host=HOST)
    assert [p.model_id for p in plans] == ["tiny-chat", "tiny-two"]
    assert all(p.n_ctx == support.TINY_CONTEXT and p.n_gpu_layers == 0 for p in plans)
    forced = plan_for(install.prefix, "tiny-two", PlanChoices(n_ctx=512, threads=1), host=HOST)
    assert [(p.model_id, p.n_ctx, p.n_threads) for p in forced] == [("tiny-two", 512, 1)]
    document = json.loads(plans_json(plans, HOST))
    assert document["host"]["ram_total"] == HOST.ram_total
    assert [m["model_id"] for m in document["models"]] == ["tiny-chat", "tiny-two"]


# Recorded: an RTX 4090 as nvidia-smi reports it (24564 MiB, 482 MiB in use by the display), and drivers on
# each side of the CUDA 13 floor.
RTX_4090 = GpuInfo(index=0, name="NVIDIA GeForce RTX 4090", memory_total=24564 << 20, memory_free=24082 << 20,
                   compute_capability="8.9")
GPU_HOST = HostInfo(ram_total=64 << 30, ram_available=60 << 30, cpus=16, cores=8,
                    gpus=(RTX_4090, dataclasses.replace(RTX_4090, index=1)), driver_version="580.65.06")
OLD_DRIVER_HOST = dataclasses.replace(GPU_HOST, driver_version="550.54.15")
NO_GPU_HOST = dataclasses.replace(GPU_HOST, gpus=(), driver_version=None)


def with_engine(install: support.TestInstall, *libraries: str) -> Installation:
    """The installed version as if its bundle carried llama-server and these engine libraries (manifest only:
    each entry describes a one-byte file, with that byte's real hash)."""
    real = read_installation(install.prefix)
    extra = tuple(FileEntry(path=f"engine/{name}", size=1, sha256=hashlib.sha256(b"\x7f").hexdigest(), kind="engine")
                  for name in ("llama-server", *libraries))
    return dataclasses.replace(real, manifest=dataclasses.replace(real.manifest, files=(*real.manifest.files, *extra)))


def test_a_cuda_engine_below_the_driver_floor_serves_on_the_cpu_saying_why_once(install: support.TestInstall) -> None:
    installation = with_engine(install, "libggml-cuda.so", "libcudart.so.13")
    plans = _plans(installation, installation.models, PlanChoices(n_gpu_layers=-1), OLD_DRIVER_HOST)
    reason = "NVIDIA driver 550.54.15 is older than R580, which the CUDA 13 engine needs"
    assert [(p.n_gpu_layers, p.vram_needed, p.tensor_split, p.cpu_fallback) for p in plans] == [(0, 0, (), reason)] * 2
    assert cpu_fallback_line(plans, "serve") == f"airgap serve: no usable NVIDIA GPU ({reason}): serving on the CPU"
    assert any("--n-gpu-layers -1 ignored" in r for r in plans[0].reasons)
    assert [m["cpu_fallback"] for m in json.loads(plans_json(plans))["models"]] == [reason, reason]
    for model, plan in zip(installation.models, plans, strict=True):
        argv = engine_argv(Path("llama-server"), EngineModel.from_dict(engine_settings(model, plan)), 4321)
        assert argv[argv.index("--device") + 1] == "none" and argv[argv.index("--n-gpu-layers") + 1] == "0"
    alone = _plans(installation, installation.models, NO_CHOICES, NO_GPU_HOST)
    assert cpu_fallback_line(alone, "plan") == (
        "airgap plan: no usable NVIDIA GPU (none found on this host): serving on the CPU")


def test_a_usable_gpu_or_a_cpu_engine_plans_as_before_without_the_line(install: support.TestInstall) -> None:
    cuda = with_engine(install, "libggml-cuda.so")
    plans = _plans(cuda, cuda.models, NO_CHOICES, GPU_HOST)
    assert cpu_fallback_line(plans, "serve") is None
    assert all(p.cpu_fallback is None and p.n_gpu_layers == support.TINY_LAYERS + 1 for p in plans)
    cpu = with_engine(install)  # llama-server built without a GPU backend: the CPU engine, no fallback to explain
    for host in (OLD_DRIVER_HOST, NO_GPU_HOST):
        cpu_plans = _plans(cpu, cpu.models, NO_CHOICES, host)
        assert cpu_fallback_line(cpu_plans, "serve") is None and all(p.n_gpu_layers == 0 for p in cpu_plans)


def test_engines_are_planned_in_the_gpu_memory_the_ones_before_left_and_get_the_split(
        install: support.TestInstall) -> None:
    cuda = with_engine(install, "libggml-cuda.so")
    first, second = _plans(cuda, cuda.models, NO_CHOICES, GPU_HOST)
    assert first.tensor_split == second.tensor_split == (0.5, 0.5) and first.vram_needed > 0
    # the second engine's budget: less the first one's share on each GPU and its CUDA context there
    assert second.vram_budget == pytest.approx(first.vram_budget - first.vram_needed - 2 * RUNTIME_VRAM_PER_GPU,
                                               abs=2)
    assert second.ram_budget < first.ram_budget
    for model, plan in zip(cuda.models, (first, second), strict=True):
        argv = engine_argv(Path("llama-server"), EngineModel.from_dict(engine_settings(model, plan)), 4321)
        assert argv[argv.index("--tensor-split") + 1] == "0.5,0.5" and "--device" not in argv


def test_the_fallback_server_gets_the_tensor_split_llama_cpp_takes(install: support.TestInstall) -> None:
    from llama_cpp.server.settings import ModelSettings

    model = read_installation(install.prefix).models[0]
    plan = make_plan(model.shape(), GPU_HOST)
    settings = model_settings(model, plan)
    assert plan.n_gpu_layers > 0 and settings["tensor_split"] == [0.5, 0.5]
    assert ModelSettings(**settings).tensor_split == [0.5, 0.5]
    one_gpu = dataclasses.replace(GPU_HOST, gpus=GPU_HOST.gpus[:1])
    assert "tensor_split" not in model_settings(model, make_plan(model.shape(), one_gpu))


# --- API key and bind address --------------------------------------------------------------------------

def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.internal"))


def test_api_key_comes_from_a_file_the_environment_or_a_systemd_credential(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    assert load_api_key(key_file, {}) == KEY
    assert load_api_key(None, {API_KEY_ENV: KEY}) == KEY
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "api-key").write_text(KEY)
    (tmp_path / "creds" / "api-key").chmod(0o400)  # as systemd's LoadCredential leaves it
    assert load_api_key(None, {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}) == KEY
    assert load_api_key(None, {}) is None


def test_weak_or_exposed_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="at least 16"):
        load_api_key(None, {API_KEY_ENV: "short"})
    exposed = tmp_path / "key"
    exposed.write_text(KEY)
    exposed.chmod(0o644)
    with pytest.raises(ServeError, match="readable by every user"):
        load_api_key(exposed, {})
    with pytest.raises(ServeError, match="cannot read"):
        load_api_key(tmp_path / "absent", {})


def test_binding_beyond_loopback_needs_a_key(install: support.TestInstall) -> None:
    with pytest.raises(ServeError, match="API key is required"):
        prepare_server(install.prefix, host="0.0.0.0", environ={}, host_info=HOST)
    launch = prepare_server(install.prefix, host="0.0.0.0", environ={API_KEY_ENV: KEY}, host_info=HOST)
    assert launch.config.require_api_key


def test_launch_keeps_the_key_out_of_argv_and_the_environment_clean(install: support.TestInstall) -> None:
    environ = {API_KEY_ENV: KEY, "PATH": "/usr/bin", "MODEL": "/evil.gguf", "CONFIG_FILE": "/evil.json",
               "HF_TOKEN": "hf_secret", "CUDA_VISIBLE_DEVICES": "0", "https_proxy": "http://proxy:3128"}
    launch = prepare_server(install.prefix, port=9000, environ=environ, host_info=HOST)
    assert launch.argv == (str(read_installation(install.prefix).python), "-m", "airgap.serve")
    assert not any(KEY in arg for arg in launch.argv)
    assert KEY not in repr(launch)
    assert launch.env[API_KEY_ENV] == KEY
    for dropped in ("MODEL", "CONFIG_FILE", "HF_TOKEN", "https_proxy"):
        assert dropped not in launch.env
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert {k: launch.env[k] for k in OFFLINE_ENV} == dict(OFFLINE_ENV)
    config = ServerConfig.from_json(launch.env[SERVER_CONFIG_ENV])
    assert config == launch.config
    assert KEY not in launch.env[SERVER_CONFIG_ENV]
    assert config.model_ids == ("tiny-chat", "tiny-two")
    settings = config.models[0]
    assert settings["logits_all"] is False and settings["use_mlock"] is False and settings["chat_format"] is None
    assert (config.host, config.port) == ("127.0.0.1", 9000)


def test_bad_ports_are_refused(install: support.TestInstall) -> None:
    with pytest.raises(ServeError, match="port"):
        prepare_server(install.prefix, port=0, environ={}, host_info=HOST)


# --- the guard in front of llama_cpp's app -------------------------------------------------------------

class Recorder:
    """A stand-in downstream app that records what reached it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"downstream"})


def call(guard: Guard, method: str, path: str, body: bytes = b"", auth: str | None = None,
         chunk: int = 1 << 20) -> tuple[int, bytes]:
    headers = [] if auth is None else [(b"authorization", auth.encode())]
    scope: Scope = {"type": "http", "method": method, "path": path, "headers": headers}
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    incoming: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_guard_checks_the_key_everywhere_but_health() -> None:
    app = Recorder()
    guard = Guard(app, KEY, ["tiny"])
    assert call(guard, "GET", "/health")[0] == 200
    assert call(guard, "GET", "/v1/models")[0] == 401
    assert call(guard, "GET", "/docs", auth="Bearer wrong-key-wrong-key")[0] == 401
    assert call(guard, "GET", "/openapi.json", auth=KEY)[0] == 401  # no scheme
    status, body = call(guard, "GET", "/v1/models", auth=f"Bearer {KEY}")
    assert (status, body) == (200, b"downstream")
    error = json.loads(call(guard, "GET", "/v1/models")[1])["error"]
    assert error["code"] == "invalid_api_key"


def test_guard_without_a_key_lets_requests_through() -> None:
    assert call(Guard(Recorder(), None, ["tiny"]), "GET", "/v1/models") == (200, b"downstream")


def test_guard_replays_the_body_and_refuses_unknown_models() -> None:
    app = Recorder()
    guard = Guard(app, None, ["tiny"])
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    assert call(guard, "POST", "/v1/chat/completions", body, chunk=1000)[0] == 200
    assert app.bodies == [body]
    status, answer = call(guard, "POST", "/v1/chat/completions", b'{"model": "gpt-4o", "messages": []}')
    assert status == 404
    assert json.loads(answer)["error"]["code"] == "model_not_found"
    assert call(guard, "POST", "/v1/chat/completions", b"not json")[0] == 200  # llama_cpp answers 422 itself


def test_guard_caps_request_bodies() -> None:
    app = Recorder()
    guard = Guard(app, None, ["tiny"], max_request_bytes=10_000)
    assert call(guard, "POST", "/v1/completions", b"x" * 10_001, chunk=4096)[0] == 413
    assert app.bodies == []


# --- systemd -------------------------------------------------------------------------------------------

def test_sd_notify_and_watchdog_interval(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": path})
        assert listener.recv(100) == b"READY=1"
    assert not sd_notify("READY=1", {})
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({}, 42) is None


def test_systemd_quoting() -> None:
    assert systemd_quote("/opt/airgap") == "/opt/airgap"
    assert systemd_quote("/opt/my models") == '"/opt/my models"'
    assert systemd_quote("50%") == '"50%%"'
    assert systemd_quote('a"b$c') == '"a\\"b$$c"'
    with pytest.raises(ServeError):
        systemd_quote("a\nb")


def test_service_unit_is_hardened(install: support.TestInstall, tmp_path: Path) -> None:
    unit = render_service(install.prefix, host="0.0.0.0", port=8443, api_key_file=Path("/etc/airgap/api-key"),
                          overrides=PlanChoices(n_ctx=4096), allow_from=["10.0.0.0/8"])
    lines = set(unit.splitlines())
    for expected in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                     "PrivateDevices=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                     "CapabilityBoundingSet=", "Type=notify", "IPAddressAllow=10.0.0.0/8", "IPAddressDeny=any",
                     "LoadCredential=api-key:/etc/airgap/api-key", "Environment=HF_HUB_OFFLINE=1"):
        assert expected in lines, expected
    assert "PrivateNetwork=yes" not in lines
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start == (f"ExecStart={install.prefix}/current/venv/bin/airgap serve --prefix {install.prefix}"
                          " --host 0.0.0.0 --port 8443 --n-ctx 4096 --api-key-file %d/api-key")


def test_loopback_unit_allows_only_localhost_and_gpu_unit_opens_nvidia_devices(install: support.TestInstall) -> None:
    local = set(render_service(install.prefix).splitlines())
    assert {"IPAddressDeny=any", "IPAddressAllow=localhost"} <= local
    assert not any(line.startswith("LoadCredential") for line in local)
    gpu = set(render_service(install.prefix, gpu=True, user="airgap", port=80).splitlines())
    assert {"PrivateDevices=no", "DevicePolicy=closed", "DeviceAllow=char-nvidia* rw", "User=airgap",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE"} <= gpu


def test_unit_refuses_what_it_cannot_express(install: support.TestInstall) -> None:
    with pytest.raises(ServeError, match="API key file"):
        render_service(install.prefix, host="0.0.0.0")
    with pytest.raises(ServeError, match="absolute"):
        render_service(Path("relative/prefix"))
    with pytest.raises(ServeError, match="plain path"):
        render_service(Path("/opt/air gap"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (package systemd)")
@pytest.mark.parametrize("variant", [
    {}, {"host": "0.0.0.0", "api_key_file": Path("/etc/airgap/api-key"), "allow_from": ["192.168.0.0/16"]},
    {"gpu": True, "user": "airgap", "port": 443, "model": "tiny-two", "overrides": PlanChoices(n_gpu_layers=-1)},
])
def test_service_unit_passes_systemd_analyze_verify(install: support.TestInstall, tmp_path: Path,
                                                    variant: dict[str, Any]) -> None:
    unit = tmp_path / "airgap.service"
    unit.write_text(render_service(install.prefix, **variant))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    # verify only warns (exit 0) about unknown or malformed settings, so its output must be empty too.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "airgap.service" in line]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr


# --- the real server (llama.cpp loading the tiny GGUF) -------------------------------------------------

@pytest.fixture(scope="module")
def server(install: support.TestInstall) -> Iterator[Any]:
    launch = prepare_server(install.prefix, port=support.free_port(), environ={API_KEY_ENV: KEY, "PATH": os.defpath},
                            extra_env=support.worktree_env())
    process = start_server(launch, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        support.wait_until(lambda: process.poll() is not None
                           or support.http_get(launch.base_url + "/health")[0] == 200, 90, "/health")
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        yield launch, process
    finally:
        process.terminate()
        process.wait(30)


def client(launch: Any, key: str = KEY) -> Any:
    import openai

    return openai.OpenAI(base_url=launch.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


NO_EOS = support.STEADY_ASCII


@pytest.mark.slow
def test_openai_client_lists_models_and_chats(server: Any) -> None:
    launch, _ = server
    api = client(launch)
    assert [m.id for m in api.models.list()] == ["tiny-chat", "tiny-two"]
    for model in ("tiny-two", "tiny-chat"):  # the second one makes llama_cpp swap models
        reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=12, logit_bias=NO_EOS)
        assert reply.model == model
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens >= 12
        # the prompt went through the GGUF's ChatML template: its markers are byte tokens here
        assert reply.usage.prompt_tokens >= len("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_streamed_chat_completion(server: Any) -> None:
    launch, _ = server
    stream = client(launch).chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=40, stream=True,
        logit_bias=NO_EOS,
    )
    chunks = list(stream)
    assert len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.model == "tiny-chat" for c in chunks)


@pytest.mark.slow
def test_wrong_or_missing_key_is_refused(server: Any) -> None:
    import openai

    launch, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(launch, "wrong-key-wrong-key-wrong").models.list()
    assert support.http_get(launch.base_url + "/v1/models")[0] == 401
    assert support.http_get(launch.base_url + "/docs")[0] == 401
    with pytest.raises(openai.NotFoundError, match="tiny-chat, tiny-two"):
        client(launch).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_default_bind_is_loopback_and_the_key_is_not_on_the_command_line(server: Any) -> None:
    launch, process = server
    assert launch.config.host == "127.0.0.1"
    assert support.listening_addresses(launch.config.port) == {"127.0.0.1"}
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert KEY.encode() not in cmdline and b"airgap.serve" in cmdline


@pytest.mark.slow
def test_health_answers_and_a_second_request_is_served_while_a_long_generation_runs(server: Any) -> None:
    launch, _ = server
    api = client(launch)
    first_chunk = threading.Event()
    finished = threading.Event()
    result: dict[str, Any] = {}

    def long_generation() -> None:
        stream = api.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "write"}], max_tokens=1500, stream=True,
            logit_bias=NO_EOS,
        )
        count = 0
        for chunk in stream:
            count += 1
            first_chunk.set()
            result["finish"] = chunk.choices[0].finish_reason if chunk.choices else None
        result["chunks"] = count
        finished.set()

    worker = threading.Thread(target=long_generation)
    worker.start()
    try:
        assert first_chunk.wait(60)
        started = time.monotonic()
        status, body = support.http_get(launch.base_url + "/health", timeout=5)
        health_latency = time.monotonic() - started
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert health_latency < 1.0
        assert not finished.is_set(), "the generation ended before /health was asked; make it longer"
        second = api.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4)
        assert second.choices[0].message.content is not None
    finally:
        worker.join(120)
    # queued, not interrupted: the first stream ran to its token limit
    assert result.get("finish") == "length" and result["chunks"] > 100


@pytest.mark.slow
def test_twenty_concurrent_clients_are_all_answered(server: Any) -> None:
    launch, process = server
    api = client(launch)

    def ask(n: int) -> str:
        reply = api.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": f"q{n}"}],
                                            max_tokens=6, logit_bias=NO_EOS)
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(max_workers=20) as pool:
        reasons = list(pool.map(ask, range(20), timeout=180))
    assert reasons == ["length"] * 20
    assert process.poll() is None
    assert support.http_get(launch.base_url + "/health")[0] == 200


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_serves_inside_a_network_namespace_with_only_loopback(install: support.TestInstall) -> None:
    script = Path(support.__file__)
    command = f"ip link set lo up && exec {sys.executable} {script} {install.prefix}"
    env = {**support.environ_without(API_KEY_ENV), **support.worktree_env()}
    result = subprocess.run(["unshare", "-n", "sh", "-c", command], capture_output=True, text=True, timeout=300,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["outside"] == "Network is unreachable"
    assert outcome["model"] == "tiny-chat" and outcome["completion_tokens"] > 0 and outcome["server_alive"]


@pytest.mark.slow
def test_serve_execs_the_server_which_reports_ready_and_feeds_the_watchdog(tmp_path: Path) -> None:
    fake = support.make_installed_prefix(tmp_path, venv=support.overlay_venv(tmp_path))
    notify = str(tmp_path / "notify")
    port = support.free_port()
    code = f"from pathlib import Path; from airgap.serve import serve; serve(Path({str(fake.prefix)!r}), port={port})"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(notify)
        listener.settimeout(60)
        env = {"PATH": os.defpath, "PYTHONPATH": str(REPO),
               "NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "1000000", API_KEY_ENV: KEY}
        process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
        try:
            messages = [listener.recv(4096).decode()]
            assert messages[0].startswith("READY=1\nSTATUS=serving tiny-chat on 127.0.0.1:")
            # same PID as the `airgap serve` process: systemd's NotifyAccess=main accepts it
            cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[-3:] == [b"-m", b"airgap.serve", b""] and KEY.encode() not in b" ".join(cmdline)
            assert listener.recv(4096) == b"WATCHDOG=1"
            assert support.http_get(f"http://127.0.0.1:{port}/health")[0] == 200
        finally:
            process.terminate()
            process.wait(30)
        while (message := listener.recv(4096)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"


def test_a_taken_port_fails_at_once_with_a_clear_message(install: support.TestInstall) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        launch = prepare_server(install.prefix, port=port, environ={"PATH": os.defpath}, host_info=HOST,
                                extra_env=support.worktree_env())
        process = start_server(launch, stderr=subprocess.PIPE)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err.decode().strip() == f"airgap.serve: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_the_server_module_refuses_to_start_without_its_configuration() -> None:
    env = {"PATH": os.defpath, **support.worktree_env()}
    result = subprocess.run([sys.executable, "-m", "airgap.serve"], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2 and "start the server with `airgap serve`" in result.stderr


def scope_sent(guard: Guard, scope: Scope, incoming: list[Message]) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    return sent


class ScopeRecorder:
    def __init__(self) -> None:
        self.types: list[str] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.types.append(scope["type"])


@pytest.mark.parametrize("key", [KEY, None])
@pytest.mark.parametrize("auth", [None, f"Bearer {KEY}"])
def test_guard_closes_every_websocket_before_the_inner_app_sees_it(key: str | None, auth: str | None) -> None:
    app = ScopeRecorder()
    headers = [] if auth is None else [(b"authorization", auth.encode())]
    scope: Scope = {"type": "websocket", "path": "/v1/chat/completions", "headers": headers}
    sent = scope_sent(Guard(app, key, ["tiny"]), scope, [{"type": "websocket.connect"}])
    assert sent == [{"type": "websocket.close", "code": 1008}]  # closed before accept: the server answers 403
    assert app.types == []


def test_guard_passes_lifespan_and_drops_unknown_scope_types() -> None:
    app = ScopeRecorder()
    guard = Guard(app, KEY, ["tiny"])
    scope_sent(guard, {"type": "lifespan"}, [])
    assert scope_sent(guard, {"type": "webtransport", "path": "/", "headers": []}, []) == []
    assert app.types == ["lifespan"]
