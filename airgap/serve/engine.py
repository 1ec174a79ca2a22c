"""Start and supervise one llama-server per model, on loopback, each on a free port of its own.

The engine is reached only through the guard: it listens on 127.0.0.1, and it wants a key that is made fresh
for each start and handed over in its environment (LLAMA_API_KEY; argv would show it in `ps`). It runs with
its own folder as working directory, since ggml also looks for backend libraries in the working directory.
A crashed engine is restarted a few times; after that the supervisor gives up and serve exits non-zero, so
that systemd restarts the whole unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airgap.errors import ServeError

ENGINE_DIR = "engine"
ENGINE_BINARY = "llama-server"
ENGINE_KEY_ENV = "LLAMA_API_KEY"
MAX_RESTARTS = 3  # within RESTART_WINDOW seconds; then serve exits and systemd takes over
RESTART_WINDOW = 300.0
LOAD_TIMEOUT = 600.0
# Only what the engine needs from the server's environment; nothing that could point it at a network.
_ENGINE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
               "NVIDIA_VISIBLE_DEVICES", "GGML_CUDA_ENABLE_UNIFIED_MEMORY", "GGML_VK_VISIBLE_DEVICES")


@dataclass(frozen=True)
class EngineModel:
    """How one model is served by its llama-server: what the plan chose, as plain values."""

    id: str
    path: str
    n_ctx: int
    parallel: int
    n_threads: int
    n_threads_batch: int
    n_gpu_layers: int
    embedding: bool = False
    tensor_split: tuple[float, ...] = ()  # each GPU's share of the offloaded layers; () for one GPU or none
    cpu_only: bool = False  # the engine's GPU backend cannot be used on this host: offload to no device

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "n_ctx": self.n_ctx, "parallel": self.parallel,
                "n_threads": self.n_threads, "n_threads_batch": self.n_threads_batch,
                "n_gpu_layers": self.n_gpu_layers, "embedding": self.embedding,
                "tensor_split": list(self.tensor_split), "cpu_only": self.cpu_only}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EngineModel:
        return cls(id=str(raw["id"]), path=str(raw["path"]), n_ctx=int(raw["n_ctx"]), parallel=int(raw["parallel"]),
                   n_threads=int(raw["n_threads"]), n_threads_batch=int(raw["n_threads_batch"]),
                   n_gpu_layers=int(raw["n_gpu_layers"]), embedding=bool(raw.get("embedding", False)),
                   tensor_split=tuple(float(share) for share in raw.get("tensor_split", ())),
                   cpu_only=bool(raw.get("cpu_only", False)))


def engine_argv(binary: Path, model: EngineModel, port: int) -> list[str]:
    """llama-server's command line for `model` (no secret in it)."""
    argv = [
        str(binary), "--model", model.path, "--alias", model.id, "--host", "127.0.0.1", "--port", str(port),
        "--ctx-size", str(model.n_ctx), "--parallel", str(model.parallel), "--kv-unified",
        "--threads", str(model.n_threads), "--threads-batch", str(model.n_threads_batch),
        "--n-gpu-layers", str(model.n_gpu_layers), "--offline", "--no-webui", "--metrics", "--jinja",
    ]
    if model.embedding:
        argv += ["--embedding", "--pooling", "mean"]
    if model.cpu_only:
        # "none": no offload device at all, so a CUDA build never puts weights or work on an unusable GPU
        argv += ["--device", "none"]
    elif len(model.tensor_split) >= 2 and model.n_gpu_layers > 0:
        # by whole layers (llama.cpp's default split mode, and what the plan's memory estimate assumes)
        argv += ["--split-mode", "layer", "--tensor-split", ",".join(f"{share:g}" for share in model.tensor_split)]
    return argv


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Engine:
    """One supervised llama-server."""

    binary: Path
    model: EngineModel
    environ: Mapping[str, str] = field(repr=False)
    port: int = 0
    key: str = field(default="", repr=False)
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    native_tools: bool = True  # whether the model's chat template renders tools (from the engine's /props)
    starts: list[float] = field(default_factory=list)

    async def start(self) -> None:
        self.port = free_loopback_port()
        self.key = secrets.token_urlsafe(32)
        env = {k: v for k, v in self.environ.items() if k in _ENGINE_ENV}
        env[ENGINE_KEY_ENV] = self.key
        self.ready = False
        self.starts.append(time.monotonic())
        try:
            self.process = await asyncio.create_subprocess_exec(
                *engine_argv(self.binary, self.model, self.port), env=env, cwd=str(self.binary.parent),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=None,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise ServeError(f"cannot start {self.binary}: {exc.strerror}") from exc

    async def wait_ready(self, timeout: float = LOAD_TIMEOUT) -> None:
        """Until the engine's /health says the model is loaded; ServeError if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.returncode is not None:
                code = None if self.process is None else self.process.returncode
                raise ServeError(f"llama-server for model {self.model.id!r} exited with status {code} while loading")
            if await asyncio.to_thread(_healthy, self.port):
                props = await asyncio.to_thread(_props, self.port, self.key)
                caps = props.get("chat_template_caps") if isinstance(props, dict) else None
                self.native_tools = bool(caps.get("supports_tools", True)) if isinstance(caps, dict) else True
                self.ready = True
                return
            await asyncio.sleep(0.1)
        raise ServeError(f"llama-server for model {self.model.id!r} did not load within {timeout:.0f} s")

    def may_restart(self) -> bool:
        now = time.monotonic()
        return len([t for t in self.starts if now - t < RESTART_WINDOW]) <= MAX_RESTARTS

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills the engine when serve goes, however it goes. SIGKILL, since
    llama-server's own shutdown can hang (seen while it loads), and it holds nothing that needs flushing."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _props(port: int, key: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/props", headers={"Authorization": f"Bearer {key}"})
    try:
        with opener.open(request, timeout=5) as reply:
            return json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _healthy(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Supervisor:
    """The engines of one serve process: started together, restarted when one crashes."""

    def __init__(self, binary: Path, models: Sequence[EngineModel], environ: Mapping[str, str]) -> None:
        if not os.access(binary, os.X_OK):
            raise ServeError(f"expected an executable engine at {binary}, found none; reinstall the bundle")
        self.engines = {m.id: Engine(binary, m, environ) for m in models}
        self.failed: str | None = None
        self.stopping = False  # once set, an engine that exits is not restarted

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines.values())

    async def start(self) -> None:
        for engine in self.engines.values():
            await engine.start()
        for engine in self.engines.values():
            await engine.wait_ready()

    async def watch(self) -> str:
        """Restart engines that exit; return why supervision ended (an engine crashed too often)."""
        while not self.stopping:
            for engine in self.engines.values():
                process = engine.process
                if process is not None and process.returncode is not None and not self.stopping:
                    engine.ready = False
                    if not engine.may_restart():
                        self.failed = (f"llama-server for model {engine.model.id!r} exited with status "
                                       f"{process.returncode} {MAX_RESTARTS + 1} times within {RESTART_WINDOW:.0f} s")
                        return self.failed
                    print(f"airgap.serve: llama-server for model {engine.model.id!r} exited with status "
                          f"{process.returncode}; restarting it", file=sys.stderr, flush=True)
                    await engine.start()
                    try:
                        await engine.wait_ready()
                    except ServeError as exc:
                        # died while loading: counted like any crash on the next pass; hung: ended, then counted
                        print(f"airgap.serve: {exc.message}", file=sys.stderr, flush=True)
                        await engine.stop()
            await asyncio.sleep(0.2)
        return "stopping"

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*(e.stop() for e in self.engines.values()))

    def terminate(self) -> None:
        """Ask every engine to stop now (from a signal handler: no waiting here)."""
        self.stopping = True
        for engine in self.engines.values():
            if engine.process is not None and engine.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    engine.process.terminate()
