"""The front door in front of llama-server: key, caps, dialects, errors, streaming. ASGI, no framework.

Every scope is guarded: `http` is checked and proxied, `websocket` is refused (llama-server has no websocket
API, so nothing may reach it that way), `lifespan` is acknowledged. What a client gets back is always an
OpenAI-style error body on a 4xx (never the engine's internals or a server path), or the engine's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from airgap.serve.dialects import Adapted, ClientError, ModelLimits, adapt, choose_model
from airgap.serve.proxy import SseEvents, Upstream, UpstreamError, event_json, read_all, request, sse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
UpstreamFor = Callable[[str], Upstream | None]  # model id -> its engine, None while it is (re)starting

_ENGINE_ERROR_LIMIT = 1 << 20


@dataclass(frozen=True)
class GuardSettings:
    api_key: bytes | None
    models: Mapping[str, ModelLimits]
    max_request_bytes: int


class EngineGuard:
    """ASGI app: checks each request, adapts it to llama-server, proxies it and adapts the answer."""

    def __init__(self, settings: GuardSettings, upstream_for: UpstreamFor, ready: Callable[[], bool]) -> None:
        self.settings = settings
        self.upstream_for = upstream_for
        self.ready = ready
        self.created = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return
        try:
            await self._http(scope, receive, send)
        except ClientError as error:
            await respond(send, error.status, error.body())

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path == "/health":
            status, state = (200, "ok") if self.ready() else (503, "loading")
            await respond(send, status, {"status": state}, head=method == "HEAD")
            return
        if self.settings.api_key is not None and not _authorized(scope, self.settings.api_key):
            raise ClientError(401, "Incorrect API key provided.", "invalid_api_key")
        if method == "GET" and path in ("/v1/models", "/models"):
            await respond(send, 200, self._models())
            return
        if method == "GET" and path == "/metrics":
            await self._metrics(send)
            return
        if method != "POST":
            raise ClientError(404 if method in ("GET", "HEAD") else 405, f"Unknown endpoint {method} {path}.",
                              "unknown_url")
        body = await read_body(receive, self.settings.max_request_bytes)
        if body is None:
            raise ClientError(413, f"Request body is larger than {self.settings.max_request_bytes} bytes.",
                              "request_too_large")
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientError(400, "We could not parse the JSON body of your request.", "invalid_json") from exc
        if not isinstance(document, dict):
            raise ClientError(400, f"Expected a JSON object as the request body, found {type(document).__name__}.",
                              "invalid_json")
        upstream = self.upstream_for(choose_model(document, self.settings.models).id)
        adapted = adapt(path, document, self.settings.models, mistral_client=_is_mistral(scope),
                        native_tools=upstream.native_tools if upstream is not None else True)
        if upstream is None:
            await respond(send, 503, _error("The model is loading; retry shortly.", "model_loading", "server_error"))
            return
        await self._forward(upstream, adapted, path, receive, send)

    def _models(self) -> dict[str, Any]:
        data = []
        for limits in self.settings.models.values():
            chat = not limits.embedding
            data.append({
                "id": limits.id, "object": "model", "created": self.created, "owned_by": "airgap", "type": "base",
                "max_context_length": limits.n_ctx,
                "capabilities": {"completion_chat": chat, "function_calling": chat, "completion_fim": chat,
                                 "fine_tuning": False, "vision": False, "classification": False},
            })
        return {"object": "list", "data": data}

    async def _metrics(self, send: Send) -> None:
        parts = []
        for model in self.settings.models:
            upstream = self.upstream_for(model)
            if upstream is None:
                continue
            with contextlib.suppress(UpstreamError):
                async with request(upstream, "GET", "/metrics") as reply:
                    text = (await read_all(reply.chunks, _ENGINE_ERROR_LIMIT)).decode("utf-8", "replace")
                    if reply.status == 200:
                        parts.append(f"# airgap model {model}\n{text}")
        body = "".join(parts).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain; version=0.0.4"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _forward(self, upstream: Upstream, adapted: Adapted, client_path: str, receive: Receive,
                       send: Send) -> None:
        payload = json.dumps(adapted.body).encode()
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        try:
            proxied = asyncio.create_task(self._proxy(upstream, adapted, client_path, payload, send))
            done, _ = await asyncio.wait({proxied, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if proxied not in done:  # the client went away: closing the engine connection frees its slot
                proxied.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, UpstreamError):
                    await proxied
                return
            proxied.result()
        finally:
            watcher.cancel()

    async def _proxy(self, upstream: Upstream, adapted: Adapted, client_path: str, payload: bytes,
                     send: Send) -> None:
        try:
            async with request(upstream, "POST", adapted.path, payload) as reply:
                if reply.status >= 400:
                    text = await read_all(reply.chunks, _ENGINE_ERROR_LIMIT)
                    status, body = engine_error(reply.status, text)
                    await respond(send, status, body)
                    return
                fim = client_path.endswith("/fim/completions")
                if adapted.tools_as_json:
                    document = tool_call_response(json.loads(await read_all(reply.chunks)))
                    if not adapted.stream:
                        await respond(send, 200, document)
                        return
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
                    for piece in tool_call_chunks(document, with_usage=not adapted.drop_usage_chunk):
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
                    await send({"type": "http.response.body", "body": b""})
                    return
                if not adapted.stream:
                    document = json.loads(await read_all(reply.chunks))
                    if fim:
                        document = fim_response(document, adapted.model)
                    elif adapted.path == "/v1/embeddings":
                        document = embeddings_response(document)
                    await respond(send, 200, document)
                    return
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
                async for piece in _stream(reply.chunks, adapted, fim):
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except UpstreamError:
            await respond(send, 502, _error("The model engine is not reachable; retry shortly.",
                                            "engine_unavailable", "server_error"))


async def _stream(chunks: AsyncIterator[bytes], adapted: Adapted, fim: bool) -> AsyncIterator[bytes]:
    """The engine's SSE events, passed on; FIM events rewritten to chat chunks; usage placed as the client wants."""
    events = SseEvents()
    held: dict[str, Any] | None = None  # the chunk with finish_reason, held until usage arrives (Mistral)
    stream_id = f"cmpl-{uuid.uuid4().hex}"
    async for chunk in chunks:
        for event in events.feed(chunk):
            document = event_json(event)
            if document is None:
                if event.strip() == b"data: [DONE]":
                    if held is not None:
                        yield sse(held)
                        held = None
                    yield b"data: [DONE]\n\n"
                continue
            if "error" in document:
                yield sse({"error": _public_error(document["error"])})
                continue
            if fim:
                document = fim_chunk(document, adapted.model, stream_id)
            choices = document.get("choices") or []
            usage_only = not choices and document.get("usage") is not None
            if usage_only and adapted.usage_in_last_chunk and held is not None:
                held["usage"] = document["usage"]
                yield sse(held)
                held = None
                continue
            if usage_only and adapted.drop_usage_chunk:
                continue
            if adapted.usage_in_last_chunk and any(c.get("finish_reason") for c in choices):
                held = document
                continue
            yield sse(document)
    if held is not None:
        yield sse(held)
    if fim:
        yield b"data: [DONE]\n\n"


def tool_call_response(document: dict[str, Any]) -> dict[str, Any]:
    """The engine's constrained JSON answer ({"name", "arguments"}) as an assistant message with tool_calls."""
    choices = []
    for choice in document.get("choices") or []:
        message = choice.get("message") or {}
        try:
            call = json.loads(message.get("content") or "")
            name, arguments = str(call["name"]), call["arguments"]
        except (ValueError, KeyError, TypeError):
            choices.append(choice)  # cut short (max_tokens): passed on as the text it is
            continue
        choices.append({**choice, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)}}]}})
    return {**document, "choices": choices}


def tool_call_chunks(document: Mapping[str, Any], with_usage: bool) -> list[bytes]:
    base = {"id": document.get("id", f"chatcmpl-{uuid.uuid4().hex}"), "object": "chat.completion.chunk",
            "created": document.get("created", int(time.time())), "model": document.get("model")}
    pieces = []
    for choice in document.get("choices") or []:
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
        pieces.append(sse({**base, "choices": [{"index": choice.get("index", 0), "delta": delta,
                                                 "finish_reason": choice.get("finish_reason")}],
                           **({"usage": document.get("usage")} if with_usage else {})}))
    return [*pieces, b"data: [DONE]\n\n"]


def embeddings_response(document: dict[str, Any]) -> dict[str, Any]:
    """llama-server's embeddings with what the Mistral SDK also requires: an id, and usage of the usual shape."""
    usage = document.get("usage")
    prompt = int(usage.get("prompt_tokens", 0)) if isinstance(usage, dict) else 0
    return {"id": f"embd-{uuid.uuid4().hex}", **document,
            "usage": {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}}


def fim_response(document: Mapping[str, Any], model: str) -> dict[str, Any]:
    """llama-server's /infill answer as Mistral's FIM completion (the shape of a chat completion)."""
    prompt, completion = int(document.get("tokens_evaluated", 0)), int(document.get("tokens_predicted", 0))
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": str(document.get("content", ""))},
                     "finish_reason": _finish(document)}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def fim_chunk(document: Mapping[str, Any], model: str, stream_id: str) -> dict[str, Any]:
    stop = bool(document.get("stop", False))
    chunk: dict[str, Any] = {
        "id": stream_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": {"content": str(document.get("content", ""))},
                     "finish_reason": _finish(document) if stop else None}],
    }
    if stop:
        prompt, completion = int(document.get("tokens_evaluated", 0)), int(document.get("tokens_predicted", 0))
        chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}
    return chunk


def _finish(document: Mapping[str, Any]) -> str:
    return "length" if document.get("stop_type") == "limit" or document.get("truncated") else "stop"


def engine_error(status: int, text: bytes) -> tuple[int, dict[str, Any]]:
    """The engine's error as the client sees it: a 4xx with an OpenAI error body; internals stay out."""
    try:
        document = json.loads(text)
        error = document.get("error") if isinstance(document, dict) else None
    except (ValueError, UnicodeDecodeError):
        error = None
    if not isinstance(error, dict):
        error = {"message": "The model engine could not process the request.", "type": "server_error"}
    public = _public_error(error)
    kind = str(error.get("type", ""))
    if kind in ("exceed_context_size_error", "invalid_request_error", "not_supported_error") or status == 400:
        return 400, {"error": {**public, "type": "invalid_request_error"}}
    if status == 401:  # the engine's own key: the guard's fault, never the client's
        return 502, _error("The model engine refused the guard.", "engine_unavailable", "server_error")
    return (status if 400 <= status < 500 else 500), {"error": public}


def _public_error(error: Mapping[str, Any]) -> dict[str, Any]:
    message = str(error.get("message", "The request failed."))
    # Engine messages can name source files (llama.cpp asserts): keep only the first line, without paths.
    first = message.splitlines()[0] if message else "The request failed."
    if "/" in first and (".cpp" in first or ".h:" in first or "/usr/" in first or "/tmp/" in first):
        first = "The model engine could not process the request."
    return {"message": first[:500], "type": str(error.get("type", "invalid_request_error")),
            "param": error.get("param"), "code": error.get("code") if isinstance(error.get("code"), str) else None}


def _error(message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _authorized(scope: Scope, key: bytes) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
    return False


def _is_mistral(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"user-agent":
            return b"mistral" in bytes(value).lower()
    return False


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def respond(send: Send, status: int, document: Mapping[str, Any], head: bool = False) -> None:
    body = json.dumps(document).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def limits_for(models: Sequence[Mapping[str, Any]]) -> dict[str, ModelLimits]:
    return {str(m["id"]): ModelLimits(
        id=str(m["id"]), n_ctx=int(m["n_ctx"]), parallel=int(m["parallel"]),
        max_tokens_default=int(m["max_tokens_default"]), max_tokens_cap=int(m["max_tokens_cap"]),
        embedding=bool(m.get("embedding", False)),
    ) for m in models}
