"""Property: whatever arrives, the answer is 2xx, 4xx or 503, the server stays up, and a good
request afterwards gets the right answer. Over every HTTP endpoint family and the ZeroMQ socket,
against one real server process. Deterministic (derandomized); the regression cases for the
classes fuzzing found are in ``test_hardening.py``.
"""

from __future__ import annotations

import grpc
import httpx
import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2  # the grpc extra: a missing install fails here, not silently

import fuzzing
from test_rpc import expected_logits, raw_dealer


def fuzz_settings(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


def check_still_right(server, weights) -> None:
    assert server.proc.poll() is None, "the server died"
    tensor = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    reply = httpx.post(server.url + f"/v2/models/{fuzzing.MODEL}/infer", json={"inputs": [
        {"name": "image", "shape": [2, 3, 8, 8], "datatype": "FP32", "data": tensor.ravel().tolist()}]})
    assert reply.status_code == 200, reply.text
    logits = np.array(reply.json()["outputs"][0]["data"]).reshape(2, 4)
    assert np.allclose(logits, expected_logits(tensor, weights), atol=1e-4)


def test_fuzzed_http_requests_are_never_5xx(hardened_server):
    server, weights = hardened_server
    with httpx.Client(base_url=server.url, timeout=30) as client:
        @fuzz_settings(2000)
        @given(fuzzing.http_cases)
        def one(case: fuzzing.HttpCase) -> None:
            reply = client.request(case.method, case.path, content=case.body, headers=case.headers)
            assert fuzzing.allowed_http(case, reply.status_code), (case, reply.status_code, reply.text[:300])
            if reply.status_code >= 400 and case.path != "/metrics":
                assert "error" in reply.json()  # our JSON error shape, never a traceback

        one()
    check_still_right(server, weights)


def test_fuzzed_zmq_frames_get_replies_never_internal(hardened_server):
    server, weights = hardened_server
    with raw_dealer(server.zmq_port) as raw:
        @fuzz_settings(1200)
        @given(fuzzing.zmq_frames)
        def one(frame: bytes) -> None:
            raw.send(frame)
            reply = msgpack.unpackb(raw.recv(), raw=False, strict_map_key=False)
            assert fuzzing.allowed_zmq(frame, reply), reply

        one()
    check_still_right(server, weights)


# -- gRPC: the same server's gRPC port ------------------------------------------------------------------

def grpc_status(call) -> tuple[str, object, dict]:
    """(status name, the response or the error, trailing metadata) of a unary call."""
    try:
        return "OK", call(), {}
    except grpc.RpcError as exc:
        return exc.code().name, exc, dict(exc.trailing_metadata() or ())


def check_grpc_still_right(server, weights, log_from: int) -> None:
    """A good call over gRPC gets the right answer, and the log has no traceback past ``log_from``."""
    tensor = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype("<f4")
    request = service_pb2.ModelInferRequest(model_name=fuzzing.MODEL)
    request.inputs.add(name="image", datatype="FP32", shape=list(tensor.shape))
    request.raw_input_contents.append(tensor.tobytes())
    with grpc.insecure_channel(server.grpc_address) as channel:
        infer = channel.unary_unary(fuzzing.GRPC_SERVICE + "ModelInfer", request_serializer=None,
                                    response_deserializer=service_pb2.ModelInferResponse.FromString)
        response = infer(request.SerializeToString(), timeout=30)
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 4)
    assert np.allclose(logits, expected_logits(tensor, weights), atol=1e-4)
    check_still_right(server, weights)
    assert b"Traceback" not in server.log.read_bytes()[log_from:], "the server logged a traceback"


def raw_unary(channel, method: str):
    """A unary call that sends and returns bytes: what no generated stub would send."""
    return channel.unary_unary(fuzzing.GRPC_SERVICE + method, request_serializer=None, response_deserializer=None)


def test_fuzzed_grpc_requests_are_never_internal(hardened_server):
    server, weights = hardened_server
    log_from = server.log.stat().st_size
    with grpc.insecure_channel(server.grpc_address) as channel:
        infer = raw_unary(channel, "ModelInfer")

        @fuzz_settings(400)
        @given(fuzzing.grpc_infer_request())
        def one(request) -> None:
            status, answer, trailing = grpc_status(lambda: infer(request.SerializeToString(), timeout=30))
            assert status in fuzzing.GRPC_ALLOWED, (str(request)[:600], status, answer)
            if status != "OK":  # modelport's own error, with its kind, never a traceback
                assert "kind" in trailing and "Traceback" not in answer.details(), (str(request)[:600], answer)

        one()
    check_grpc_still_right(server, weights, log_from)


def test_malformed_grpc_messages_are_invalid_argument_never_internal(hardened_server):
    server, weights = hardened_server
    log_from = server.log.stat().st_size
    with grpc.insecure_channel(server.grpc_address) as channel:
        @fuzz_settings(300)
        @given(fuzzing.grpc_raw_calls)
        def one(call: tuple[str, bytes]) -> None:
            method, body = call
            status, answer, _ = grpc_status(lambda: raw_unary(channel, method)(body, timeout=30))
            assert status in fuzzing.GRPC_ALLOWED, (method, body[:200], status, answer)

        one()
    check_grpc_still_right(server, weights, log_from)


def test_fuzzed_grpc_streams_answer_every_request_once(hardened_server):
    """In a stream, a bad request is answered in-stream (``error_message``, its ``id``) and the
    stream goes on: every request gets exactly one answer, none "internal error"."""
    server, weights = hardened_server
    log_from = server.log.stat().st_size
    with grpc.insecure_channel(server.grpc_address) as channel:
        stream = channel.stream_stream(fuzzing.GRPC_SERVICE + "ModelStreamInfer", request_serializer=None,
                                       response_deserializer=service_pb2.ModelStreamInferResponse.FromString)

        @fuzz_settings(150)
        @given(st.lists(fuzzing.grpc_infer_request(), min_size=1, max_size=4))
        def one(requests) -> None:
            for n, request in enumerate(requests):
                request.id = f"r{n}"
            answers = list(stream(iter([r.SerializeToString() for r in requests]), timeout=20))
            ids = sorted(a.infer_response.id for a in answers)
            assert ids == [f"r{n}" for n in range(len(requests))], answers
            assert not [a for a in answers if a.error_message == "internal error"], answers

        one()
    check_grpc_still_right(server, weights, log_from)


def test_grpc_message_over_the_limit_is_resource_exhausted_and_just_under_is_served(hardened_server):
    """The hardened server's limit is the default --max-body-mb 16: a message of exactly 16 MiB is
    read (and answered), one byte more is RESOURCE_EXHAUSTED, and so is 17 MiB."""
    server, weights = hardened_server
    log_from = server.log.stat().st_size
    limit = 16 * 1024 * 1024
    tensor = np.zeros((1, 3, 8, 8), "<f4")

    def request_of(size: int) -> bytes:
        """A good request padded to ``size`` bytes with an unknown parameter (ignored)."""
        request = service_pb2.ModelInferRequest(model_name=fuzzing.MODEL)
        request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 8, 8])
        request.raw_input_contents.append(tensor.tobytes())
        pad = size - request.ByteSize()
        while True:
            request.parameters["pad"].string_param = "x" * pad
            if request.ByteSize() == size:
                return request.SerializeToString()
            pad += size - request.ByteSize()  # the length prefixes grew with the padding

    with grpc.insecure_channel(server.grpc_address) as channel:
        infer = raw_unary(channel, "ModelInfer")
        status, answer, _ = grpc_status(lambda: infer(request_of(limit), timeout=60))
        assert status == "OK", answer
        for size in (limit + 1, 17 * 1024 * 1024):
            status, answer, _ = grpc_status(lambda: infer(request_of(size), timeout=60))
            assert status == "RESOURCE_EXHAUSTED" and "larger than max" in answer.details(), (size, answer)
    check_grpc_still_right(server, weights, log_from)


# HTTP/2 frames as a broken or hostile client may send them, after a valid connection preface:
# any type (known and unknown), flags, stream, payload; and a gRPC call's own frames, cut short.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
h2_frames = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1]),
                               st.binary(max_size=64)), min_size=1, max_size=6)


def test_fuzzed_http2_frames_on_the_grpc_port_never_break_the_server(hardened_server):
    """Each case on a connection of its own: the server answers, resets or closes that connection;
    every other connection, and the next good call, are served; no traceback."""
    import socket
    import struct

    import hpack

    server, weights = hardened_server
    log_from = server.log.stat().st_size
    host, port = server.grpc_address.rsplit(":", 1)

    @fuzz_settings(300)
    @given(h2_frames, st.booleans())
    def one(frames, with_call: bool) -> None:
        data = _PREFACE + struct.pack(">I", 0)[1:] + b"\x04\x00" + b"\x00\x00\x00\x00"  # empty SETTINGS
        if with_call:  # a call's HEADERS, then the fuzzed frames on its stream
            block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), ("content-type", "application/grpc"),
                                            (":path", "/inference.GRPCInferenceService/ModelInfer")])
            data += struct.pack(">I", len(block))[1:] + b"\x01\x04" + struct.pack(">I", 1) + block
        for kind, flags, stream, payload in frames:
            data += struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # whatever it answers, until it closes
                pass

    one()
    check_grpc_still_right(server, weights, log_from)
