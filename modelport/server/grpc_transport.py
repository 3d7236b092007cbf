"""gRPC's transport for ``serve --grpc-port``: HTTP/2 on the server's own event loop (the framing
in ``http2.py``, header blocks by ``hpack``) and gRPC's length-prefixed messages on it (gRPC's
PROTOCOL-HTTP2.md). The handlers (``server/grpc.py``) see a call shaped like grpc.aio's
``ServicerContext`` (``grpc_call.py``).

Not grpcio's server: it hands every call between a thread of its own and the event loop, and
carried 0.6 x HTTP's requests per second (docs/decisions.md). Messages stay the generated classes'.

What it holds to: a call's ``grpc-timeout`` is its deadline (DEADLINE_EXCEEDED when it passes); a
call the client resets (a cancel, a deadline on its side) is cancelled, never computed if still
queued; a message over the limit is RESOURCE_EXHAUSTED, the connection goes on; gzip and deflate
messages are taken; a broken HTTP/2 connection is closed with GOAWAY, other connections go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc

from modelport.server import http2
from modelport.server.grpc_answers import PREFIX, SEND_AHEAD_BYTES, Answers
from modelport.server.grpc_call import (DECOMPRESS, Abort, Call, Stream, decompressed, grpc_timeout,
                                        read_headers, too_large)

logger = logging.getLogger("modelport.server")

MAX_STREAMS = 1024  # calls in flight on one connection
WINDOW_BYTES = 4 * 1024 * 1024  # what a client may send ahead on a stream, and on a connection x 4
STREAM_BACKLOG = 128  # messages of one stream read but not taken; beyond it the client waits (window)


class Connection(Answers, asyncio.Protocol):
    """One client's HTTP/2 connection. ``server`` holds ``methods``, ``max_message_bytes``,
    ``read_timeout_s``, ``write_timeout_s`` and the set of ``connections``."""

    def __init__(self, server) -> None:
        self._server = server
        self._streams: dict[int, Stream] = {}
        self._conn = http2.ServerConnection(MAX_STREAMS, WINDOW_BYTES, 4 * WINDOW_BYTES, 64 * 1024)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._closing = False  # GOAWAY sent or received: closed once its calls are done
        self._idle: asyncio.TimerHandle | None = None  # no call on it: closed when this fires
        self._stalled: asyncio.TimerHandle | None = None  # the client reads none of what is written
        self._flushing = False  # a write of what the calls answered is due this turn of the loop

    # -- the connection -------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._server.connections.add(self)
        self._conn.initiate()
        self._flush()
        self._idle = self._loop.call_later(self._server.read_timeout_s, self._idle_out)  # its first call, soon

    # Slow clients (RELIABILITY.md): a connection that starts no call within the read timeout, or
    # none for IDLE_S after its last, is closed (GOAWAY); a unary call whose message has not arrived
    # within the read timeout, or whose answer waits on the client's window for the write timeout,
    # is reset; a client that reads nothing for the write timeout loses its connection.

    def _idle_out(self) -> None:
        self._idle = None
        if not self._streams:
            self.go_away()

    def pause_writing(self) -> None:  # nothing more is read meanwhile (PINGs and SETTINGS would want answers)
        self._stalled = self._loop.call_later(self._server.write_timeout_s, self.abort)
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
        if self._transport is not None:
            self._transport.resume_reading()

    def connection_lost(self, exc) -> None:
        self._server.connections.discard(self)
        self._transport = None  # first: forgetting its calls re-arms no timer
        for timer in (self._idle, self._stalled):
            if timer is not None:
                timer.cancel()
        for stream in list(self._streams.values()):
            self._forget(stream, cancel=True)

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive(data)
        except http2.Broken as exc:  # not HTTP/2, or broken: this connection only
            logger.info("gRPC connection closed: %s", exc)
            self._close(exc.code)
            return
        for event in events:
            kind = event[0]
            if kind == http2.BODY:
                self._data(*event[1:])
            elif kind == http2.REQUEST:
                self._request(*event[1:])
            elif kind == http2.ENDED:
                self._ended(event[1])
            elif kind == http2.WINDOW:
                for stream in ([self._streams.get(event[1])] if event[1] else list(self._streams.values())):
                    if stream is not None:
                        self._pump(stream)
            elif kind == http2.RESET:
                stream = self._streams.get(event[1])
                if stream is not None:
                    stream.finished = True
                    self._forget(stream, cancel=True)
            elif kind == http2.TERMINATED:
                if event[1] != http2.NO_ERROR or not self._streams:
                    self._close(None)
                    return
                self._closing = True
        self._flush()

    def go_away(self) -> None:
        """Shutting down: no new calls on this connection; the ones in flight finish, then it closes."""
        if self._transport is None or self._closing:
            return
        self._closing = True
        self._conn.go_away(http2.NO_ERROR)
        self._flush()
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._closing and not self._streams:
            self._close(http2.NO_ERROR)

    def abort(self) -> None:
        if self._transport is not None:
            self._flush()  # answers finished this turn of the loop go first
            self._transport.abort()

    def _close(self, error) -> None:
        if self._transport is None:
            return
        if error is not None:
            self._conn.go_away(error)
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        self._flushing = False
        data = self._conn.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    def _flush_soon(self) -> None:
        """Calls that end in the same turn of the event loop (a batch's answers) go out in one write."""
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    # -- a call arrives -------------------------------------------------------------------------------

    def _request(self, stream_id: int, raw_headers, ended: bool) -> None:
        headers, metadata = read_headers(raw_headers)
        if not headers.get("content-type", b"").startswith(b"application/grpc"):  # gRPC's rule: not a call
            self._answer_once(stream_id, [(b":status", b"415")])
            return
        if self._closing:  # raced our GOAWAY: the client retries elsewhere
            self._trailers_only(stream_id, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            return
        method = self._server.methods.get(headers.get(":path", b"").decode("latin-1"))
        if method is None:
            self._trailers_only(stream_id, grpc.StatusCode.UNIMPLEMENTED, "unknown method")
            return
        encoding = headers.get("grpc-encoding", b"identity")
        decompress = DECOMPRESS.get(encoding)
        if encoding not in DECOMPRESS and encoding != b"identity":
            self._trailers_only(stream_id, grpc.StatusCode.UNIMPLEMENTED,
                                f"message encoding {encoding.decode('latin-1')!r} is not supported (identity, gzip, deflate)")
            return
        timeout_s = grpc_timeout(headers.get("grpc-timeout"))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stream = Stream(stream_id, method, Call(metadata, deadline), decompress)
        self._streams[stream_id] = stream
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not method.streaming:  # its one message is due within the read timeout
            stream.stall = self._loop.call_later(self._server.read_timeout_s, self._stall, stream)
        if timeout_s is not None:
            stream.timer = self._loop.call_later(timeout_s, self._expired, stream)
        if method.streaming:
            stream.messages = asyncio.Queue()
            stream.task = self._loop.create_task(self._run(stream, method.handler(self._requests(stream), stream.call)))
        if ended:
            self._ended(stream_id)

    def _data(self, stream_id: int, data: bytes, credit: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.finished or stream.failed is not None:  # answered already: drop it
            self._acknowledge(credit, stream_id)
            return
        stream.body += data
        if stream.messages is None:  # one message: bounded by the size limit, read as it comes
            self._acknowledge(credit, stream_id)
            limit = self._server.max_message_bytes
            if len(stream.body) > limit + PREFIX.size:
                self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, too_large(len(stream.body) - PREFIX.size, limit))
            return
        self._more(stream)
        # Taken on credit while the handler has fewer than STREAM_BACKLOG messages waiting; beyond,
        # the bytes wait unparsed and are paid for as it takes messages, so a client that sends
        # without end waits on its window (and a flood of tiny messages stays bytes, not objects).
        if stream.messages.qsize() >= STREAM_BACKLOG and self._streams.get(stream_id) is stream:
            stream.held_bytes += credit
        else:
            self._acknowledge(credit, stream_id)

    def _ended(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.finished or stream.failed is not None:
            return
        if stream.messages is not None:
            stream.client_done = True
            self._more(stream)
            return
        self._split(stream, whole=True)

    def _more(self, stream: Stream) -> None:
        """A stream's whole messages into its queue (up to STREAM_BACKLOG); once the client has
        ended it and all are in, the end."""
        if self._split(stream) and stream.client_done and not stream.end_queued and stream.failed is None:
            if stream.body:
                self._fail(stream, grpc.StatusCode.INVALID_ARGUMENT, "the stream ended inside a message")
                return
            stream.end_queued = True
            stream.messages.put_nowait(None)

    def _split(self, stream: Stream, whole: bool = False) -> bool:
        """Whole messages out of ``stream.body``: a stream's into its queue, until STREAM_BACKLOG
        wait there (False then, or on a failure); a unary call's one message (``whole``: the
        client has finished) starts its handler."""
        body, limit = stream.body, self._server.max_message_bytes
        while len(body) >= PREFIX.size:
            if stream.messages is not None and stream.messages.qsize() >= STREAM_BACKLOG:
                return False
            compressed, length = PREFIX.unpack_from(body)
            if length > limit:
                self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, too_large(length, limit))
                return False
            if len(body) < PREFIX.size + length:
                break
            data = bytes(body[PREFIX.size:PREFIX.size + length])
            del body[:PREFIX.size + length]
            if compressed:
                try:
                    data = decompressed(data, stream.decompress, limit)
                except Abort as exc:
                    self._fail(stream, exc.code, exc.details)
                    return False
            if stream.messages is not None:
                stream.messages.put_nowait((stream.method.parse(data), PREFIX.size + length))
                continue
            if body or not whole:
                self._fail(stream, grpc.StatusCode.INVALID_ARGUMENT, "a unary call carries one message")
                return False
            stream.task = self._loop.create_task(self._run(stream, _one(stream, stream.method.parse(data))))
            stream.stall.cancel()
            return True
        if whole and stream.messages is None:
            self._fail(stream, grpc.StatusCode.INVALID_ARGUMENT,
                       "the call ended inside a message" if body else "a unary call carries one message, got none")
        return True

    def _fail(self, stream: Stream, code: grpc.StatusCode, details: str) -> None:
        """A message that cannot be taken: the call ends with ``code``; the rest of what the client
        sends on it is read and dropped (the connection goes on)."""
        stream.failed = (code, details)
        stream.body.clear()
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()  # a stream's handler: its answers so far went out
        self._finish(stream, code, details, [])

    def _expired(self, stream: Stream) -> None:
        if not stream.finished:
            if stream.task is not None:
                stream.task.cancel()
            self._finish(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", stream.call.trailing)
            self._flush()

    def _stall(self, stream: Stream) -> None:
        """The client kept a call waiting (its message, or room for its answer) too long: reset."""
        if self._streams.get(stream.id) is stream:
            logger.info("gRPC call reset: its client stalled it")
            stream.finished = True
            self._conn.reset(stream.id, http2.CANCEL)
            self._forget(stream, cancel=True)
            self._flush()

    def _acknowledge(self, credit: int, stream_id: int) -> None:
        if credit:  # the connection's share comes back even when the stream is gone
            self._conn.acknowledge(credit, stream_id)

    # -- running it -----------------------------------------------------------------------------------

    async def _run(self, stream: Stream, answers: AsyncIterator) -> None:
        """Send each answer as it comes, then the status: OK, the handler's abort, or INTERNAL."""
        try:
            async for response in answers:
                self._send_message(stream, stream.method.serialize(response))
                if stream.messages is not None:  # a stream's answers go out as they come
                    self._flush()
                    while len(stream.out) > SEND_AHEAD_BYTES and not stream.finished:
                        stream.sent = asyncio.Event()
                        await stream.sent.wait()
            if stream.failed is None:
                self._finish(stream, grpc.StatusCode.OK, "", stream.call.trailing)
        except Abort as exc:
            self._finish(stream, exc.code, exc.details, stream.call.trailing)
        except asyncio.CancelledError:  # reset by the client, its deadline, or the connection gone
            pass
        except Exception:
            logger.exception("gRPC call failed")
            self._finish(stream, grpc.StatusCode.INTERNAL, "internal error", [])
        self._flush_soon()

    async def _requests(self, stream: Stream) -> AsyncIterator:
        while True:
            item = await stream.messages.get()
            if item is None:
                return
            if stream.messages.qsize() < STREAM_BACKLOG:  # room again: what waited as bytes, then its credit
                self._more(stream)
                if stream.held_bytes and stream.messages.qsize() < STREAM_BACKLOG:
                    self._acknowledge(stream.held_bytes, stream.id)
                    stream.held_bytes = 0
                    self._flush()
            yield item[0]


async def _one(stream: Stream, request) -> AsyncIterator:
    """A unary call's answer, as a stream of one."""
    yield await stream.method.handler(request, stream.call)
