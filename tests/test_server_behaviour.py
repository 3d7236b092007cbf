"""The server under load, limits and faults: real processes, a gate model that holds requests."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import make_tiny_bundle, tiny_onnx
from servers import Gate, Server, make_gate_bundle, metric, wait_until


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def gate_request(pixels: np.ndarray) -> dict:
    return {"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "UINT8", "data": pixels.ravel().tolist()}]}


@pytest.fixture
def gated(tmp_path):
    """A server over the gate model: max_batch_size 1, a queue of 4, open gate."""
    bundle = make_gate_bundle(tmp_path / "repo" / "gate" / "1", max_batch_size=1, max_queue_size=4, max_delay_ms=0)
    server = Server(str(tmp_path / "repo"), "--max-body-mb", "0.01", log=tmp_path / "server.log").wait_ready()
    yield server, Gate(bundle)  # made after ready: counts requests only
    Gate(bundle).open()
    server.stop()


def test_hundreds_of_concurrent_unique_requests_each_get_their_own_answer(tmp_path):
    make_tiny_bundle(tmp_path / "repo" / "tiny" / "1", size=8, dtype="float32", layout="NCHW")
    weights = tiny_onnx(tmp_path / "w.onnx")
    server = Server(str(tmp_path / "repo"), "--max-delay-ms", "20", log=tmp_path / "server.log").wait_ready()
    try:
        rng = np.random.default_rng(3)
        payloads = [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(300)]

        def ask(pixels: np.ndarray) -> np.ndarray:
            body = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                "data": [__import__("base64").b64encode(png(pixels)).decode()]}],
                    "outputs": [{"name": "logits"}]}
            response = client.post("/v2/models/tiny/infer", json=body)
            assert response.status_code == 200, response.text
            return np.array(response.json()["outputs"][0]["data"], dtype=np.float32)

        with httpx.Client(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=64)) as client:
            with ThreadPoolExecutor(32) as pool:
                answers = list(pool.map(ask, payloads))
        for pixels, answer in zip(payloads, answers):
            expected = ((pixels.astype(np.float32) - 127.5) / 127.5).mean(axis=(0, 1)) @ weights
            assert np.allclose(answer, expected, atol=1e-4)
        # Batches really formed: fewer runtime calls than requests.
        batches = metric(server.url, "modelport_batches_total", model="tiny")
        rows = metric(server.url, "modelport_batch_size_sum", model="tiny")
        assert rows == 300 and batches < 300, (batches, rows)
    finally:
        server.stop()


def test_queue_full_is_refused_fast_while_queued_requests_complete(gated):
    server, gate = gated
    gate.close()
    pixels = np.zeros((8, 8, 3), np.uint8)
    with ThreadPoolExecutor(8) as pool, httpx.Client(base_url=server.url, timeout=30) as client:
        running = pool.submit(client.post, "/v2/models/gate/infer", json=gate_request(pixels))
        wait_until(lambda: len(gate.batches()) == 1)  # the held request is in the model
        queued = [pool.submit(client.post, "/v2/models/gate/infer", json=gate_request(pixels)) for _ in range(4)]
        wait_until(lambda: metric(server.url, "modelport_queue_depth", model="gate") == 4)
        start = time.monotonic()
        refused = client.post("/v2/models/gate/infer", json=gate_request(pixels))
        elapsed = time.monotonic() - start
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "queue full" in refused.json()["error"]
        assert elapsed < 0.05, elapsed
        gate.open()
        assert [f.result().status_code for f in [running, *queued]] == [200] * 5


def test_deadline_passed_in_queue_is_504_without_compute(gated):
    server, gate = gated
    gate.close()
    pixels = np.zeros((8, 8, 3), np.uint8)
    with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=server.url, timeout=30) as client:
        running = pool.submit(client.post, "/v2/models/gate/infer", json=gate_request(pixels))
        wait_until(lambda: len(gate.batches()) == 1)
        late = pool.submit(client.post, "/v2/models/gate/infer", json=gate_request(pixels),
                           headers={"X-Request-Timeout-Ms": "50"})
        wait_until(lambda: metric(server.url, "modelport_queue_depth", model="gate") == 1)
        time.sleep(0.1)  # let the queued request's own deadline pass (this is the thing under test)
        gate.open()
        assert running.result().status_code == 200
        response = late.result()
        assert response.status_code == 504 and "not computed" in response.json()["error"]
    assert len(gate.batches()) == 1  # only the first request: the late one never ran


def test_hung_model_call_is_answered_504_at_the_deadline_and_the_server_recovers(gated):
    server, gate = gated
    gate.close()
    pixels = np.zeros((8, 8, 3), np.uint8)
    start = time.monotonic()
    response = httpx.post(server.url + "/v2/models/gate/infer", json=gate_request(pixels),
                          headers={"X-Request-Timeout-Ms": "300"}, timeout=30)
    elapsed = time.monotonic() - start
    assert response.status_code == 504 and "while the model was computing" in response.json()["error"]
    assert 0.25 < elapsed < 5
    gate.open()
    assert httpx.post(server.url + "/v2/models/gate/infer", json=gate_request(pixels)).status_code == 200


def test_deadline_header_cannot_raise_the_server_default_and_must_be_a_number(gated):
    server, _ = gated
    pixels = np.zeros((8, 8, 3), np.uint8)
    ok = httpx.post(server.url + "/v2/models/gate/infer", json=gate_request(pixels),
                    headers={"X-Request-Timeout-Ms": "99999999"})
    assert ok.status_code == 200
    bad = httpx.post(server.url + "/v2/models/gate/infer", json=gate_request(pixels),
                     headers={"X-Request-Timeout-Ms": "soon"})
    assert bad.status_code == 400


def test_client_that_disconnects_while_queued_is_never_executed(gated):
    server, gate = gated
    gate.close()
    pixels = np.zeros((8, 8, 3), np.uint8)
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=server.url, timeout=30) as client:
        running = pool.submit(client.post, "/v2/models/gate/infer", json=gate_request(pixels))
        wait_until(lambda: len(gate.batches()) == 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v2/models/gate/infer", json=gate_request(pixels), timeout=0.3)
        wait_until(lambda: metric(server.url, "modelport_requests_total", model="gate", status="499") == 1)
        gate.open()
        assert running.result().status_code == 200
    assert len(gate.batches()) == 1


def test_body_limit_boundary_and_chunked_bodies(gated):
    server, _ = gated
    limit = int(0.01 * 1024 * 1024)
    body = json.dumps(gate_request(np.zeros((8, 8, 3), np.uint8))).encode()
    exact = body + b" " * (limit - len(body))
    url = server.url + "/v2/models/gate/infer"
    assert httpx.post(url, content=exact).status_code == 200
    over = httpx.post(url, content=exact + b" ")
    assert over.status_code == 413 and "over the limit" in over.json()["error"]

    def chunks():
        for _ in range(20):
            yield b" " * 1024
    assert httpx.post(url, content=chunks()).status_code == 413
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_bug_in_model_code_is_a_generic_500_with_request_id(gated):
    server, gate = gated
    (gate.bundle / "fail").touch()
    response = httpx.post(server.url + "/v2/models/gate/infer", json=gate_request(np.zeros((8, 8, 3), np.uint8)))
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal error" and len(body["request_id"]) >= 16
    assert "Traceback" not in response.text and "model.py" not in response.text
    assert body["request_id"] in server.log.read_text() and "a bug in model code" in server.log.read_text()
    (gate.bundle / "fail").unlink()
    ok = httpx.post(server.url + "/v2/models/gate/infer", json=gate_request(np.zeros((8, 8, 3), np.uint8)))
    assert ok.status_code == 200


def test_sigterm_finishes_in_flight_requests_and_exits_0(gated):
    server, gate = gated
    gate.close()
    pixels = np.zeros((8, 8, 3), np.uint8)
    with ThreadPoolExecutor(4) as pool:
        inflight = [pool.submit(httpx.post, server.url + "/v2/models/gate/infer", json=gate_request(pixels), timeout=30)
                    for _ in range(4)]
        wait_until(lambda: len(gate.batches()) == 1 and metric(server.url, "modelport_queue_depth", model="gate") == 3)
        server.signal(signal.SIGTERM)
        time.sleep(0.2)  # the server is now draining with requests held by the gate
        assert server.proc.poll() is None
        gate.open()
        assert [f.result().status_code for f in inflight] == [200] * 4
    assert server.proc.wait(timeout=30) == 0


def test_second_signal_forces_exit(gated):
    server, gate = gated
    gate.close()
    pixels = np.zeros((8, 8, 3), np.uint8)
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(httpx.post, server.url + "/v2/models/gate/infer", json=gate_request(pixels), timeout=30)
        wait_until(lambda: len(gate.batches()) == 1)
        server.signal(signal.SIGTERM)
        time.sleep(0.2)
        assert server.proc.poll() is None  # waiting for the held request
        server.signal(signal.SIGINT)
        server.proc.wait(timeout=10)
        gate.open()
        with pytest.raises(httpx.HTTPError):
            stuck.result()


def test_fuzzed_bodies_never_500(gated):
    server, _ = gated
    rng = np.random.default_rng(9)
    url = server.url
    with httpx.Client(base_url=url, timeout=10) as client:
        for i in range(150):
            blob = rng.bytes(int(rng.integers(0, 300)))
            if i % 3 == 0:
                blob = b'{"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "UINT8", "data": ' + blob
            for path in ("/v2/models/gate/infer", "/v1/models/gate:predict", "/"):
                status = client.post(path, content=blob, headers={"content-type": "application/json"}).status_code
                assert status in (400, 404, 413), (path, blob, status)
        assert client.get("/v2/health/ready").status_code == 200


def test_readiness_is_503_while_models_load(tmp_path):
    """In-process: the app answers health at once and refuses model requests until loaded."""
    from starlette.testclient import TestClient

    from modelport.server.app import create_app
    from modelport.server.config import ServerConfig

    release = threading.Event()
    bundle = make_tiny_bundle(tmp_path / "tiny" / "1")

    def slow_discovery():
        release.wait(10)
        return {"tiny": bundle}

    with TestClient(create_app(slow_discovery, ServerConfig())) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503
        loading = client.get("/v2/models/tiny")
        assert loading.status_code == 503 and loading.headers["retry-after"] == "1"
        release.set()
        wait_until(lambda: client.get("/v2/health/ready").status_code == 200)
        assert client.get("/v2/models/tiny").status_code == 200


def test_bad_single_bundle_fails_start_with_a_clear_message(tmp_path):
    bundle = tmp_path / "broken" / "1"
    bundle.mkdir(parents=True)
    (bundle / "modelport.toml").write_text("runtime = 'tensorflow'\n")
    server = Server(str(bundle), log=tmp_path / "server.log")
    assert server.proc.wait(timeout=30) == 2
    assert "unknown runtime 'tensorflow'" in server.log.read_text()


def test_bad_version_in_a_repository_is_failed_and_the_server_stays_up(tmp_path):
    make_tiny_bundle(tmp_path / "repo" / "tiny" / "1")
    (tmp_path / "repo" / "broken" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "broken" / "1" / "modelport.toml").write_text("runtime = 'tensorflow'\n")
    server = Server(str(tmp_path / "repo"), log=tmp_path / "server.log").wait_ready()
    try:
        status = httpx.get(server.url + "/v1/models/broken").json()["model_version_status"][0]
        assert status["state"] == "END" and "unknown runtime 'tensorflow'" in status["status"]["error_message"]
        assert httpx.get(server.url + "/v2/models/tiny/ready").status_code == 200
        assert httpx.get(server.url + "/v2/models/broken/ready").status_code == 404
        assert metric(server.url, "modelport_model_state", model="broken", state="FAILED") == 1
    finally:
        server.stop()


def test_slow_clients_are_cut_off_and_do_not_starve_others(tmp_path):
    import socket

    make_tiny_bundle(tmp_path / "repo" / "tiny" / "1")
    server = Server(str(tmp_path / "repo"), "--read-timeout-s", "1", log=tmp_path / "server.log").wait_ready()
    try:
        def fds() -> int:
            import os

            return len(os.listdir(f"/proc/{server.proc.pid}/fd"))

        baseline = fds()
        slow = []
        for _ in range(20):  # slowloris: headers one byte at a time, never finished
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        body = {"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]}
        for _ in range(5):
            for s in slow:
                try:
                    s.sendall(b"a")  # a byte now and then: uvicorn's own keep-alive timer would be reset
                except OSError:
                    pass
            assert httpx.post(server.url + "/v2/models/tiny/infer", json=body).status_code == 200  # others served
            time.sleep(0.3)
        # Past the read timeout, every trickling connection has been closed by the server.
        for s in slow:
            s.settimeout(5)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
            s.close()
        wait_until(lambda: fds() <= baseline + 2)
    finally:
        server.stop()


def test_client_that_never_reads_responses_is_cut_off(tmp_path):
    import json as jsonlib
    import os
    import socket

    make_tiny_bundle(tmp_path / "repo" / "tiny" / "1")
    server = Server(str(tmp_path / "repo"), "--write-timeout-s", "1", "--max-body-mb", "100",
                    log=tmp_path / "server.log").wait_ready()
    try:
        def fds() -> int:
            return len(os.listdir(f"/proc/{server.proc.pid}/fd"))

        baseline = fds()
        # 77 MB in; the answer is 400,000 random floats of JSON, ~8 MB: more than the kernel buffers.
        rows = np.random.default_rng(0).normal(size=(100_000, 3, 8, 8)).astype(np.float32)
        header = jsonlib.dumps({"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": "FP32",
                                            "parameters": {"binary_data_size": rows.nbytes}}]}).encode()
        greedy = socket.socket()
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        greedy.connect(("127.0.0.1", server.port))
        greedy.sendall((f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Length: {len(header) + rows.nbytes}\r\n"
                        f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + header + rows.tobytes())
        # Never read. The server's send buffer fills; after the write timeout it lets go.
        wait_until(lambda: fds() <= baseline, timeout_s=30)
        body = {"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]}
        assert httpx.post(server.url + "/v2/models/tiny/infer", json=body).status_code == 200
        greedy.close()
    finally:
        server.stop()


def test_under_load_batches_run_thin_side_by_side_and_a_lone_request_runs_full(default_server, served_model):
    """The default server on this machine's 2+ cores: batches side by side are on by default."""
    from modelport import samples

    default_model = served_model
    assert default_model.model_file.stat().st_size < 100 * 1024 * 1024
    photos = samples.photo_set(24, seed=21)
    expected = [p[0].label for p in default_model.classify(photos, 1)]
    name = default_model.name

    def ask(i: int) -> str:
        reply = client.post("/?k=1", files={"data": ("p.jpg", photos[i % len(photos)], "image/jpeg")})
        assert reply.status_code == 200, reply.text
        return reply.json()[0][0]

    with httpx.Client(base_url=default_server.url, timeout=60, limits=httpx.Limits(max_connections=16)) as client:
        ask(0)  # warm
        thin, batches = (metric(default_server.url, m, model=name)
                         for m in ("modelport_thin_batches_total", "modelport_batches_total"))
        assert [ask(i) for i in range(6)] == expected[:6]  # one at a time: each alone, on every core
        assert metric(default_server.url, "modelport_thin_batches_total", model=name) == thin
        assert metric(default_server.url, "modelport_batches_total", model=name) == batches + 6
        with ThreadPoolExecutor(12) as pool:  # 12 in flight: more than one batch's worth at a time
            answers = list(pool.map(ask, range(72)))
    assert answers == [expected[i % len(photos)] for i in range(72)]
    ran_thin = metric(default_server.url, "modelport_thin_batches_total", model=name) - thin
    assert ran_thin >= 4, ran_thin
    # No batch above max_batch_size rows (8), thin or full.
    assert (metric(default_server.url, "modelport_batch_size_bucket", model=name, le="8.0")
            == metric(default_server.url, "modelport_batch_size_count", model=name))
