"""gRPC's transport for ``serve --grpc-port``: HTTP/2 on the server's own event loop, with the
``h2`` package's state machine (python-hyper's, as httpx and hypercorn use it) and gRPC's
length-prefixed messages on it (gRPC's PROTOCOL-HTTP2.md). The handlers (``server/grpc.py``) see
a call shaped like grpc.aio's ``ServicerContext``: metadata, time remaining, trailing metadata,
abort.

Why not grpcio's own server: it runs every call through a thread of its own and back into the
event loop; on two cores it answered a trivial call slower than the HTTP front-end answers a whole
request, and carried 0.6 x HTTP/1.1's requests per second (BENCHMARKS.md, "gRPC beside HTTP"). The
messages stay protobuf, parsed and written by the generated classes.

What it holds to: a call's ``grpc-timeout`` is its deadline (DEADLINE_EXCEEDED when it passes); a
call the client resets (a cancel, a deadline on its side) is cancelled, never computed if still
queued; a message over the limit is RESOURCE_EXHAUSTED, the connection goes on; gzip and deflate
messages are taken; a broken HTTP/2 connection is closed with GOAWAY, other connections go on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

logger = logging.getLogger("modelport.server")

MAX_STREAMS = 1024  # calls in flight on one connection
WINDOW_BYTES = 4 * 1024 * 1024  # what a client may send ahead on a stream, and on a connection x 4
STREAM_BACKLOG = 128  # messages of one stream read but not taken; beyond it the client waits (window)
SEND_AHEAD_BYTES = 1024 * 1024  # answers of one stream waiting on the client's window before a stream waits
_PREFIX = struct.Struct(">BI")  # compressed flag, message length
_SEPARATE = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "user-agent"})
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")  # grpc-message: percent-encoded
_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                     (b"grpc-accept-encoding", b"identity,deflate,gzip")]
_CONFIG = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                                    validate_outbound_headers=False, normalize_inbound_headers=False,
                                    normalize_outbound_headers=False)


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
class _Stream:
    id: int
    method: Method
    call: Call
    decompress: Callable[[bytes], bytes] | None
    body: bytearray = field(default_factory=bytearray)  # bytes of a message not yet whole
    messages: asyncio.Queue | None = None  # a client stream's whole messages, then None at its end
    held_bytes: int = 0  # flow-control credit not given back yet: messages read but not taken
    task: asyncio.Task | None = None
    timer: asyncio.TimerHandle | None = None
    started: bool = False  # response headers sent
    finished: bool = False  # trailers sent (or the stream reset): nothing more goes out
    out: bytearray = field(default_factory=bytearray)  # answer bytes waiting on the client's window
    trailers: list | None = None  # sent once ``out`` is empty
    sent: asyncio.Event | None = None  # a stream's answers: ``out`` is short enough to add to
    failed: tuple | None = None  # (code, details) of a message that could not be taken


class _Connection(asyncio.Protocol):
    def __init__(self, server: "GrpcServer") -> None:
        self._server = server
        self._streams: dict[int, _Stream] = {}
        self._conn = h2.connection.H2Connection(_CONFIG)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._closing = False  # GOAWAY sent or received: closed once its calls are done

    # -- the connection -------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._server.connections.add(self)
        self._conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW_BYTES,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024})
        self._conn.initiate_connection()
        self._conn.increment_flow_control_window(4 * WINDOW_BYTES - 65535)
        self._flush()

    def connection_lost(self, exc) -> None:
        self._server.connections.discard(self)
        for stream in list(self._streams.values()):
            self._forget(stream, cancel=True)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # not HTTP/2, or broken: this connection only
            logger.info("gRPC connection closed: %s", exc)
            self._close(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                self._data(event)
            elif kind is h2.events.RequestReceived:
                self._request(event.stream_id, event.headers, event.stream_ended)
            elif kind is h2.events.StreamEnded:
                self._ended(event.stream_id)
            elif kind is h2.events.WindowUpdated:
                for stream in ([self._streams.get(event.stream_id)] if event.stream_id else list(self._streams.values())):
                    if stream is not None:
                        self._pump(stream)
            elif kind is h2.events.StreamReset:
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.finished = True
                    self._forget(stream, cancel=True)
            elif kind is h2.events.ConnectionTerminated:
                if event.error_code != h2.errors.ErrorCodes.NO_ERROR or not self._streams:
                    self._close(None)
                    return
                self._closing = True
        self._flush()

    def go_away(self) -> None:
        """Shutting down: no new calls on this connection; the ones in flight finish, then it closes.
        h2's own GOAWAY would close its state machine with calls still in flight, so the first one
        is hyperframe's frame, written beside h2's (as grpc-core's graceful GOAWAY)."""
        if self._transport is None or self._closing:
            return
        self._closing = True
        self._flush()
        self._transport.write(hyperframe.frame.GoAwayFrame(
            stream_id=0, last_stream_id=self._conn.highest_inbound_stream_id, error_code=0).serialize())
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._closing and not self._streams:
            self._close(h2.errors.ErrorCodes.NO_ERROR)

    @property
    def busy(self) -> bool:
        return bool(self._streams)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _close(self, error) -> None:
        if self._transport is None:
            return
        if error is not None:
            try:
                self._conn.close_connection(error_code=error)
            except h2.exceptions.ProtocolError:
                pass
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    # -- a call arrives -------------------------------------------------------------------------------

    def _request(self, stream_id: int, raw_headers, ended: bool) -> None:
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
        if not headers.get("content-type", b"").startswith(b"application/grpc"):  # gRPC's rule: not a call
            self._conn.send_headers(stream_id, [(b":status", b"415")], end_stream=True)
            return
        if self._closing:  # raced our GOAWAY: the client retries elsewhere
            self._trailers_only(stream_id, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            return
        method = self._server.methods.get(headers.get(":path", b"").decode("latin-1"))
        if method is None:
            self._trailers_only(stream_id, grpc.StatusCode.UNIMPLEMENTED, "unknown method")
            return
        encoding = headers.get("grpc-encoding", b"identity")
        decompress = _DECOMPRESS.get(encoding)
        if encoding not in _DECOMPRESS and encoding != b"identity":
            self._trailers_only(stream_id, grpc.StatusCode.UNIMPLEMENTED,
                                f"message encoding {encoding.decode('latin-1')!r} is not supported (identity, gzip, deflate)")
            return
        timeout_s = _timeout(headers.get("grpc-timeout"))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stream = _Stream(stream_id, method, Call(tuple(metadata), deadline), decompress)
        self._streams[stream_id] = stream
        if timeout_s is not None:
            stream.timer = self._loop.call_later(timeout_s, self._expired, stream)
        if method.streaming:
            stream.messages = asyncio.Queue()
            stream.task = self._loop.create_task(self._run_stream(stream))
        if ended:
            self._ended(stream_id)

    def _data(self, event) -> None:
        stream = self._streams.get(event.stream_id)
        credit = event.flow_controlled_length
        if stream is None or stream.finished or stream.failed is not None:  # answered already: drop it
            self._acknowledge(credit, event.stream_id)
            return
        stream.body += event.data
        if stream.messages is None:  # one message: bounded by the size limit, read as it comes
            self._acknowledge(credit, event.stream_id)
            if len(stream.body) > self._server.max_message_bytes + _PREFIX.size:
                self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, self._too_large(len(stream.body) - _PREFIX.size))
            return
        taken_before = stream.messages.qsize()
        self._split(stream)
        # A message still coming in is taken on credit (the limit bounds it); whole ones are paid
        # for when the handler takes them, so a client that sends without end waits on its window.
        if stream.messages.qsize() >= STREAM_BACKLOG and stream.messages.qsize() > taken_before:
            stream.held_bytes += credit
        else:
            self._acknowledge(credit, event.stream_id)

    def _ended(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.finished or stream.failed is not None:
            return
        if stream.messages is not None:
            self._split(stream)
            if stream.body:
                self._fail(stream, grpc.StatusCode.INVALID_ARGUMENT, "the stream ended inside a message")
            stream.messages.put_nowait(None)
            return
        self._split(stream, whole=True)

    def _split(self, stream: _Stream, whole: bool = False) -> None:
        """Whole messages out of ``stream.body``: a stream's into its queue; a unary call's one
        message (``whole``: the client has finished) starts its handler."""
        body, limit = stream.body, self._server.max_message_bytes
        while len(body) >= _PREFIX.size:
            compressed, length = _PREFIX.unpack_from(body)
            if length > limit:
                self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, self._too_large(length))
                return
            if len(body) < _PREFIX.size + length:
                break
            data = bytes(body[_PREFIX.size:_PREFIX.size + length])
            del body[:_PREFIX.size + length]
            if compressed:
                if stream.decompress is None:
                    self._fail(stream, grpc.StatusCode.INTERNAL, "a compressed message without grpc-encoding")
                    return
                try:
                    data = stream.decompress(data, limit)
                except (zlib.error, ValueError) as exc:
                    self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, ValueError)
                               else grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
            if stream.messages is not None:
                stream.messages.put_nowait((stream.method.parse(data), _PREFIX.size + length))
                continue
            if body or not whole:
                self._fail(stream, grpc.StatusCode.INVALID_ARGUMENT, "a unary call carries one message")
                return
            stream.task = self._loop.create_task(self._run_unary(stream, stream.method.parse(data)))
            return
        if whole and stream.messages is None:
            self._fail(stream, grpc.StatusCode.INVALID_ARGUMENT,
                       "the call ended inside a message" if body else "a unary call carries one message, got none")

    def _fail(self, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
        """A message that cannot be taken: the call ends with ``code``; the rest of what the client
        sends on it is read and dropped (the connection goes on)."""
        stream.failed = (code, details)
        stream.body.clear()
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()  # a stream's handler: its answers so far went out
        self._finish(stream, code, details, [])

    def _too_large(self, length: int) -> str:
        return f"received message larger than max ({length} vs. {self._server.max_message_bytes} bytes)"  # grpc's words

    def _expired(self, stream: _Stream) -> None:
        if not stream.finished:
            if stream.task is not None:
                stream.task.cancel()
            self._finish(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", stream.call.trailing)
            self._flush()

    def _acknowledge(self, credit: int, stream_id: int) -> None:
        if credit:  # h2 gives the connection's share back even when the stream is gone
            self._conn.acknowledge_received_data(credit, stream_id)

    # -- running it -----------------------------------------------------------------------------------

    async def _run_unary(self, stream: _Stream, request) -> None:
        try:
            response = await stream.method.handler(request, stream.call)
            self._send_message(stream, stream.method.serialize(response))
            self._finish(stream, grpc.StatusCode.OK, "", stream.call.trailing)
        except Abort as exc:
            self._finish(stream, exc.code, exc.details, stream.call.trailing)
        except asyncio.CancelledError:  # reset by the client, its deadline, or the connection gone
            pass
        except Exception:
            logger.exception("gRPC call failed")
            self._finish(stream, grpc.StatusCode.INTERNAL, "internal error", [])
        self._flush()

    async def _run_stream(self, stream: _Stream) -> None:
        try:
            async for response in stream.method.handler(self._requests(stream), stream.call):
                self._send_message(stream, stream.method.serialize(response))
                self._flush()
                while len(stream.out) > SEND_AHEAD_BYTES and not stream.finished:
                    stream.sent = asyncio.Event()
                    await stream.sent.wait()
            if stream.failed is None:
                self._finish(stream, grpc.StatusCode.OK, "", stream.call.trailing)
        except Abort as exc:
            self._finish(stream, exc.code, exc.details, stream.call.trailing)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("gRPC stream failed")
            self._finish(stream, grpc.StatusCode.INTERNAL, "internal error", [])
        self._flush()

    async def _requests(self, stream: _Stream) -> AsyncIterator:
        while True:
            item = await stream.messages.get()
            if item is None:
                return
            request, size = item
            if stream.held_bytes and stream.messages.qsize() < STREAM_BACKLOG:  # room again: pay what was held
                self._acknowledge(stream.held_bytes, stream.id)
                stream.held_bytes = 0
                self._flush()
            yield request

    # -- answers --------------------------------------------------------------------------------------

    def _send_message(self, stream: _Stream, message: bytes) -> None:
        if stream.finished:
            return
        self._start(stream)
        stream.out += _PREFIX.pack(0, len(message))
        stream.out += message
        self._pump(stream)

    def _start(self, stream: _Stream) -> None:
        if not stream.started:
            stream.started = True
            self._headers(stream, _RESPONSE_HEADERS)

    def _headers(self, stream: _Stream, headers: list, end: bool = False) -> None:
        try:
            self._conn.send_headers(stream.id, headers, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):  # reset under us
            stream.finished = True
            self._forget(stream, cancel=False)

    def _finish(self, stream: _Stream, code: grpc.StatusCode, details: str, metadata) -> None:
        if stream.finished or stream.trailers is not None:
            return
        trailers = [(b"grpc-status", str(code.value[0]).encode())]
        if details:
            trailers.append((b"grpc-message", urllib.parse.quote(details, safe=_MESSAGE_SAFE).encode()))
        for name, value in metadata:
            if name.endswith("-bin"):
                value = base64.b64encode(value).rstrip(b"=")
            trailers.append((name.encode("latin-1"), value if isinstance(value, bytes) else str(value).encode("latin-1")))
        if not stream.started:  # trailers only: one HEADERS frame
            stream.started = stream.finished = True
            self._headers(stream, [(b":status", b"200"), (b"content-type", b"application/grpc")] + trailers, end=True)
            self._forget(stream, cancel=False)
            return
        stream.trailers = trailers
        self._pump(stream)

    def _pump(self, stream: _Stream) -> None:
        """Send what the client's window lets through; trailers once the answers are all out."""
        conn = self._conn
        try:
            while stream.out and not stream.finished:
                room = min(conn.local_flow_control_window(stream.id), conn.max_outbound_frame_size, len(stream.out))
                if room <= 0:
                    break
                conn.send_data(stream.id, bytes(stream.out[:room]))
                del stream.out[:room]
            if stream.sent is not None and len(stream.out) <= SEND_AHEAD_BYTES:
                stream.sent.set()
            if not stream.out and stream.trailers is not None and not stream.finished:
                stream.finished = True
                conn.send_headers(stream.id, stream.trailers, end_stream=True)
                self._forget(stream, cancel=False)  # what the client still sends on it is dropped
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):  # reset under us
            stream.finished = True
            self._forget(stream, cancel=False)

    def _forget(self, stream: _Stream, cancel: bool) -> None:
        self._streams.pop(stream.id, None)
        if stream.timer is not None:
            stream.timer.cancel()
        if cancel and stream.task is not None and not stream.task.done():
            stream.task.cancel()
        if stream.sent is not None:
            stream.sent.set()
        if self._closing and not self._streams:  # after this call's last frame has gone out
            self._loop.call_soon(self._close_if_idle)

    def _trailers_only(self, stream_id: int, code: grpc.StatusCode, details: str) -> None:
        self._conn.send_headers(stream_id, [
            (b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", str(code.value[0]).encode()),
            (b"grpc-message", urllib.parse.quote(details, safe=_MESSAGE_SAFE).encode())], end_stream=True)


def _timeout(value: bytes | None) -> float | None:
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
        out = inflater.decompress(data, limit + 1)
        if len(out) > limit:
            raise ValueError(f"received message larger than max once decompressed (> {limit} bytes)")
        return out
    return decompress


_DECOMPRESS = {b"gzip": _inflate(16 + zlib.MAX_WBITS), b"deflate": _inflate(zlib.MAX_WBITS)}


class GrpcServer:
    """The listening socket and its connections; ``stop(grace_s)`` lets calls in flight finish."""

    def __init__(self, methods: dict[str, Method], max_message_bytes: int) -> None:
        self.methods, self.max_message_bytes = methods, max_message_bytes
        self.connections: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.get_running_loop().create_server(lambda: _Connection(self), host, port)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float) -> None:
        # Stop accepting -> GOAWAY on every connection (calls in flight go on) -> wait for them,
        # at most grace_s -> close what is left.
        self._server.close()
        for connection in list(self.connections):
            connection.go_away()
        deadline = time.monotonic() + grace_s
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
