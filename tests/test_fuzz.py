"""Property: whatever arrives, the answer is 2xx, 4xx or 503, the server stays up, and a good
request afterwards gets the right answer. Over every HTTP endpoint family and the ZeroMQ socket,
against one real server process. Deterministic (derandomized); the regression cases for the
classes fuzzing found are in ``test_hardening.py``.
"""

from __future__ import annotations

import httpx
import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings

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
