"""ZeroMQ front-end and the Python client, against real server processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import zmq

from conftest import make_tiny_bundle, tiny_onnx
from modelport import AsyncClient, Client, samples
from modelport.client import ClientTimeout, ServerUnreachable
from modelport.errors import BadInput, NotFound, Overloaded
from servers import Gate, Server, free_port, make_gate_bundle, raw_dealer

MODEL = "efficientnet-lite0"


def test_same_images_same_answers_over_http_and_zmq(default_server, images):
    paths = [images["cat"], images["espresso"]]
    with Client(default_server.zmq_url) as z, Client(default_server.url) as h:
        over_zmq = z.classify_many(paths, top_k=5)
        over_http = h.classify_many(paths, top_k=5)
        assert over_zmq == over_http
        assert over_zmq[0][0].index in samples.KNOWN["chelsea"] and over_zmq[1][0].label == "espresso"
        raw = np.stack([np.asarray(__import__("PIL.Image").Image.open(images["espresso"]).convert("RGB").resize((224, 224)))])
        a, b = z.infer(MODEL, {"image": raw}), h.infer(MODEL, {"image": raw})
        assert set(a) == set(b) == {"probabilities", "features"}
        assert np.array_equal(a["probabilities"], b["probabilities"])


def test_errors_carry_the_server_kind(default_server):
    with Client(default_server.zmq_url) as z:
        with pytest.raises(NotFound):
            z.classify(b"x", model="no-such-model")
        with pytest.raises(BadInput) as info:
            z.classify(b"not an image")
        assert "cannot decode image" in info.value.message
        with pytest.raises(BadInput):
            z.infer(MODEL, {"image": np.zeros((1, 2, 2, 3), np.uint8)})
        with pytest.raises(BadInput):
            z.infer(MODEL, [b"x"], outputs=["nope"])
        assert z.ping()


def test_the_async_client_answers_and_fails_like_the_blocking_one(default_server, images):
    async def run(url: str):
        async with AsyncClient(url, timeout_s=20) as client:
            answer = await client.classify(images["espresso"], top_k=3)
            errors = []
            for call in (client.classify(b"x", model="no-such-model"), client.classify(b"not an image"),
                         client.infer(MODEL, {"image": np.zeros((1, 2, 2, 3), np.uint8)})):
                with pytest.raises((NotFound, BadInput)) as info:
                    await call
                errors.append((type(info.value), info.value.message))
            return answer, errors, await client.ping()

    with Client(default_server.url) as blocking:
        expected = blocking.classify(images["espresso"], top_k=3)
    for url in (default_server.url, default_server.zmq_url):
        answer, errors, ready = asyncio.run(run(url))
        assert answer == expected and ready
        assert [kind for kind, _ in errors] == [NotFound, BadInput, BadInput], url
        assert "cannot decode image" in errors[1][1]


def test_the_async_http_client_times_out_on_a_stopped_server(tiny_server):
    server, _ = tiny_server

    async def run():
        async with AsyncClient(server.url, model="tiny", timeout_s=0.5) as client:
            await client.infer("tiny", {"image": np.zeros((1, 3, 8, 8), np.float32)})  # connected
            server.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(ClientTimeout):
                    await client.infer("tiny", {"image": np.zeros((1, 3, 8, 8), np.float32)})
            finally:
                server.proc.send_signal(signal.SIGCONT)
            return await client.infer("tiny", {"image": np.zeros((1, 3, 8, 8), np.float32)})

    assert asyncio.run(run())["logits"].shape == (1, 4)


@pytest.fixture
def tiny_server(tmp_path):
    make_tiny_bundle(tmp_path / "repo" / "tiny" / "1", size=8)
    server = Server(str(tmp_path / "repo"), "--max-queue-size", "1000", log=tmp_path / "server.log",
                    zmq_port=free_port()).wait_ready()
    yield server, tiny_onnx(tmp_path / "w.onnx")
    server.stop()


def expected_logits(tensor: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The tiny graph on a graph-ready (NCHW float) tensor: no image normalisation applies."""
    return tensor.mean(axis=(2, 3)) @ weights


async def _many_in_flight(url: str, payloads: list[np.ndarray]) -> list[np.ndarray]:
    async with AsyncClient(url, model="tiny") as client:
        replies = await asyncio.gather(*(client.infer("tiny", {"image": p}) for p in payloads))
    return [r["logits"] for r in replies]


def test_hundreds_of_concurrent_requests_on_one_async_client(tiny_server):
    server, weights = tiny_server
    rng = np.random.default_rng(4)
    payloads = [rng.normal(size=(1, 3, 8, 8)).astype(np.float32) for _ in range(400)]
    for url in (server.zmq_url, server.url):
        answers = asyncio.run(_many_in_flight(url, payloads))
        for pixels, answer in zip(payloads, answers):
            assert np.allclose(answer, expected_logits(pixels, weights), atol=1e-4)


def test_malformed_frames_get_errors_and_the_next_thousand_are_correct(tiny_server):
    server, weights = tiny_server
    with raw_dealer(server.zmq_port) as raw:
        bad_frames = [
            [b"\xc1 not msgpack"],
            [msgpack.packb([1, 2, 3])],
            [msgpack.packb({"id": 5, "op": "infer", "model": "tiny"})[:-3]],  # truncated
            [msgpack.packb({"id": 6, "op": "infer", "model": "tiny",
                            "inputs": {"image": {"dtype": "float32", "shape": [10**9, 3, 8, 8], "data": b"xx"}}})],
            [msgpack.packb({"id": 7, "op": "dance"})],
            [b"a", b"b"],
        ]
        for frames in bad_frames:
            raw.send_multipart(frames)
            reply = msgpack.unpackb(raw.recv())
            assert reply["ok"] is False and reply["error"]["kind"] == "bad_input", (frames, reply)
            assert reply["error"]["status"] == 400
        # Over the socket's maximum message size: ZeroMQ drops it and the connection.
        raw.send(b"\x00" * (17 * 1024 * 1024))
        with pytest.raises(zmq.Again):
            raw.recv()
    rng = np.random.default_rng(5)
    with Client(server.zmq_url, model="tiny") as client:
        for _ in range(1000):
            pixels = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
            logits = client.infer("tiny", {"image": pixels})["logits"]
            assert np.allclose(logits, expected_logits(pixels, weights), atol=1e-4)


def test_client_recovers_after_server_restart(tmp_path):
    make_tiny_bundle(tmp_path / "repo" / "tiny" / "1", size=8)
    port, zmq_port = free_port(), free_port()
    server = Server(str(tmp_path / "repo"), log=tmp_path / "server.log", port=port, zmq_port=zmq_port).wait_ready()
    pixels = np.zeros((1, 3, 8, 8), np.float32)
    zmq_client = Client(f"zmq://127.0.0.1:{zmq_port}", model="tiny", timeout_s=20)
    http_client = Client(f"http://127.0.0.1:{port}", model="tiny", timeout_s=20)
    try:
        first = zmq_client.infer("tiny", {"image": pixels})["logits"]
        assert np.allclose(http_client.infer("tiny", {"image": pixels})["logits"], first)
        assert server.stop() == 0
        server = Server(str(tmp_path / "repo"), log=tmp_path / "server.log", port=port, zmq_port=zmq_port).wait_ready()
        assert np.allclose(zmq_client.infer("tiny", {"image": pixels})["logits"], first)
        assert np.allclose(http_client.infer("tiny", {"image": pixels})["logits"], first)
    finally:
        zmq_client.close()
        http_client.close()
        server.stop()


def test_timeout_then_fresh_socket(tmp_path):
    with Client(f"zmq://127.0.0.1:{free_port()}", timeout_s=0.2) as client:  # nobody listens there
        with pytest.raises(ClientTimeout):
            client.ping()


def test_nobody_listening_over_http_is_one_clear_error_for_the_client_and_the_cli(images):
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with Client(url, timeout_s=5) as client:
        for call in (client.ping, lambda: client.classify(images["cat"])):
            with pytest.raises(ServerUnreachable, match="cannot reach"):
                call()

    async def from_asyncio():
        async with AsyncClient(url, timeout_s=5) as client:
            for call in (client.ping, lambda: client.classify(images["cat"])):
                with pytest.raises(ServerUnreachable, match="cannot reach"):
                    await call()

    asyncio.run(from_asyncio())
    done = subprocess.run([sys.executable, "-m", "modelport", "rollout", "status", "flowers", "--url", url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "modelport: cannot reach" in done.stderr and "Traceback" not in done.stderr


def test_queue_full_is_overloaded_with_retry_after_over_zmq(tmp_path):
    bundle = make_gate_bundle(tmp_path / "repo" / "gate" / "1", max_batch_size=1, max_queue_size=2, max_delay_ms=0)
    server = Server(str(tmp_path / "repo"), log=tmp_path / "server.log", zmq_port=free_port()).wait_ready()
    gate = Gate(bundle)
    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    try:
        gate.close()
        clients = [Client(server.zmq_url, model="gate") for _ in range(4)]
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(clients[0].infer, "gate", {"image": pixels})
            deadline = time.monotonic() + 10
            while len(gate.batches()) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            queued = [pool.submit(c.infer, "gate", {"image": pixels}) for c in clients[1:3]]
            time.sleep(0.3)  # let both reach the queue
            with pytest.raises(Overloaded) as info:
                clients[3].infer("gate", {"image": pixels})
            assert info.value.retry_after_s >= 1
            with Client(server.url, model="gate") as over_http, pytest.raises(Overloaded) as info:
                over_http.infer("gate", {"image": pixels})  # the same kind over HTTP
            assert info.value.retry_after_s >= 1
            gate.open()
            assert all("logits" in f.result() for f in [running, *queued])
        for c in clients:
            c.close()
    finally:
        gate.open()
        server.stop()


def test_fuzzed_frames_get_error_replies_and_the_server_keeps_serving(tiny_server):
    server, weights = tiny_server
    rng = np.random.default_rng(11)
    with raw_dealer(server.zmq_port) as raw:
        for i in range(300):
            if i % 3 == 0:  # well-formed msgpack with random contents
                frame = msgpack.packb({"id": i, "op": rng.choice(["infer", "classify", "x"]).item(), "model": "tiny",
                                       "images": [rng.bytes(int(rng.integers(0, 64)))],
                                       "top_k": int(rng.integers(-2, 3))})
            else:
                frame = rng.bytes(int(rng.integers(1, 200)))
            raw.send(frame)
            reply = msgpack.unpackb(raw.recv())
            assert reply["ok"] is False and reply["error"]["status"] in (400, 404), reply
    with Client(server.zmq_url, model="tiny") as client:
        tensor = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
        assert np.allclose(client.infer("tiny", {"image": tensor})["logits"], expected_logits(tensor, weights), atol=1e-4)
