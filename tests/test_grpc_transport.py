"""The gRPC transport's corners (``server/grpc_transport.py``), in-process: a real ``Connection``
on a transport that keeps what is written, and ``h2``'s client state machine (a strict peer) as
the client. What a whole server does is in test_grpc.py; these are the races and floods that a
socket makes hard to time."""

from __future__ import annotations

import asyncio
import struct

import grpc
import h2.config
import h2.connection
import h2.events

from modelport.server import grpc_transport, http2
from modelport.server.grpc import GrpcServer
from modelport.server.grpc_call import Abort, Method

CALL = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/s/M"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")]


class Kept(asyncio.Transport):
    """What the connection writes, kept; abort() drops whatever comes after it, and both it and
    close() tell the connection it is lost, as a socket would."""

    def __init__(self) -> None:
        super().__init__()
        self.out, self.aborted, self.closed = bytearray(), False, False
        self.protocol: asyncio.Protocol | None = None

    def write(self, data) -> None:
        if not self.aborted:
            self.out += data

    def close(self) -> None:
        if not self.closed and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


def message(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


def connect(methods: dict) -> tuple[GrpcServer, grpc_transport.Connection, Kept, h2.connection.H2Connection]:
    server = GrpcServer(methods, 1 << 20, 30, 30)
    connection, transport = grpc_transport.Connection(server), Kept()
    connection.connection_made(transport)
    transport.protocol = connection
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.receive_data(transport.take())
    connection.data_received(client.data_to_send())
    client.receive_data(transport.take())
    return server, connection, transport, client


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_call_reset_in_the_read_that_opened_it_leaves_the_connection_serving():
    async def echo(request, call):
        return request

    async def run():
        _, connection, transport, client = connect({"/s/M": Method(echo, bytes, bytes)})
        # an unknown method, a non-gRPC request and a good one, each reset at once, in one read
        client.send_headers(1, CALL[:3] + [(b":path", b"/nope")] + CALL[4:], end_stream=True)
        client.reset_stream(1)
        client.send_headers(3, CALL[:4] + [(b"content-type", b"text/plain")], end_stream=True)
        client.reset_stream(3)
        client.send_headers(5, CALL)
        client.send_data(5, message(b"q"), end_stream=True)
        client.reset_stream(5)
        connection.data_received(client.data_to_send())
        client.send_headers(7, CALL)  # then a call that stays
        client.send_data(7, message(b"still here"), end_stream=True)
        connection.data_received(client.data_to_send())
        await settle()
        events = client.receive_data(transport.take())
        answers = [e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == 7]
        trailers = [dict(e.headers) for e in events if isinstance(e, h2.events.TrailersReceived)]
        return answers, trailers, transport.closed

    answers, trailers, closed = asyncio.run(run())
    assert answers == [message(b"still here")] and trailers == [{b"grpc-status": b"0"}] and not closed


def test_a_stream_that_ends_early_gives_back_the_credit_of_what_it_never_read():
    """Messages beyond the handler's backlog wait as bytes, their credit held; a call that ends
    before taking them pays it back, or a few such calls would shut the connection's window."""
    async def first_only(requests, call):
        async for _ in requests:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first one is enough")
        yield b""

    async def run():
        _, connection, transport, client = connect({"/s/M": Method(first_only, bytes, bytes, streaming=True)})
        chunk = message(b"x" * 16_000)
        for stream_id in range(1, 13, 2):  # 6 streams of ~4 MB: 1.5 x the connection's window
            client.send_headers(stream_id, CALL)
            for sent in range(300):
                if client.local_flow_control_window(stream_id) < len(chunk):
                    break
                client.send_data(stream_id, chunk)
                if sent % 8 == 7:
                    connection.data_received(client.data_to_send())
            connection.data_received(client.data_to_send())
            await settle()
            client.receive_data(transport.take())
        return client.outbound_flow_control_window, len(connection._streams)

    window, open_calls = asyncio.run(run())
    assert window > 8 * 1024 * 1024 and open_calls == 0, window  # ~24 MB sent through a 16 MB window


def test_a_flood_of_tiny_messages_stays_bytes_beyond_the_backlog():
    async def run():
        gate = asyncio.Event()

        async def slow(requests, call):
            await gate.wait()
            async for request in requests:
                yield request

        _, connection, transport, client = connect({"/s/M": Method(slow, bytes, bytes, streaming=True)})
        client.send_headers(1, CALL)
        empties, sent = message(b"") * 3276, 0  # a 16 kB frame of empty messages
        for _ in range(4):
            client.send_data(1, empties)
            sent += 3276
            connection.data_received(client.data_to_send())
        stream = connection._streams[1]
        waiting, held = stream.messages.qsize(), len(stream.body)
        client.end_stream(1)
        connection.data_received(client.data_to_send())
        gate.set()
        answered = 0
        for _ in range(20_000):
            await asyncio.sleep(0)
            for event in client.receive_data(transport.take()):
                if isinstance(event, h2.events.DataReceived):
                    answered += len(event.data)
                    client.acknowledge_received_data(event.flow_controlled_length, 1)
                if isinstance(event, h2.events.StreamEnded):
                    return waiting, held, answered // 5, sent
            connection.data_received(client.data_to_send())
        return waiting, held, None, sent

    waiting, held, answered, sent = asyncio.run(run())
    assert waiting == grpc_transport.STREAM_BACKLOG and held == (sent - waiting) * 5  # not 13,000 parsed messages
    assert answered == sent  # every one answered (5 bytes each), in the end


def test_stop_writes_the_answers_of_calls_that_finish_as_it_closes():
    async def trial(delay: float) -> bool:
        done = asyncio.get_running_loop().create_future()

        async def waits(request, call):
            await done
            return b"answer"

        server, connection, transport, client = connect({"/s/M": Method(waits, bytes, bytes)})
        server._server = asyncio.get_running_loop().create_future()  # stands for the listening socket
        server._server.close = lambda: None
        client.send_headers(1, CALL)
        client.send_data(1, message(b"q"), end_stream=True)
        connection.data_received(client.data_to_send())
        await settle()
        asyncio.get_running_loop().call_later(delay, done.set_result, None)
        await server.stop(5.0)
        # (h2's client takes no frame after a GOAWAY: the answer's trailers are looked for as bytes)
        return http2.frame(http2.HEADERS, http2.END_STREAM | http2.END_HEADERS, 1,
                           http2.header_block([(b"grpc-status", b"0")])) in transport.out

    async def run():
        return [await trial(0.02 + (n % 4) * 0.0005) for n in range(24)]

    assert all(asyncio.run(run()))
