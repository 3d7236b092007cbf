"""HTTP/2 for the gRPC server (RFC 9113), server side, sans I/O: bytes in -> events; frames out
-> bytes to write. Stream states, flow control both ways, SETTINGS, PING, GOAWAY, RST_STREAM,
CONTINUATION and padding, and nothing gRPC-specific. Header blocks are HPACK-coded by ``hpack``
(python-hyper's, as ``h2`` uses it); only the framing around them is ours.

Not ``h2``'s state machine: ~120 us a call in pure Python, 1.3-1.5 x HTTP/1.1's round trip
(docs/decisions.md). Blocks we send use no HPACK dynamic table (static matches, else literals never
indexed): cached by value. A client's block that leaves the decoder's table as it was is decoded once.
A peer that breaks the protocol raises ``Broken`` (the connection ends with GOAWAY and its code),
as does one that resets most of what it opens ("rapid reset", CVE-2023-44487); a stream that
breaks it is reset and reported as ``RESET``, the connection goes on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import hpack
import hpack.exceptions

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, \
    COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x3, 0x5, 0x6, 0x7, 0x8, 0x9, 0xb
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = range(1, 7)
# Events ``receive`` returns, as tuples: (REQUEST, stream, headers, ended) - a call's headers, raw
# (name, value) bytes; (BODY, stream, data, credit) - ``credit`` goes back with ``acknowledge``
# once the data is taken; (ENDED, stream); (WINDOW, stream or 0 for all); (RESET, stream) - by the
# client, or by us for a broken stream; (TERMINATED, error code) - the client's GOAWAY.
REQUEST, BODY, ENDED, WINDOW, RESET, TERMINATED = range(6)
DEFAULT_WINDOW, MAX_WINDOW = 65535, 2**31 - 1
FRAME_BYTES = 16384  # the largest frame we take (the default; we do not raise it)
RAPID_RESETS = 1000  # calls a client may reset before what it resets must stay under half of what it opens
_HEAD = struct.Struct(">HBBBL")  # length (16 + 8 bits), type, flags, stream (reserved bit included)
_SETTING = struct.Struct(">HL")
_ENCODER = hpack.Encoder()  # only ever given never-indexed headers: its dynamic table stays empty
_BLOCKS: dict[tuple, bytes] = {}  # header lists we send, encoded


class Broken(Exception):
    """The client broke HTTP/2: the connection ends with GOAWAY(``code``)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class StreamGone(Exception):
    """Sending on a stream that is closed or was reset."""


@dataclass(eq=False, slots=True)
class _Stream:
    send_window: int  # what we may still send on it
    receive_window: int  # what the client may still send on it
    owed: int = 0  # credit taken and not yet given back with WINDOW_UPDATE
    open_remote: bool = True  # the client has not ended it (we forget a stream once we end it)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def header_block(headers) -> bytes:
    """A header list as HPACK, using no dynamic table (valid on any connection, whatever its state)."""
    key = tuple(headers)
    block = _BLOCKS.get(key)
    if block is None:
        block = _ENCODER.encode([(name, value, True) for name, value in headers], huffman=False)
        if len(_BLOCKS) > 512:  # trailing metadata varies: stay bounded
            _BLOCKS.clear()
        _BLOCKS[key] = block
    return block


def _table_size_update(size: int) -> bytes:
    """HPACK's dynamic table size update (RFC 7541 6.3), as hpack's encoder writes it."""
    encoder = hpack.Encoder()
    encoder.header_table_size = size
    return encoder.encode([])


class ServerConnection:
    """One connection's HTTP/2 state, server side."""

    def __init__(self, max_streams: int, stream_window: int, connection_window: int,
                 max_header_list: int) -> None:
        self._settings = {MAX_CONCURRENT_STREAMS: max_streams, INITIAL_WINDOW_SIZE: stream_window,
                          MAX_HEADER_LIST_SIZE: max_header_list}
        self._max_streams, self._stream_window = max_streams, stream_window
        self._connection_window = connection_window = max(connection_window, DEFAULT_WINDOW)  # it starts there
        self._decoder = hpack.Decoder(max_header_list)
        self._decoded: dict[bytes, tuple[int, list]] = {}  # block -> (table version, headers)
        self._table_version = 0
        self._streams: dict[int, _Stream] = {}
        self._pending = b""  # the start of a frame not yet whole
        self._out = bytearray()
        self._preface = False  # the client's preface (magic, then SETTINGS) read
        self._continuing: tuple[int, bool, bytearray] | None = None  # HEADERS waiting for CONTINUATION
        self.highest_stream = 0  # the highest stream the client opened
        self.max_frame = FRAME_BYTES  # the largest frame the client takes
        self._peer_window = DEFAULT_WINDOW  # the client's initial window for a stream
        self._send_window = DEFAULT_WINDOW  # what we may still send on the connection
        self._receive_window = connection_window
        self._owed = 0
        self._resets = 0  # streams the client reset while open
        self._table_size = 4096  # the client's HPACK table for what we send (its SETTINGS_HEADER_TABLE_SIZE)
        self._size_update = b""  # to start our next header block: the client shrank that table

    def initiate(self) -> None:
        self._out += frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in self._settings.items()))
        if self._connection_window > DEFAULT_WINDOW:
            self._out += frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self._connection_window - DEFAULT_WINDOW))

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    # -- in -------------------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list:
        """The events in ``data`` (raises ``Broken``)."""
        if self._pending:
            data = self._pending + data
        events: list = []
        pos = 0
        if not self._preface:
            if len(data) < len(PREFACE) + 9:
                if not (PREFACE.startswith(data) or data.startswith(PREFACE)):
                    raise Broken(PROTOCOL_ERROR, "not an HTTP/2 client's preface")
                self._pending = data
                return events
            if not data.startswith(PREFACE) or data[len(PREFACE) + 3] != SETTINGS:
                raise Broken(PROTOCOL_ERROR, "not an HTTP/2 client's preface")
            self._preface = True
            pos = len(PREFACE)
        end = len(data)
        while end - pos >= 9:
            high, low, kind, flags, stream_id = _HEAD.unpack_from(data, pos)
            length = high << 8 | low
            if length > FRAME_BYTES:
                raise Broken(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            if end - pos - 9 < length:
                break
            payload = data[pos + 9:pos + 9 + length]
            pos += 9 + length
            self._frame(kind, flags, stream_id & MAX_WINDOW, payload, events)
        self._pending = data[pos:]
        return events

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        if self._continuing is not None and kind != CONTINUATION:
            raise Broken(PROTOCOL_ERROR, "a header block cut by another frame")
        if kind == DATA:
            self._data(flags, stream_id, payload, events)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload, events)
        elif kind == CONTINUATION:
            if self._continuing is None or self._continuing[0] != stream_id:
                raise Broken(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            block = self._continuing[2]
            block += payload
            if len(block) > self._settings[MAX_HEADER_LIST_SIZE]:
                raise Broken(PROTOCOL_ERROR, "a header block over the limit")
            if flags & END_HEADERS:
                stream_id, ended, _ = self._continuing
                self._continuing = None
                self._header_block(stream_id, ended, bytes(block), events)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload, events)
        elif kind == SETTINGS:
            self._peer_settings(flags, stream_id, payload, events)
        elif kind == RST_STREAM:
            self._check(stream_id != 0 and stream_id <= self.highest_stream, "RST_STREAM on an idle stream")
            self._check(len(payload) == 4, "RST_STREAM of the wrong size", FRAME_SIZE_ERROR)
            if self._streams.pop(stream_id, None) is not None:
                events.append((RESET, stream_id))
                self._resets += 1  # a client may cancel calls, not most of them: each costs us a call's start
                self._check(self._resets <= RAPID_RESETS or self._resets * 4 <= self.highest_stream,
                            "most calls reset as soon as opened", ENHANCE_YOUR_CALM)
        elif kind == PING:
            self._check(stream_id == 0, "PING on a stream")
            self._check(len(payload) == 8, "PING of the wrong size", FRAME_SIZE_ERROR)
            if not flags & ACK:
                self._out += frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            self._check(stream_id == 0, "GOAWAY on a stream")
            self._check(len(payload) >= 8, "GOAWAY too short", FRAME_SIZE_ERROR)
            events.append((TERMINATED, struct.unpack_from(">L", payload, 4)[0]))
        elif kind == PRIORITY:
            self._check(stream_id != 0, "PRIORITY on the connection")
            self._check(len(payload) == 5, "PRIORITY of the wrong size", FRAME_SIZE_ERROR)
        elif kind == PUSH_PROMISE:
            raise Broken(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # other types: ignored, as the RFC says

    @staticmethod
    def _check(condition: bool, why: str, code: int = PROTOCOL_ERROR) -> None:
        if not condition:
            raise Broken(code, why)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise Broken(PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1:len(payload) - payload[0]]
        return payload

    def _data(self, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        self._check(stream_id != 0 and stream_id <= self.highest_stream, "DATA on an idle stream")
        size = len(payload)
        if size > self._receive_window:
            raise Broken(FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        self._receive_window -= size
        payload = self._unpad(flags, payload)
        stream = self._streams.get(stream_id)
        if stream is None or not stream.open_remote or size > stream.receive_window:
            if stream is not None:  # ended by the client already, or beyond its window
                self._reset(stream_id, STREAM_CLOSED if not stream.open_remote else FLOW_CONTROL_ERROR, events)
            self.acknowledge(size, 0)  # a closed stream's frames: dropped, the connection's credit back
            return
        stream.receive_window -= size
        events.append((BODY, stream_id, payload, size))
        if flags & END_STREAM:
            self._end_remote(stream_id, stream, events)

    def _headers(self, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        self._check(stream_id % 2 == 1, "HEADERS on a server's or the connection's stream")
        payload = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            self._check(len(payload) >= 5, "HEADERS too short for its priority", FRAME_SIZE_ERROR)
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, bool(flags & END_STREAM), payload, events)
        else:
            self._continuing = (stream_id, bool(flags & END_STREAM), bytearray(payload))

    def _header_block(self, stream_id: int, ended: bool, block: bytes, events: list) -> None:
        headers = self._decode(block)  # always: the decoder's table must follow the client's
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers: they end the stream (a stream error otherwise, RFC 9113 8.1)
            if not ended or not stream.open_remote:
                self._reset(stream_id, PROTOCOL_ERROR if not ended else STREAM_CLOSED, events)
            else:
                self._end_remote(stream_id, stream, events)
            return
        if stream_id <= self.highest_stream:  # a stream that is over (reset by us, or ended)
            return
        self.highest_stream = stream_id
        if len(self._streams) >= self._max_streams:
            self._out += frame(RST_STREAM, 0, stream_id, struct.pack(">L", REFUSED_STREAM))
            return
        self._streams[stream_id] = _Stream(self._peer_window, self._stream_window, open_remote=not ended)
        events.append((REQUEST, stream_id, headers, ended))

    def _decode(self, block: bytes) -> list:
        known = self._decoded.get(block)
        if known is not None and known[0] == self._table_version:
            return known[1]
        table = self._decoder.header_table
        before = (len(table.dynamic_entries), table.dynamic_entries[0] if table.dynamic_entries else None,
                  table.maxsize)
        try:
            headers = self._decoder.decode(block, raw=True)
        except (hpack.exceptions.HPACKError, ValueError, IndexError) as exc:
            raise Broken(COMPRESSION_ERROR, f"a header block that does not decode: {exc}") from None
        after = (len(table.dynamic_entries), table.dynamic_entries[0] if table.dynamic_entries else None,
                 table.maxsize)
        if before[0] != after[0] or before[1] is not after[1] or before[2] != after[2]:
            self._table_version += 1  # what was decoded before may decode differently now
            self._decoded.clear()
        elif len(block) <= 512 and len(self._decoded) < 64:
            self._decoded[block] = (self._table_version, headers)
        return headers

    def _window_update(self, stream_id: int, payload: bytes, events: list) -> None:
        self._check(len(payload) == 4, "WINDOW_UPDATE of the wrong size", FRAME_SIZE_ERROR)
        increment = struct.unpack(">L", payload)[0] & MAX_WINDOW
        if stream_id == 0:
            self._check(increment != 0, "a WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise Broken(FLOW_CONTROL_ERROR, "the connection's window over 2^31-1")
            events.append((WINDOW, 0))
            return
        self._check(stream_id <= self.highest_stream, "WINDOW_UPDATE on an idle stream")
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.send_window += increment
        if increment == 0 or stream.send_window > MAX_WINDOW:
            self._reset(stream_id, PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR, events)
            return
        events.append((WINDOW, stream_id))

    def _peer_settings(self, flags: int, stream_id: int, payload: bytes, events: list) -> None:
        self._check(stream_id == 0, "SETTINGS on a stream")
        if flags & ACK:
            self._check(not payload, "a SETTINGS ACK with a payload", FRAME_SIZE_ERROR)
            return
        self._check(not len(payload) % 6, "SETTINGS of the wrong size", FRAME_SIZE_ERROR)
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == ENABLE_PUSH:
                self._check(value <= 1, "ENABLE_PUSH not 0 or 1")
            elif key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise Broken(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1")
                delta, self._peer_window = value - self._peer_window, value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise Broken(FLOW_CONTROL_ERROR, "a stream's window over 2^31-1")
                events.append((WINDOW, 0))
            elif key == MAX_FRAME_SIZE:
                self._check(FRAME_BYTES <= value < 2**24, "MAX_FRAME_SIZE out of range")
                self.max_frame = value
            elif key == HEADER_TABLE_SIZE and value < self._table_size:  # we use none, but must say so
                self._table_size, self._size_update = value, _table_size_update(value)
            # the rest are the client's own concern
        self._out += frame(SETTINGS, ACK, 0)

    @staticmethod
    def _end_remote(stream_id: int, stream: _Stream, events: list) -> None:
        stream.open_remote = False
        events.append((ENDED, stream_id))

    def _reset(self, stream_id: int, code: int, events: list) -> None:
        self.reset(stream_id, code)
        events.append((RESET, stream_id))

    def acknowledge(self, size: int, stream_id: int) -> None:
        """``size`` bytes of ``stream_id`` were taken: the client may send as much again (a
        WINDOW_UPDATE once half a window is owed, as h2 does)."""
        self._owed += size
        if self._owed >= self._connection_window // 2:
            self._out += frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self._owed))
            self._receive_window += self._owed
            self._owed = 0
        stream = self._streams.get(stream_id)
        if stream is not None and stream.open_remote:
            stream.owed += size
            if stream.owed >= self._stream_window // 2:
                self._out += frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", stream.owed))
                stream.receive_window += stream.owed
                stream.owed = 0

    # -- out ------------------------------------------------------------------------------------------

    def window(self, stream_id: int) -> int:
        """What may be sent on ``stream_id`` now (0 when it is gone)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else min(stream.send_window, self._send_window)

    def send_headers(self, stream_id: int, headers, end: bool = False) -> None:
        stream = self._open(stream_id)
        block, size = header_block(headers), self.max_frame
        if self._size_update:
            block, self._size_update = self._size_update + block, b""
        flags = END_STREAM if end else 0
        if len(block) <= size:
            self._out += frame(HEADERS, flags | END_HEADERS, stream_id, block)
        else:
            self._out += frame(HEADERS, flags, stream_id, block[:size])
            for start in range(size, len(block), size):
                last = start + size >= len(block)
                self._out += frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[start:start + size])
        if end:
            del self._streams[stream_id]
            if stream.open_remote:  # answered before the client finished: it may stop sending (as grpc-core)
                self._out += frame(RST_STREAM, 0, stream_id, struct.pack(">L", NO_ERROR))

    def send_data(self, stream_id: int, data: bytes) -> None:
        """``data`` within ``window`` and ``max_frame``."""
        stream = self._open(stream_id)
        size = len(data)
        if size > min(stream.send_window, self._send_window, self.max_frame):
            raise ValueError("DATA beyond the client's window")
        stream.send_window -= size
        self._send_window -= size
        self._out += frame(DATA, 0, stream_id, data)

    def _open(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamGone(stream_id)
        return stream

    def reset(self, stream_id: int, code: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._out += frame(RST_STREAM, 0, stream_id, struct.pack(">L", code))

    def go_away(self, code: int) -> None:
        """No calls after those already opened."""
        self._out += frame(GOAWAY, 0, 0, struct.pack(">LL", self.highest_stream, code))
