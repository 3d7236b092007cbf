"""What a gRPC handler sees of its call (the part of grpc.aio's ``ServicerContext`` that
``server/grpc.py`` uses), and the plain values of gRPC's HTTP/2 mapping: the deadline
(``grpc-timeout``), message compression, the status trailers (gRPC's PROTOCOL-HTTP2.md)."""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc

_SEPARATE = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "user-agent"})
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")  # grpc-message: percent-encoded


@dataclass(frozen=True)
class Method:
    """One RPC: its handler (``async (request, call) -> response``; for a stream from the client,
    ``(async iterator of requests, call) -> async iterator of responses``) and its message codecs."""
    handler: Callable
    parse: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    streaming: bool = False


class Abort(Exception):
    """``await call.abort(code, details)``: the call ends with that status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Call:
    """What a handler knows of its call (the part of grpc.aio's ``ServicerContext`` it uses)."""

    def __init__(self, metadata: tuple, deadline: float | None) -> None:
        self._metadata, self._deadline = metadata, deadline
        self.trailing: list[tuple[str, str]] = []

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = list(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        raise Abort(code, details)


@dataclass(eq=False, slots=True)
class Stream:
    """One call on a connection, as the transport keeps it."""
    id: int
    method: Method
    call: Call
    decompress: Callable[[bytes], bytes] | None
    body: bytearray = field(default_factory=bytearray)  # bytes of a message not yet whole
    messages: asyncio.Queue | None = None  # a client stream's whole messages, then None at its end
    held_bytes: int = 0  # flow-control credit not given back yet: messages read but not taken
    client_done: bool = False  # a stream's client has ended it
    end_queued: bool = False  # ... and its queue holds the end (None) after its last message
    task: asyncio.Task | None = None
    timer: asyncio.TimerHandle | None = None  # its deadline
    stall: asyncio.TimerHandle | None = None  # waiting on the client: its message, or its window
    started: bool = False  # response headers sent
    finished: bool = False  # trailers sent (or the stream reset): nothing more goes out
    out: bytearray = field(default_factory=bytearray)  # answer bytes waiting on the client's window
    trailers: list | None = None  # sent once ``out`` is empty
    sent: asyncio.Event | None = None  # a stream's answers: ``out`` is short enough to add to
    failed: tuple | None = None  # (code, details) of a message that could not be taken


def read_headers(raw_headers) -> tuple[dict[str, bytes], tuple]:
    """A call's HTTP/2 headers -> (the ones gRPC itself reads, by name; the call's metadata: str
    values, bytes for ``-bin`` keys)."""
    headers, metadata = {}, []
    for name, value in raw_headers:
        name = name.decode("latin-1")
        if name.startswith(":") or name in _SEPARATE:
            headers[name] = value
        elif name.endswith("-bin"):
            try:
                metadata.append((name, base64.b64decode(value + b"=" * (-len(value) % 4))))
            except ValueError:
                pass
        else:
            metadata.append((name, value.decode("latin-1")))
    return headers, tuple(metadata)


def grpc_timeout(value: bytes | None) -> float | None:
    """``grpc-timeout``: up to 8 digits and a unit (H M S m u n)."""
    if not value or len(value) > 9:
        return None
    digits, unit = value[:-1], chr(value[-1])
    if not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def _inflate(wbits: int):
    def decompress(data: bytes, limit: int) -> bytes:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"a message that does not decompress: {exc}") from None
        if len(out) > limit:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"received message larger than max once decompressed "
                                                            f"(> {limit} bytes)")
        return out
    return decompress


DECOMPRESS = {b"gzip": _inflate(16 + zlib.MAX_WBITS), b"deflate": _inflate(zlib.MAX_WBITS)}


def status_trailers(code: grpc.StatusCode, details: str, metadata) -> list[tuple[bytes, bytes]]:
    """``grpc-status``, ``grpc-message`` and the trailing metadata (``-bin`` values in base64)."""
    trailers = [(b"grpc-status", str(code.value[0]).encode())]
    if details:
        trailers.append((b"grpc-message", urllib.parse.quote(details, safe=_MESSAGE_SAFE).encode()))
    for name, value in metadata:
        if name.endswith("-bin"):
            value = base64.b64encode(value).rstrip(b"=")
        trailers.append((name.encode("latin-1"), value if isinstance(value, bytes) else str(value).encode("latin-1")))
    return trailers


def decompressed(data: bytes, decompress: Callable | None, limit: int) -> bytes:
    """A message sent with the compressed flag, inflated (Abort with the status to answer)."""
    if decompress is None:
        raise Abort(grpc.StatusCode.INTERNAL, "a compressed message without grpc-encoding")
    return decompress(data, limit)


def too_large(length: int, limit: int) -> str:
    return f"received message larger than max ({length} vs. {limit} bytes)"  # grpc's own words
