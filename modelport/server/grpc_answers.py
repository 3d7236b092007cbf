"""The sending half of a gRPC connection (``grpc_transport.Connection``): response headers, the
answers' messages within the client's flow-control window, then the status trailers (or trailers
alone for a call that ends before any answer). It works on the connection's HTTP/2 state (``http2.py``) and streams."""

from __future__ import annotations

import contextlib
import struct

import grpc

from modelport.server.grpc_call import Stream, status_trailers
from modelport.server.http2 import StreamGone

PREFIX = struct.Struct(">BI")  # a message's compressed flag and length
SEND_AHEAD_BYTES = 1024 * 1024  # answers of one stream waiting on the client's window before a stream waits
IDLE_S = 300.0  # a connection with no call for this long is closed (the client reconnects on its next)
_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                     (b"grpc-accept-encoding", b"identity,deflate,gzip")]
_TRAILERS_ONLY = [(b":status", b"200"), (b"content-type", b"application/grpc")]  # a call ended before any answer


class Answers:
    """A mixin of ``Connection``: uses its ``_conn`` (``http2.ServerConnection``), ``_streams``, ``_loop`` and timers."""

    def _send_message(self, stream: Stream, message: bytes) -> None:
        if stream.finished:
            return
        self._start(stream)
        stream.out += PREFIX.pack(0, len(message))
        stream.out += message
        self._pump(stream)

    def _start(self, stream: Stream) -> None:
        if not stream.started:
            stream.started = True
            self._headers(stream, _RESPONSE_HEADERS)

    def _headers(self, stream: Stream, headers: list, end: bool = False) -> None:
        try:
            self._conn.send_headers(stream.id, headers, end)
        except StreamGone:  # reset under us
            stream.finished = True
            self._forget(stream, cancel=False)

    def _finish(self, stream: Stream, code: grpc.StatusCode, details: str, metadata) -> None:
        if stream.finished or stream.trailers is not None:
            return
        trailers = status_trailers(code, details, metadata)
        if not stream.started:  # trailers only: one HEADERS frame
            stream.started = stream.finished = True
            self._headers(stream, _TRAILERS_ONLY + trailers, end=True)
            self._forget(stream, cancel=False)
            return
        stream.trailers = trailers
        self._pump(stream)

    def _pump(self, stream: Stream) -> None:
        """Send what the client's window lets through; trailers once the answers are all out."""
        conn = self._conn
        try:
            while stream.out and not stream.finished:
                room = min(conn.window(stream.id), conn.max_frame, len(stream.out))
                if room <= 0:
                    break
                conn.send_data(stream.id, bytes(stream.out[:room]))
                del stream.out[:room]
            if stream.stall is not None:
                stream.stall.cancel()
            if stream.out and not stream.finished:  # the client's window is shut: for the write timeout at most
                stream.stall = self._loop.call_later(self._server.write_timeout_s, self._stall, stream)
            if stream.sent is not None and len(stream.out) <= SEND_AHEAD_BYTES:
                stream.sent.set()
            if not stream.out and stream.trailers is not None and not stream.finished:
                stream.finished = True
                conn.send_headers(stream.id, stream.trailers, True)
                self._forget(stream, cancel=False)  # what the client still sends on it is dropped
        except StreamGone:  # reset under us
            stream.finished = True
            self._forget(stream, cancel=False)

    def _forget(self, stream: Stream, cancel: bool) -> None:
        self._streams.pop(stream.id, None)
        if stream.held_bytes:  # read, never taken by its handler: the connection's credit comes back
            self._conn.acknowledge(stream.held_bytes, stream.id)
            stream.held_bytes = 0
        for timer in (stream.timer, stream.stall):
            if timer is not None:
                timer.cancel()
        if not self._streams and self._idle is None and self._transport is not None:
            self._idle = self._loop.call_later(IDLE_S, self._idle_out)
        if cancel and stream.task is not None and not stream.task.done():
            stream.task.cancel()
        if stream.sent is not None:
            stream.sent.set()
        if self._closing and not self._streams:  # after this call's last frame has gone out
            self._loop.call_soon(self._close_if_idle)

    def _trailers_only(self, stream_id: int, code: grpc.StatusCode, details: str) -> None:
        self._answer_once(stream_id, _TRAILERS_ONLY + status_trailers(code, details, ()))

    def _answer_once(self, stream_id: int, headers: list) -> None:
        """A whole answer in one HEADERS frame, to a call that never reached a handler."""
        with contextlib.suppress(StreamGone):  # reset by the client in the same read that opened it
            self._conn.send_headers(stream_id, headers, True)
