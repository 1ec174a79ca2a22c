"""A small HTTP/1.1 client for the loopback engine, streaming the answer back as ASGI messages (h11 lives here).

One connection per request: on loopback that costs well under a millisecond, and closing it is how a client
that went away frees its engine slot at once (llama-server stops a task whose connection closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import h11

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

_HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"server",
                          b"access-control-allow-origin", b"access-control-allow-credentials", b"date"})


class UpstreamError(Exception):
    """The engine could not be reached or broke the connection."""


@dataclass(frozen=True)
class Upstream:
    port: int
    key: str = field(repr=False)
    host: str = "127.0.0.1"
    native_tools: bool = True  # the model's chat template renders tools (llama-server /props)


@dataclass(frozen=True)
class UpstreamReply:
    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: AsyncIterator[bytes]


@contextlib.asynccontextmanager
async def request(upstream: Upstream, method: str, path: str, body: bytes = b"") -> AsyncIterator[UpstreamReply]:
    """Send one request to the engine; yield its status, headers and body chunks; close the connection after."""
    try:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    except OSError as exc:
        raise UpstreamError(f"engine on port {upstream.port} unreachable: {exc.strerror or exc}") from exc
    connection = h11.Connection(h11.CLIENT)
    try:
        headers = [("host", f"{upstream.host}:{upstream.port}"), ("authorization", f"Bearer {upstream.key}"),
                   ("connection", "close"), ("content-length", str(len(body)))]
        if body:
            headers.append(("content-type", "application/json"))
        writer.write(connection.send(h11.Request(method=method, target=path, headers=headers)))
        if body:
            writer.write(connection.send(h11.Data(data=body)))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()
        response = await _next_event(connection, reader)
        if not isinstance(response, h11.Response):
            raise UpstreamError(f"expected a response from the engine, found {type(response).__name__}")
        kept = [(bytes(k).lower(), bytes(v)) for k, v in response.headers if bytes(k).lower() not in _HOP_HEADERS]
        yield UpstreamReply(response.status_code, kept, _body(connection, reader))
    except (OSError, h11.ProtocolError) as exc:
        raise UpstreamError(f"engine on port {upstream.port} broke the connection: {exc}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _next_event(connection: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(65536))  # b"" at end of stream: h11 reports the close
            continue
        return event


async def _body(connection: h11.Connection, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        event = await _next_event(connection, reader)
        if isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return


async def read_all(chunks: AsyncIterator[bytes], limit: int = 64 << 20) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise UpstreamError(f"engine answer larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


class SseEvents:
    """Split an SSE byte stream into whole events (`data: ...` blocks separated by a blank line)."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self.pending += chunk.replace(b"\r\n", b"\n")
        *events, self.pending = self.pending.split(b"\n\n")
        return [e for e in events if e.strip()]


def event_json(event: bytes) -> Any:
    """The JSON of a `data: {...}` event; None for `data: [DONE]`, comments and anything else."""
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines or lines[0] == b"[DONE]":
        return None
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None


def sse(document: Any) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"
