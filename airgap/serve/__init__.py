"""Serve the installed models over an OpenAI- and Mistral-compatible API, sized to this host.

A bundle built with the engine (`engine/llama-server`, see airgap.build.sources.engine) is served by llama.cpp's own
server: one supervised llama-server per model on loopback (airgap.serve.engine), behind the guard
(airgap.serve.guard), which is the only thing clients reach. A bundle without it (built before the engine
existed, or with `[engine] llama_server = false`) falls back to llama-cpp-python's server, in process, as below.

Two halves live here. The operator's side (`airgap serve`) reads the active installation, plans every
model for this host, checks the bind address and API key, and replaces itself with the server process:
`P/current/venv/bin/python -m airgap.serve`, configured through its environment (never argv, where `ps`
would show the key). The server's side (`main`, run by that venv, the only place llama_cpp, fastapi and
uvicorn are imported) builds llama_cpp's app, puts a small guard in front of it (constant-time API key
check, /health that never waits for the model, 404 for unknown model ids, request size cap), tells
systemd when it is ready and feeds its watchdog.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, NoReturn

from airgap.errors import FormatError, ServeError
from airgap.format.manifest import Manifest, parse_manifest
from airgap.hardware.facts import HostInfo, probe_host
from airgap.hardware.sizing import NO_CHOICES, ModelShape, Plan, PlanChoices, left_after, make_plan
from airgap.hardware.target import no_usable_gpu
from airgap.prefix.paths import Prefix
from airgap.serve.engine import ENGINE_BINARY, ENGINE_DIR, EngineModel

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
SERVER_CONFIG_ENV = "AIRGAP_SERVER_CONFIG"
API_KEY_ENV = "AIRGAP_API_KEY"
CREDENTIAL_NAME = "api-key"  # systemd LoadCredential name; the unit passes %d/api-key
MIN_API_KEY_LENGTH = 16
MAX_REQUEST_BYTES = 16 << 20
SERVER_MODULE = "airgap.serve"

# Set in the server's environment so that nothing it imports reaches for a hub, a tracker or a token.
OFFLINE_ENV: Mapping[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONDONTWRITEBYTECODE": "1",  # the installed tree is read-only under systemd's ProtectSystem=strict
    "PYTHONNOUSERSITE": "1",
}
# Everything else in the caller's environment stays out: pydantic-settings would read stray variables
# such as MODEL, HOST, API_KEY or CONFIG_FILE into the server's settings.
PASSED_ENV = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "TMPDIR", "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "GGML_CUDA_ENABLE_UNIFIED_MEMORY",
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "JOURNAL_STREAM",
)
_GPU_BACKENDS = ("cuda", "hip", "vulkan", "sycl", "metal")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf\Z")


# --- the installed layout -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServedModel:
    """A model of the active version: the id clients ask for and the GGUF file llama.cpp opens."""

    id: str
    path: Path
    files: tuple[Path, ...]
    size: int
    gguf: Mapping[str, Any]
    embedding: bool = False

    def shape(self) -> ModelShape:
        return ModelShape.from_gguf(self.id, self.gguf, self.size)


@dataclass(frozen=True)
class Installation:
    """The active version under a prefix, pinned: `root` is P/current resolved once."""

    prefix: Path
    root: Path
    manifest: Manifest

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def models(self) -> tuple[ServedModel, ...]:
        return tuple(_installed_model(self, entry.id, entry.files, entry.gguf, entry.embedding)
                     for entry in self.manifest.models)

    @property
    def engine(self) -> Path | None:
        """llama-server of this version, when the bundle carries it."""
        path = f"{ENGINE_DIR}/{ENGINE_BINARY}"
        if not any(f.kind == "engine" and f.path == path for f in self.manifest.files):
            return None
        return self.root / path


def read_installation(prefix: Path) -> Installation:
    """The active version of `prefix`; ServeError when nothing is installed there."""
    current = Prefix(prefix).current
    try:
        root = current.resolve(strict=True)
        data = (root / "manifest.json").read_bytes()
    except OSError as exc:
        raise ServeError(
            f"no installed version under {prefix}: expected {current}/manifest.json, {exc.strerror}") from exc
    try:
        manifest = parse_manifest(data)
    except FormatError as exc:
        raise ServeError(f"installed manifest {root / 'manifest.json'} is invalid: {exc}") from exc
    return Installation(prefix=prefix, root=root, manifest=manifest)


def active_models(prefix: Path) -> tuple[ServedModel, ...]:
    """The models of the active version, with their files checked to exist at the size the manifest says."""
    return read_installation(prefix).models


def select_models(models: Sequence[ServedModel], model_id: str | None) -> tuple[ServedModel, ...]:
    if not models:
        raise ServeError("the installed bundle has no models to serve")
    if model_id is None:
        return tuple(models)
    chosen = tuple(m for m in models if m.id == model_id)
    if not chosen:
        raise ServeError(f"no model {model_id!r} in the installed bundle; it has: {', '.join(m.id for m in models)}")
    return chosen


def runtime_supports_gpu(venv: Path) -> bool:
    """Whether the venv's llama.cpp was built with a GPU backend, judged by its shared libraries."""
    return bool(runtime_gpu_backends(venv))


def runtime_gpu_backends(venv: Path) -> frozenset[str]:
    """The GPU backends ("cuda", ...) the venv's llama.cpp was built with, judged by its shared libraries."""
    return gpu_backends(lib.name for lib in venv.glob("lib/python*/site-packages/llama_cpp/lib/*ggml-*"))


def gpu_backends(names: Iterable[str]) -> frozenset[str]:
    """The GPU backends named by these library file names or paths (libggml-cuda.so: "cuda")."""
    return frozenset(backend for name in names for backend in _GPU_BACKENDS if backend in name)


def _installed_model(installation: Installation, model_id: str, paths: tuple[str, ...],
                     gguf: Mapping[str, Any], embedding: bool = False) -> ServedModel:
    files = tuple(installation.root / p for p in paths)
    for rel, path in zip(paths, files, strict=True):
        expected = installation.manifest.file(rel).size
        try:
            found = path.stat().st_size
        except OSError as exc:
            raise ServeError(f"model {model_id!r}: installed file {path} is unreadable: {exc.strerror}") from exc
        if found != expected:
            raise ServeError(f"model {model_id!r}: installed file {path} is {found} bytes, the manifest says "
                             f"{expected}; run `airgap verify`")
    return ServedModel(
        id=model_id, path=_entry_point(model_id, files), files=files,
        size=sum(installation.manifest.file(p).size for p in paths), gguf=gguf, embedding=embedding,
    )


def _entry_point(model_id: str, files: tuple[Path, ...]) -> Path:
    """The file to hand llama.cpp: the only GGUF, or the first of a split set (it finds the others)."""
    ggufs = [f for f in files if f.name.endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs[0]
    firsts = [f for f in ggufs if (m := _SPLIT_RE.search(f.name)) and int(m.group(1)) == 1]
    if len(firsts) != 1:
        raise ServeError(f"model {model_id!r}: expected one GGUF file or one split set (-00001-of-N), found "
                         f"{', '.join(f.name for f in files)}")
    return firsts[0]


# --- planning -------------------------------------------------------------------------------------------

def plan_for(
    prefix: Path, model: str | None = None, overrides: PlanChoices = NO_CHOICES, host: HostInfo | None = None,
) -> tuple[Plan, ...]:
    """One plan per served model, for the engine the installed bundle carries (see `_plans`)."""
    installation = read_installation(prefix)
    return _plans(installation, select_models(installation.models, model), overrides, host or probe_host())


def plans_json(plans: Sequence[Plan], host: HostInfo | None = None, host_check: Mapping[str, Any] | None = None) -> str:
    document: dict[str, Any] = {"models": [p.to_dict() for p in plans]}
    if host is not None:
        document["host"] = host.to_dict()
    if host_check is not None:
        document["host_check"] = dict(host_check)
    return json.dumps(document, indent=2, sort_keys=True)


def _plans(installation: Installation, models: Sequence[ServedModel], overrides: PlanChoices,
           host: HostInfo) -> tuple[Plan, ...]:
    if installation.engine is None:
        backends = runtime_gpu_backends(installation.venv)
    else:
        backends = gpu_backends(f.path for f in installation.manifest.files if f.kind == "engine")
    fallback = no_usable_gpu(host, cuda="cuda" in backends) if backends else None
    if fallback is not None:
        # Planned as a host without GPUs; the engine is also kept off the GPU backend (engine_argv: --device none).
        ignored = () if overrides.n_gpu_layers is None else (f"--n-gpu-layers {overrides.n_gpu_layers} ignored",)
        host = replace(host, gpus=(), notes=(*host.notes, cpu_fallback_text(fallback), *ignored))
        overrides = replace(overrides, n_gpu_layers=None)
    gpu = bool(backends) and fallback is None
    if installation.engine is None:
        # llama-cpp-python keeps one model loaded at a time, so each gets the whole host
        return tuple(replace(make_plan(m.shape(), host, overrides, gpu_offload=gpu), cpu_fallback=fallback)
                     for m in models)
    # llama-server: every model is loaded at once, each in its own engine, so each is planned in what the
    # ones before it left: RAM and each GPU's memory (weights and the KV cache of all its slots counted)
    plans = []
    left = host
    for model in models:
        plan = make_plan(model.shape(), left, overrides, gpu_offload=gpu, slots=True)
        plans.append(replace(plan, cpu_fallback=fallback))
        left = left_after(left, plan)
    return tuple(plans)


def cpu_fallback_text(reason: str) -> str:
    return f"no usable NVIDIA GPU ({reason}): serving on the CPU"


def cpu_fallback_line(plans: Sequence[Plan], command: str) -> str | None:
    """The one line serve and plan print on stderr when the engine's GPU backend cannot be used here."""
    reason = next((p.cpu_fallback for p in plans if p.cpu_fallback is not None), None)
    return None if reason is None else f"airgap {command}: {cpu_fallback_text(reason)}"


# --- the API key and the bind address ------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_api_key(api_key_file: Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key from --api-key-file, else $AIRGAP_API_KEY, else systemd's credential; None when none is set."""
    if api_key_file is not None:
        return _check_key(_read_key_file(api_key_file), str(api_key_file))
    if environ.get(API_KEY_ENV):
        return _check_key(environ[API_KEY_ENV], f"${API_KEY_ENV}")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL_NAME).is_file():
        path = Path(credentials) / CREDENTIAL_NAME
        return _check_key(_read_key_file(path), str(path))
    return None


def _read_key_file(path: Path) -> str:
    try:
        with path.open("rb") as stream:
            mode = os.fstat(stream.fileno()).st_mode
            data = stream.read(4097)
    except OSError as exc:
        raise ServeError(f"cannot read API key file {path}: {exc.strerror}") from exc
    if mode & stat.S_IROTH:
        raise ServeError(f"API key file {path} is readable by every user (mode {stat.filemode(mode)}); "
                         f"expected it private, e.g. chmod 600")
    if len(data) > 4096:
        raise ServeError(f"API key file {path} is larger than 4 KiB; expected one line")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ServeError(f"API key file {path} holds non-ASCII bytes; expected one line of text") from exc


def _check_key(key: str, origin: str) -> str:
    key = key.strip()
    if len(key) < MIN_API_KEY_LENGTH or not key.isprintable() or " " in key:
        raise ServeError(f"API key from {origin} must be at least {MIN_API_KEY_LENGTH} printable characters "
                         f"without spaces, found {len(key)} characters")
    return key


# --- launching the server -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerConfig:
    """What the server process needs, passed to it as JSON in $AIRGAP_SERVER_CONFIG. Holds no secret."""

    host: str
    port: int
    models: tuple[Mapping[str, Any], ...]
    require_api_key: bool
    max_request_bytes: int = MAX_REQUEST_BYTES
    engine: str | None = None  # llama-server to supervise; None: llama-cpp-python's server in process

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(str(m["id"] if self.engine else m["model_alias"]) for m in self.models)

    def to_json(self) -> str:
        return json.dumps({
            "host": self.host, "port": self.port, "models": [dict(m) for m in self.models],
            "require_api_key": self.require_api_key, "max_request_bytes": self.max_request_bytes,
            "engine": self.engine,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        raw = json.loads(text)
        engine = raw.get("engine")
        return cls(
            host=str(raw["host"]), port=int(raw["port"]), models=tuple(raw["models"]),
            require_api_key=bool(raw["require_api_key"]), max_request_bytes=int(raw["max_request_bytes"]),
            engine=None if engine is None else str(engine),
        )


def engine_settings(model: ServedModel, plan: Plan) -> dict[str, Any]:
    """One model's llama-server settings and request limits, as plain values."""
    settings = EngineModel(
        id=model.id, path=str(model.path), n_ctx=plan.n_ctx, parallel=plan.parallel, n_threads=plan.n_threads,
        n_threads_batch=plan.n_threads_batch, n_gpu_layers=plan.n_gpu_layers, embedding=model.embedding,
        tensor_split=_split(plan), cpu_only=plan.cpu_fallback is not None,
    ).to_dict()
    return {**settings, "max_tokens_default": plan.max_tokens_default, "max_tokens_cap": plan.n_ctx}


def model_settings(model: ServedModel, plan: Plan) -> dict[str, Any]:
    """llama_cpp.server ModelSettings for one model, as plain values."""
    return {
        "model": str(model.path),
        "model_alias": model.id,
        "n_gpu_layers": plan.n_gpu_layers,
        "n_ctx": plan.n_ctx,
        "n_threads": plan.n_threads,
        "n_threads_batch": plan.n_threads_batch,
        "chat_format": None,  # None: llama-cpp-python uses the GGUF's tokenizer.chat_template
        "logits_all": False,  # True (the server's default) keeps n_ctx x n_vocab floats of logits in RAM
        "use_mmap": True,
        "use_mlock": False,  # pinning tens of GiB fails under systemd's default LimitMEMLOCK and is not ours to do
        "verbose": False,
        **({"tensor_split": list(split)} if (split := _split(plan)) else {}),
    }


def _split(plan: Plan) -> tuple[float, ...]:
    """The plan's tensor split, when it spreads offloaded layers over several GPUs; () otherwise."""
    return plan.tensor_split if len(plan.tensor_split) >= 2 and plan.n_gpu_layers > 0 else ()


@dataclass(frozen=True)
class Launch:
    """How to start the server: argv and environment (which holds the API key, so it stays out of repr)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    config: ServerConfig
    plans: tuple[Plan, ...]

    @property
    def base_url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.config.port}"


def prepare_server(
    prefix: Path,
    model: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key_file: Path | None = None,
    overrides: PlanChoices = NO_CHOICES,
    environ: Mapping[str, str] = os.environ,
    host_info: HostInfo | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Launch:
    """Check everything that can be checked before loading a model, and say how to start the server."""
    if not 1 <= port <= 65535:
        raise ServeError(f"port must be between 1 and 65535, found {port}")
    api_key = load_api_key(api_key_file, environ)
    if api_key is None and not is_loopback(host):
        raise ServeError(f"binding to {host} exposes the server beyond this host; an API key is required: "
                         f"--api-key-file FILE or ${API_KEY_ENV}")
    installation = read_installation(prefix)
    if not installation.python.exists():
        raise ServeError(f"the installed version has no Python environment: expected {installation.python}")
    models = select_models(installation.models, model)
    plans = _plans(installation, models, overrides, host_info or probe_host(environ=environ))
    engine = installation.engine
    if engine is not None and not os.access(engine, os.X_OK):
        raise ServeError(f"the installed engine {engine} is missing or not executable; run `airgap verify`")
    if engine is not None and not any(installation.venv.glob("lib/python*/site-packages/uvicorn")):
        raise ServeError("the guard in front of llama-server needs uvicorn in the installed venv; expected the "
                         "bundle to require llama-cpp-python[server] (or uvicorn), found no uvicorn")
    settings = engine_settings if engine is not None else model_settings
    config = ServerConfig(
        host=host, port=port, models=tuple(settings(m, p) for m, p in zip(models, plans, strict=True)),
        require_api_key=api_key is not None, engine=None if engine is None else str(engine),
    )
    env = {k: v for k, v in environ.items() if k in PASSED_ENV}
    env.setdefault("PATH", os.defpath)
    env.update(OFFLINE_ENV)
    env.update(extra_env or {})
    env[SERVER_CONFIG_ENV] = config.to_json()
    if api_key is not None:
        env[API_KEY_ENV] = api_key
    return Launch(argv=(str(installation.python), "-m", SERVER_MODULE), env=env, config=config, plans=plans)


def serve(
    prefix: Path,
    model: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key_file: Path | None = None,
    overrides: PlanChoices = NO_CHOICES,
    log: IO[str] | None = None,
    before_exec: Callable[[Launch], None] | None = None,
) -> NoReturn:
    """Become the server: plan, print the plan to `log`, then exec the venv's Python (same PID for systemd).

    `before_exec(launch)` runs last, once everything is checked (the CLI records the start there)."""
    launch = prepare_server(prefix, model, host, port, api_key_file, overrides)
    if log is not None:
        fallback = cpu_fallback_line(launch.plans, "serve")
        if fallback is not None:
            print(fallback, file=log)
        for plan in launch.plans:
            print(plan.explain(), file=log)
        log.flush()
    if before_exec is not None:
        before_exec(launch)
    try:
        os.execve(launch.argv[0], list(launch.argv), dict(launch.env))
    except OSError as exc:
        raise ServeError(f"cannot start {launch.argv[0]}: {exc.strerror}") from exc


def start_server(launch: Launch, stdout: IO[bytes] | int | None = None,
                 stderr: IO[bytes] | int | None = None) -> subprocess.Popen[bytes]:
    """Start the server as a child process (tests, supervisors); the caller stops it."""
    try:
        return subprocess.Popen(list(launch.argv), env=dict(launch.env), stdout=stdout, stderr=stderr)
    except OSError as exc:
        raise ServeError(f"cannot start {launch.argv[0]}: {exc.strerror}") from exc


# --- the systemd unit ----------------------------------------------------------------------------------

_UNIT_SAFE = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def render_service(
    prefix: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    model: str | None = None,
    api_key_file: Path | None = None,
    overrides: PlanChoices = NO_CHOICES,
    gpu: bool = False,
    user: str | None = None,
    allow_from: Sequence[str] = (),
) -> str:
    """A hardened systemd unit running `airgap serve` for `prefix`.

    `api_key_file` is a path on the host handed to the service with LoadCredential (it is then readable only
    by the service); it is required when `host` is not loopback. `allow_from` limits which client networks
    may connect (IPAddressAllow). `gpu` opens the NVIDIA device nodes.
    """
    from airgap.templates import render

    if not prefix.is_absolute():
        raise ServeError(f"the service needs an absolute prefix, found {prefix}")
    _unit_value(str(prefix))
    _unit_value(host)
    if not is_loopback(host) and api_key_file is None:
        raise ServeError(f"a service listening on {host} needs an API key file (--api-key-file) for LoadCredential")
    if api_key_file is not None and not api_key_file.is_absolute():
        raise ServeError(f"the API key file must be an absolute path, found {api_key_file}")
    args = [str(Prefix(prefix).active_venv / "bin" / "airgap"), "serve", "--prefix", str(prefix),
            "--host", host, "--port", str(port)]
    if model is not None:
        args += ["--model", model]
    for flag, value in (("--n-gpu-layers", overrides.n_gpu_layers), ("--n-ctx", overrides.n_ctx),
                        ("--threads", overrides.threads), ("--parallel", overrides.parallel)):
        if value is not None:
            args += [flag, str(value)]
    exec_start = " ".join(systemd_quote(a) for a in args)
    if api_key_file is not None:
        exec_start += f" --api-key-file %d/{CREDENTIAL_NAME}"  # %d: the unit's credentials directory
    home = str(prefix).startswith(("/home/", "/root/", "/run/user/"))
    return render(
        "airgap.service.j2",
        prefix=str(prefix), exec_start=exec_start, user=user, loopback=is_loopback(host), host=host, port=port,
        credential=None if api_key_file is None else f"{CREDENTIAL_NAME}:{_unit_value(str(api_key_file))}",
        credential_name=CREDENTIAL_NAME, gpu=gpu, privileged_port=port < 1024, allow_from=list(allow_from),
        protect_home="read-only" if home else "yes", offline_env=dict(OFFLINE_ENV),
        wants_online=not is_loopback(host) and host not in ("0.0.0.0", "::"),
    )


def systemd_quote(arg: str) -> str:
    """One ExecStart argument, quoted for systemd (which also expands % specifiers and $ variables)."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _UNIT_SAFE.fullmatch(arg):
        return escaped
    if any(ord(c) < 32 for c in arg):
        raise ServeError(f"cannot put a control character in a systemd unit, found {arg!r}")
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unit_value(value: str) -> str:
    if not _UNIT_SAFE.fullmatch(value):
        raise ServeError(f"path {value!r} needs quoting a systemd directive does not allow; choose a plain path")
    return value.replace("%", "%%")


# --- the server process (runs inside the installed venv) -----------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


WEBSOCKET_POLICY_VIOLATION = 1008


class Guard:
    """ASGI middleware in front of llama_cpp's app.

    - /health answers at once, without the model lock, so it stays up while a generation runs;
    - every other path needs `Authorization: Bearer <key>` when a key is set (compared in constant time;
      llama_cpp's own check uses `==` and leaves /docs and /openapi.json open);
    - request bodies are capped, and a `model` other than the served ids gets OpenAI's 404 instead of
      llama_cpp's silent fallback to the first model;
    - every scope type is decided here: `lifespan` (the inner app's startup and shutdown, no client)
      passes, `http` as above, a `websocket` is closed before it is accepted (the server answers 403)
      with or without a key, since the OpenAI and Mistral APIs use none and a socket that is never
      opened needs no key check of its own; any other type never reaches the inner app.
    """

    def __init__(self, app: App, api_key: str | None, model_ids: Sequence[str],
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.app = app
        self.api_key = None if api_key is None else api_key.encode()
        self.model_ids = frozenset(model_ids)
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            message = await receive()
            if message.get("type") == "websocket.connect":
                await send({"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION})
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await _respond(send, 200, {"status": "ok"}, head=scope["method"] == "HEAD")
            return
        if self.api_key is not None and not self._authorized(scope):
            await _respond(send, 401, _openai_error("Incorrect API key provided.", "invalid_api_key"))
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        from airgap.serve.guard import read_body  # the engine's guard reads bodies the same way; h11 loads lazily

        body = await read_body(receive, self.max_request_bytes)
        if body is None:
            await _respond(send, 413, _openai_error(
                f"Request body is larger than {self.max_request_bytes} bytes.", "request_too_large"))
            return
        unknown = self._unknown_model(body)
        if unknown is not None:
            await _respond(send, 404, _openai_error(
                f"The model {unknown!r} does not exist; this server serves: {', '.join(sorted(self.model_ids))}.",
                "model_not_found", param="model"))
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = bytes(value).partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    def _unknown_model(self, body: bytes) -> str | None:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None  # llama_cpp answers malformed requests itself
        model = document.get("model") if isinstance(document, dict) else None
        if isinstance(model, str) and model not in self.model_ids:
            return model
        return None




def _replay(body: bytes, receive: Receive) -> Receive:
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _openai_error(message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


async def _respond(send: Send, status: int, document: Mapping[str, Any], head: bool = False) -> None:
    body = json.dumps(document).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def build_app(config: ServerConfig, api_key: str | None) -> App:
    """llama_cpp's FastAPI app for the configured models (loads the first one), behind the Guard."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    server_settings = ServerSettings(
        host=config.host, port=config.port, api_key=api_key,
        # The stock default cuts a running stream short whenever another request arrives; queue instead.
        interrupt_requests=False,
    )
    models = [ModelSettings(**settings) for settings in config.models]
    app: App = create_app(server_settings=server_settings, model_settings=models)
    return Guard(app, api_key, config.model_ids, config.max_request_bytes)


def sd_notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send a state line to systemd (READY=1, WATCHDOG=1, STATUS=...); False when not run by systemd."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Half the watchdog period systemd asks for, or None when no watchdog is set for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if environ.get("WATCHDOG_PID", str(pid)) != str(pid):
        return None
    return int(usec) / 2e6


async def _serve_until_stopped(app: App, config: ServerConfig, listener: socket.socket) -> int:
    import anyio.to_thread
    import uvicorn

    # llama.cpp (built with OpenMP) gives each calling OS thread its own thread team. The stock server
    # runs every request, and every streamed token, on whichever worker thread is free, so two teams end
    # up fighting over the cores and decoding drops about 4x. One worker thread at a time: one team.
    anyio.to_thread.current_default_thread_limiter().total_tokens = 1

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Said here because uvicorn re-raises the signal once shut down, so nothing after serve() runs.
            if not self.should_exit:
                sd_notify("STOPPING=1")
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info", server_header=False, proxy_headers=False,
        timeout_graceful_shutdown=10,
    ))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        sd_notify(f"READY=1\nSTATUS=serving {', '.join(config.model_ids)} on {config.host}:{config.port}")
        interval = watchdog_interval(os.environ, os.getpid())
        if interval is not None:
            # The ping comes from the event loop, so a loop stuck for a whole period gets the unit restarted.
            feeding = asyncio.create_task(_feed_watchdog(interval))
            serving.add_done_callback(lambda _: feeding.cancel())
    await serving
    return 0 if server.started else 1


async def _feed_watchdog(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def main() -> int:
    raw = os.environ.get(SERVER_CONFIG_ENV)
    if raw is None:
        print(f"{SERVER_MODULE}: start the server with `airgap serve`; ${SERVER_CONFIG_ENV} is not set",
              file=sys.stderr)
        return 2
    config = ServerConfig.from_json(raw)
    api_key = os.environ.pop(API_KEY_ENV, None)
    if config.require_api_key and not api_key:
        print(f"{SERVER_MODULE}: an API key is required and ${API_KEY_ENV} is empty", file=sys.stderr)
        return 2
    try:
        listener = listen(config.host, config.port)  # before the slow model load: a taken port fails at once
    except ServeError as exc:
        print(f"{SERVER_MODULE}: {exc}", file=sys.stderr)
        return 1
    if config.engine is not None:
        with listener:
            return asyncio.run(_serve_engines(config, api_key, listener))
    with listener:
        try:
            app = build_app(config, api_key)
        except (ValueError, OSError, RuntimeError) as exc:  # llama_cpp's load failures
            print(f"{SERVER_MODULE}: cannot load the models: {exc}", file=sys.stderr)
            return 1
        print(f"airgap: serving {', '.join(config.model_ids)} on {config.host}:{config.port}"
              f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
        return asyncio.run(_serve_until_stopped(app, config, listener))


async def _serve_engines(config: ServerConfig, api_key: str | None, listener: socket.socket) -> int:
    """Guard in front, engines behind: listen at once (/health says loading), load, then supervise."""
    import uvicorn

    from airgap.serve.engine import Supervisor
    from airgap.serve.guard import EngineGuard, GuardSettings, limits_for
    from airgap.serve.proxy import Upstream

    assert config.engine is not None
    try:
        supervisor = Supervisor(Path(config.engine), [EngineModel.from_dict(m) for m in config.models], os.environ)
    except ServeError as exc:
        print(f"{SERVER_MODULE}: {exc}", file=sys.stderr)
        return 1

    def upstream_for(model_id: str) -> Upstream | None:
        engine = supervisor.engines.get(model_id)
        if engine is None or not engine.ready:
            return None
        return Upstream(engine.port, engine.key, native_tools=engine.native_tools)

    settings = GuardSettings(None if api_key is None else api_key.encode(), limits_for(config.models),
                             config.max_request_bytes)
    app = EngineGuard(settings, upstream_for, lambda: supervisor.ready)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                sd_notify("STOPPING=1")
                supervisor.terminate()  # uvicorn re-raises the signal once shut down; the engines go first
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info", server_header=False, proxy_headers=False,
        timeout_graceful_shutdown=10, lifespan="off",
    ))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        await supervisor.start()
    except ServeError as exc:
        print(f"{SERVER_MODULE}: cannot load the models: {exc}", file=sys.stderr, flush=True)
        server.should_exit = True
        await supervisor.stop()
        await serving
        return 1
    print(f"airgap: serving {', '.join(config.model_ids)} on {config.host}:{config.port} with llama-server"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    sd_notify(f"READY=1\nSTATUS=serving {', '.join(config.model_ids)} on {config.host}:{config.port}")
    interval = watchdog_interval(os.environ, os.getpid())
    feeding = asyncio.create_task(_feed_watchdog(interval)) if interval is not None else None
    watching = asyncio.create_task(supervisor.watch())
    done, _ = await asyncio.wait({serving, watching}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if watching in done and not supervisor.stopping:
        print(f"{SERVER_MODULE}: {watching.result()}; exiting so that the service manager restarts it",
              file=sys.stderr, flush=True)
        server.should_exit = True
        await serving
        code = 1
    watching.cancel()
    if feeding is not None:
        feeding.cancel()
    await supervisor.stop()
    return code


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; ServeError naming the address when it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


if __name__ == "__main__":
    sys.exit(main())
