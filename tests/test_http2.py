"""The gRPC server's HTTP/2 (``server/http2.py``) against a strict peer: ``h2``'s client state
machine, which raises on any frame or header block that breaks RFC 9113, sends and reads every
frame here. The server's whole path (tritonclient, grpcio, raw fuzzed frames) is in test_grpc.py
and test_fuzz.py; this holds the framing's own corners to the RFC."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest

from modelport.server import http2

CALL = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/s/M"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")]


class Pair:
    """A server connection and an h2 client, wired back to back in memory."""

    def __init__(self, max_streams: int = 16, window: int = 1 << 20, **client_settings) -> None:
        self.server = http2.ServerConnection(max_streams, window, 4 * window, 64 * 1024)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings({getattr(h2.settings.SettingCodes, k): v for k, v in client_settings.items()})
        self.server.initiate()
        self.to_client()
        self.to_server()
        self.to_client()  # the client's ACK of our SETTINGS

    def to_server(self) -> list:
        return self.server.receive(self.client.data_to_send())

    def to_client(self) -> list:
        return self.client.receive_data(self.server.data_to_send())


def of(events, kind) -> list:
    return [e for e in events if e[0] == kind]


def test_a_call_with_padding_and_a_split_header_block_is_read_and_answered():
    pair = Pair()
    big = b"v" * 40_000  # more than one frame: HEADERS + CONTINUATION
    pair.client.send_headers(1, CALL + [(b"x-big", big)])
    pair.client.send_data(1, b"\x00\x00\x00\x00\x03abc", pad_length=20, end_stream=True)
    events = pair.to_server()
    (request,) = of(events, http2.REQUEST)
    assert request[1] == 1 and (b"x-big", big) in request[2] and request[3] is False
    (body,) = of(events, http2.BODY)
    assert body[2] == b"\x00\x00\x00\x00\x03abc" and body[3] == 8 + 20 + 1  # padding counts against the window
    assert of(events, http2.ENDED) == [(http2.ENDED, 1)]
    pair.server.acknowledge(body[3], 1)
    pair.server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    pair.server.send_data(1, b"\x00\x00\x00\x00\x02ok")
    pair.server.send_headers(1, [(b"grpc-status", b"0"), (b"x-trailer", b"t" * 40_000)], end=True)
    got = pair.to_client()
    kinds = [type(e) for e in got]
    assert kinds[:2] == [h2.events.ResponseReceived, h2.events.DataReceived]
    trailers = next(e for e in got if isinstance(e, h2.events.TrailersReceived)).headers
    assert (b"grpc-status", b"0") in trailers and (b"x-trailer", b"t" * 40_000) in trailers
    assert any(isinstance(e, h2.events.StreamEnded) for e in got)
    with pytest.raises(http2.StreamGone):
        pair.server.send_data(1, b"late")


def test_the_same_call_again_decodes_from_the_cache_but_never_stale():
    pair = Pair()
    for stream_id in (1, 3, 5):  # after the first, h2 sends the block all indexed: decoded once
        pair.client.send_headers(stream_id, CALL, end_stream=True)
        (request,) = of(pair.to_server(), http2.REQUEST)
        assert request[2] == CALL
    # an index that names one header, then (once the client's table has grown) another
    encoder = hpack.Encoder()
    server = http2.ServerConnection(4, 65535, 65535, 65536)
    server.receive(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))
    first = encoder.encode(CALL + [(b"x-a", b"1")])
    seen = [server.receive(http2.frame(http2.HEADERS, 5, 1, first))[0][2]]
    indexed = b"\xbe"  # dynamic entry 62: the last one added
    seen.append(server.receive(http2.frame(http2.HEADERS, 5, 3, encoder.encode(CALL) + indexed))[0][2])
    seen.append(server.receive(http2.frame(http2.HEADERS, 5, 5, encoder.encode(CALL + [(b"x-b", b"2")])))[0][2])  # x-b at 62
    seen.append(server.receive(http2.frame(http2.HEADERS, 5, 7, encoder.encode(CALL) + indexed))[0][2])
    assert [h[-1] for h in seen] == [(b"x-a", b"1"), (b"x-a", b"1"), (b"x-b", b"2"), (b"x-b", b"2")]


def test_flow_control_both_ways():
    pair = Pair(window=1000, INITIAL_WINDOW_SIZE=10)
    pair.client.send_headers(1, CALL, end_stream=True)
    pair.to_server()
    pair.server.send_headers(1, [(b":status", b"200")])
    assert pair.server.window(1) == 10
    with pytest.raises(ValueError):
        pair.server.send_data(1, b"x" * 11)
    pair.server.send_data(1, b"x" * 10)
    assert pair.server.window(1) == 0
    pair.to_client()
    pair.client.increment_flow_control_window(5, stream_id=1)
    assert of(pair.to_server(), http2.WINDOW) == [(http2.WINDOW, 1)] and pair.server.window(1) == 5
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 20})  # +10 on every stream
    assert of(pair.to_server(), http2.WINDOW) == [(http2.WINDOW, 0)] and pair.server.window(1) == 15
    pair.to_client()
    # the client's side: our window of 1000 a stream; credit comes back once half is owed
    pair.client.send_headers(3, CALL)
    pair.client.send_data(3, b"y" * 400)
    body = of(pair.to_server(), http2.BODY)[0]
    pair.server.acknowledge(body[3], 3)
    assert not pair.server.data_to_send()  # 400 < 500: nothing yet
    pair.client.send_data(3, b"y" * 200)
    pair.server.acknowledge(of(pair.to_server(), http2.BODY)[0][3], 3)
    updates = [e for e in pair.to_client() if isinstance(e, h2.events.WindowUpdated)]
    assert [(e.stream_id, e.delta) for e in updates] == [(3, 600)]
    assert pair.client.local_flow_control_window(3) == 1000


def test_ping_settings_and_goaway():
    pair = Pair()
    pair.client.ping(b"12345678")
    pair.to_server()
    assert any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"12345678" for e in pair.to_client())
    pair.client.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 20_000})
    pair.to_server()
    assert pair.server.max_frame == 20_000
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in pair.to_client())
    pair.client.send_headers(1, CALL, end_stream=True)
    pair.to_server()
    pair.server.go_away(http2.NO_ERROR)
    (gone,) = [e for e in pair.to_client() if isinstance(e, h2.events.ConnectionTerminated)]
    assert gone.last_stream_id == 1 and gone.error_code == 0
    pair.client.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
    assert pair.to_server() == [(http2.TERMINATED, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)]


def test_a_client_that_shrinks_its_header_table_is_told_so_in_our_next_block():
    """RFC 7541 4.2: the encoder signals a smaller table at the start of its next block (h2's
    client refuses a block without it once it has acknowledged the setting)."""
    pair = Pair()
    pair.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    pair.to_server()
    pair.to_client()
    pair.client.send_headers(1, CALL, end_stream=True)
    pair.to_server()
    pair.server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    pair.server.send_headers(1, [(b"grpc-status", b"0")], end=True)
    got = pair.to_client()
    assert [type(e) for e in got][:2] == [h2.events.ResponseReceived, h2.events.TrailersReceived]


def test_streams_beyond_the_limit_are_refused_and_an_early_answer_stops_the_client():
    pair = Pair(max_streams=2)
    for stream_id in (1, 3):
        pair.client.send_headers(stream_id, CALL)
    assert [e[1] for e in of(pair.to_server(), http2.REQUEST)] == [1, 3]
    # h2 keeps to our limit; a client that does not is refused that stream (static entries only: h2's table is untouched)
    assert pair.server.receive(http2.frame(http2.HEADERS, http2.END_HEADERS, 5, b"\x83\x86")) == []
    assert pair.server.data_to_send() == http2.frame(http2.RST_STREAM, 0, 5, struct.pack(">L", http2.REFUSED_STREAM))
    # answered while the client still sends (a message over the limit): trailers, then RST_STREAM(NO_ERROR)
    pair.server.send_headers(1, [(b":status", b"200"), (b"grpc-status", b"8")], end=True)
    got = pair.to_client()
    assert [type(e) for e in got] == [h2.events.ResponseReceived, h2.events.StreamEnded, h2.events.StreamReset]
    assert got[2].error_code == h2.errors.ErrorCodes.NO_ERROR
    # what was already on its way on stream 1 is dropped, its connection credit given back
    late = http2.frame(http2.DATA, 0, 1, b"z" * 100)
    assert pair.server.receive(late) == [] and pair.server._owed == 100
    pair.client.send_headers(7, CALL)  # room again
    assert [e[1] for e in of(pair.to_server(), http2.REQUEST)] == [7]


def test_a_client_that_resets_most_of_what_it_opens_is_told_to_calm_down():
    """Rapid reset (CVE-2023-44487): opening and at once resetting calls costs the server a call's
    start each and the client nothing. Cancels are fine; most calls cancelled are not."""
    def run(cancel_every: int) -> int:
        pair = Pair(max_streams=100)
        for n in range(2 * http2.RAPID_RESETS):
            stream_id = 2 * n + 1
            pair.client.send_headers(stream_id, CALL, end_stream=True)
            if n % cancel_every == 0:
                pair.client.reset_stream(stream_id)
            try:
                pair.to_server()
            except http2.Broken as broken:
                assert broken.code == http2.ENHANCE_YOUR_CALM
                return n
            if n % cancel_every:  # answered
                pair.server.send_headers(stream_id, [(b":status", b"200"), (b"grpc-status", b"0")], end=True)
                pair.to_client()
        return -1

    assert run(cancel_every=3) == -1  # a third of the calls cancelled: served to the end
    assert http2.RAPID_RESETS <= run(cancel_every=1) <= http2.RAPID_RESETS + 1  # every one: cut off


def test_data_after_the_end_of_a_stream_resets_it():
    pair = Pair()
    pair.client.send_headers(1, CALL, end_stream=True)
    pair.to_server()
    events = pair.server.receive(http2.frame(http2.DATA, 0, 1, b"more"))
    assert events == [(http2.RESET, 1)]
    assert pair.server.data_to_send() == http2.frame(http2.RST_STREAM, 0, 1, struct.pack(">L", http2.STREAM_CLOSED))
    # trailers that do not end their stream, or come after its end: that stream is reset, the connection goes on
    for stream_id, first_flags, second_flags, code in ((3, 0, http2.END_HEADERS, http2.PROTOCOL_ERROR),
                                                       (5, http2.END_STREAM, http2.END_STREAM, http2.STREAM_CLOSED)):
        pair.server.receive(http2.frame(http2.HEADERS, http2.END_HEADERS | first_flags, stream_id, b"\x83\x86"))
        trailers = http2.frame(http2.HEADERS, http2.END_HEADERS | second_flags, stream_id, b"\x83\x86")
        assert pair.server.receive(trailers) == [(http2.RESET, stream_id)]
        assert pair.server.data_to_send() == http2.frame(http2.RST_STREAM, 0, stream_id, struct.pack(">L", code))


@pytest.mark.parametrize("data, code", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", http2.PROTOCOL_ERROR),  # not HTTP/2
    (http2.PREFACE + http2.frame(http2.PING, 0, 0, b"12345678"), http2.PROTOCOL_ERROR),  # SETTINGS must come first
    (http2.frame(http2.DATA, 0, 1, b"x"), http2.PROTOCOL_ERROR),  # DATA on a stream never opened
    (http2.frame(http2.HEADERS, 4, 2, b"\x82"), http2.PROTOCOL_ERROR),  # a stream id a server would use
    (http2.frame(http2.HEADERS, 4, 1, b"\xff\xff\xff\x7f"), http2.COMPRESSION_ERROR),  # an index past the table
    (http2.frame(http2.HEADERS, 0, 1, b"\x82") + http2.frame(http2.PING, 0, 0, b"12345678"), http2.PROTOCOL_ERROR),
    (http2.frame(http2.PING, 0, 0, b"1234"), http2.FRAME_SIZE_ERROR),
    (http2.frame(http2.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), http2.PROTOCOL_ERROR),
    (http2.frame(http2.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), http2.FLOW_CONTROL_ERROR),
    (http2.frame(http2.SETTINGS, 0, 0, struct.pack(">HL", http2.MAX_FRAME_SIZE, 100)), http2.PROTOCOL_ERROR),
    (http2.frame(http2.PUSH_PROMISE, 4, 1, b"\x00\x00\x00\x02"), http2.PROTOCOL_ERROR),
    (struct.pack(">HBBBL", 256, 0, http2.DATA, 0, 1), http2.FRAME_SIZE_ERROR),  # 65536 bytes: over 16384
], ids=["http1", "no-settings", "idle-data", "even-stream", "bad-hpack", "cut-header-block", "ping-size",
        "zero-window-update", "window-overflow", "frame-size-setting", "push-promise", "frame-too-large"])
def test_a_broken_client_is_told_why_and_nothing_else_breaks(data, code):
    server = http2.ServerConnection(4, 65535, 65535, 65536)
    if not data.startswith((http2.PREFACE, b"GET")):
        data = http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0) + data
    with pytest.raises(http2.Broken) as broken:
        for byte in range(0, len(data), 7):  # in pieces, as TCP may deliver it
            server.receive(data[byte:byte + 7])
    assert broken.value.code == code
