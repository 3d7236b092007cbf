"""A watched model repository under load: versions, labels, policies, failures, the management API."""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from conftest import make_tiny_bundle
from modelport import Client
from servers import Gate, Server, free_port, make_gate_bundle
from test_server_behaviour import metric

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def v2(tensor_model: str = "tiny", version: str | None = None) -> str:
    return f"/v2/models/{tensor_model}" + (f"/versions/{version}" if version else "") + "/infer"


BODY = {"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.5] * 192}]}


class Load:
    """Continuous requests from a few threads; records every status and version it saw."""

    def __init__(self, url: str, path: str, threads: int = 3) -> None:
        self.url, self.path = url, path
        self.results: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                response = client.post(self.path, json=BODY)
                self.results.append((response.status_code, response.headers.get("x-model-version")))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def wait_for_version(self, version: str, timeout_s: float = 10) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.results and self.results[-1][1] == version:
                return time.monotonic() - start
            time.sleep(0.01)
        raise TimeoutError(f"version {version} never answered; last: {self.results[-3:]}")

    def failures(self) -> list:
        return [r for r in self.results if r[0] != 200]


def raw_status(port: int, path: str) -> int:
    """POST a path exactly as written (HTTP clients would normalise '..' away before sending)."""
    import socket

    body = b"{}"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        return int(sock.recv(4096).split(b" ", 2)[1])


def publish(source, target) -> None:
    """What a user does: copy a built version into the repository."""
    shutil.copytree(source, target)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    make_tiny_bundle(root / "tiny" / "1", seed=1)
    return root


def serve(root, tmp_path, *args) -> Server:
    return Server(str(root), "--admin-token", TOKEN, *args, log=tmp_path / "server.log").wait_ready()


def index(server) -> list[dict]:
    response = httpx.post(server.url + "/v2/repository/index", headers=AUTH)
    assert response.status_code == 200
    return response.json()


def test_new_version_takes_over_with_zero_errors(repo, tmp_path):
    server = serve(repo, tmp_path)
    try:
        with Load(server.url, v2()) as load:
            time.sleep(0.3)
            make_tiny_bundle(tmp_path / "build" / "2", seed=2)
            publish(tmp_path / "build" / "2", repo / "tiny" / "2")
            switched_s = load.wait_for_version("2")
            time.sleep(0.3)
        assert load.failures() == []
        assert {v for _, v in load.results} == {"1", "2"}
        assert switched_s < 3  # settle (0.5 s) + load + warm-up, with a margin for this machine
        entries = index(server)
        assert [(e["name"], e["version"], e["state"]) for e in entries] == [("tiny", "2", "READY")]
    finally:
        server.stop()


def test_garbage_version_fails_and_the_old_one_keeps_serving(repo, tmp_path):
    server = serve(repo, tmp_path)
    try:
        with Load(server.url, v2()) as load:
            broken = tmp_path / "build" / "2"
            make_tiny_bundle(broken)
            (broken / "model.onnx").write_bytes(b"\x00garbage" * 100)
            publish(broken, repo / "tiny" / "2")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                states = {e["version"]: e for e in index(server)}
                if states.get("2", {}).get("state") == "FAILED":
                    break
                time.sleep(0.05)
            time.sleep(0.3)
        assert states["2"]["state"] == "FAILED" and "cannot load" in states["2"]["reason"]
        assert states["1"]["state"] == "READY"
        assert load.failures() == [] and {v for _, v in load.results} == {"1"}
        metrics = httpx.get(server.url + "/metrics").text
        assert 'modelport_model_state{model="tiny",state="FAILED",version="2"} 1.0' in metrics
        # Fixing the files retries at once (the signature changed), and the new version takes over.
        shutil.rmtree(repo / "tiny" / "2")
        make_tiny_bundle(tmp_path / "fixed" / "3", seed=3)
        publish(tmp_path / "fixed" / "3", repo / "tiny" / "3")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and [e["version"] for e in index(server)] != ["3"]:
            time.sleep(0.05)
        assert [(e["version"], e["state"]) for e in index(server)] == [("3", "READY")]
    finally:
        server.stop()


def test_failed_load_is_retried_with_backoff_not_in_a_loop(repo, tmp_path):
    server = serve(repo, tmp_path)
    try:
        (repo / "tiny" / "2").mkdir()
        (repo / "tiny" / "2" / "modelport.toml").write_text("runtime = 'onnx'\n")  # no model file, no labels
        time.sleep(4)
        failures = server.log.read_text().count("version 2 FAILED")
        assert 1 <= failures <= 3, failures  # attempts at ~0, 1, 3 s: backoff, not a tight loop
    finally:
        server.stop()


def test_removing_a_version_with_requests_in_flight(tmp_path):
    root = tmp_path / "repo"
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    for v in (1, 2):
        make_gate_bundle(root / "gate" / str(v), max_batch_size=1, max_delay_ms=0)
    (root / "gate" / "model.toml").write_text("version_policy = { all = true }\n")
    server = Server(str(root), "--admin-token", TOKEN, log=tmp_path / "server.log",
                    env=dict(os.environ, GATE_DIR=str(gate_dir))).wait_ready()
    gate = Gate(gate_dir)
    pixels = {"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "UINT8", "data": [0] * 192}]}
    try:
        gate.close()
        with ThreadPoolExecutor(3) as pool:
            held = [pool.submit(httpx.post, server.url + v2("gate", "1"), json=pixels, timeout=30) for _ in range(3)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (len(gate.batches()) == 1 and metric(
                    server.url, "modelport_queue_depth", model="gate", version="1") == 2):
                time.sleep(0.01)
            shutil.rmtree(root / "gate" / "1")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and {e["version"]: e["state"] for e in index(server)}["1"] != "UNLOADING":
                time.sleep(0.02)
            # Draining: the held requests are still in it, new ones are refused.
            assert httpx.post(server.url + v2("gate", "1"), json=pixels).status_code == 404
            gate.open()
            assert [f.result().status_code for f in held] == [200, 200, 200]
            assert all(f.result().headers["x-model-version"] == "1" for f in held)
        assert httpx.post(server.url + v2("gate", "2"), json=pixels).status_code == 200
        assert httpx.post(server.url + v2("gate"), json=pixels).headers["x-model-version"] == "2"
    finally:
        gate.open()
        server.stop()


def test_labels_route_on_every_protocol(repo, tmp_path):
    make_tiny_bundle(repo / "tiny" / "2", seed=2)
    make_tiny_bundle(repo / "tiny" / "3", seed=3)
    (repo / "tiny" / "model.toml").write_text("[labels]\nstable = 1\ncanary = 2\n")  # latest = 1, plus labelled
    zmq_port = free_port()
    server = Server(str(repo), "--admin-token", TOKEN, log=tmp_path / "server.log", zmq_port=zmq_port).wait_ready()
    try:
        assert sorted((e["version"], e["state"]) for e in index(server)) == [("1", "READY"), ("2", "READY"),
                                                                             ("3", "READY")]
        http = httpx.Client(base_url=server.url)
        assert http.post(v2("tiny", "canary"), json=BODY).headers["x-model-version"] == "2"
        assert http.post(v2("tiny", "stable"), json=BODY).headers["x-model-version"] == "1"
        assert http.post(v2("tiny"), json=BODY).headers["x-model-version"] == "3"
        assert http.post(v2("tiny", "nightly"), json=BODY).status_code == 404
        tf = http.post("/v1/models/tiny/labels/canary:predict", json={"instances": [[[[0.5] * 8] * 8] * 3]})
        assert tf.status_code == 200 and tf.headers["x-model-version"] == "2"
        status = http.get("/v1/models/tiny/labels/stable").json()["model_version_status"]
        assert [s["version"] for s in status] == ["1"]
        tensor = np.full((1, 3, 8, 8), 0.5, np.float32)
        with Client(server.zmq_url, model="tiny") as z, Client(server.url, model="tiny") as h:
            for client in (z, h):
                by_label = client.infer("tiny", {"image": tensor}, version="canary")["logits"]
                by_number = client.infer("tiny", {"image": tensor}, version=2)["logits"]
                assert np.array_equal(by_label, by_number)
                assert not np.array_equal(by_label, client.infer("tiny", {"image": tensor}, version=1)["logits"])
    finally:
        server.stop()


def test_policy_latest_two_keeps_exactly_two(repo, tmp_path):
    for v in (2, 3):
        make_tiny_bundle(repo / "tiny" / str(v), seed=v)
    (repo / "tiny" / "model.toml").write_text("version_policy = { latest = 2 }\n")
    server = serve(repo, tmp_path)
    try:
        assert [(e["version"], e["state"]) for e in index(server)] == [("2", "READY"), ("3", "READY")]
        publish_dir = tmp_path / "build" / "4"
        make_tiny_bundle(publish_dir, seed=4)
        publish(publish_dir, repo / "tiny" / "4")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and [e["version"] for e in index(server)] != ["3", "4"]:
            time.sleep(0.05)
        assert [(e["version"], e["state"]) for e in index(server)] == [("3", "READY"), ("4", "READY")]
    finally:
        server.stop()


def test_traversal_attempts_are_400_and_outside_files_untouched(repo, tmp_path):
    outside = tmp_path / "outside"
    make_tiny_bundle(outside / "1")
    canary = outside / "canary.txt"
    canary.write_text("untouched")
    (repo / "escape").symlink_to(outside, target_is_directory=True)  # a model dir pointing out
    server = serve(repo, tmp_path)
    try:
        http = httpx.Client(base_url=server.url)
        for name in ("..", "..%2F..%2Foutside", ".hidden", "a%00b", "%2E%2E", "/tmp", "../outside"):
            assert raw_status(server.port, f"/v2/models/{name}/infer") == 400, name
            assert raw_status(server.port, f"/v2/repository/models/{name}/load") == 400, name
            assert raw_status(server.port, f"/v1/models/{name}:predict") == 400, name
        assert http.post("/v2/repository/models/escape/load", headers=AUTH).status_code == 404
        assert http.post(v2("escape"), json=BODY).status_code == 404
        assert canary.read_text() == "untouched" and sorted(p.name for p in outside.iterdir()) == ["1", "canary.txt"]
        assert [e["name"] for e in index(server)] == ["tiny"]
    finally:
        server.stop()


def test_management_api_needs_the_token(repo, tmp_path):
    server = serve(repo, tmp_path)
    try:
        http = httpx.Client(base_url=server.url)
        assert http.post("/v2/repository/index").status_code == 401
        wrong = http.post("/v2/repository/index", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "bearer" in wrong.headers["www-authenticate"].lower()
        assert http.post("/v2/repository/models/tiny/unload").status_code == 401
        assert http.post(v2(), json=BODY).status_code == 200  # still loaded: nothing happened
        assert http.post("/v2/repository/models/tiny/unload", headers=AUTH).status_code == 200
        assert http.post(v2(), json=BODY).status_code == 404
        assert http.post("/v2/repository/models/tiny/load", headers=AUTH).status_code == 200
        assert http.post(v2(), json=BODY).status_code == 200
        assert http.post("/v2/repository/models/nope/load", headers=AUTH).status_code == 404
    finally:
        server.stop()


def test_management_api_is_off_without_a_configured_token(repo, tmp_path):
    server = Server(str(repo), log=tmp_path / "server.log").wait_ready()
    try:
        assert httpx.post(server.url + "/v2/repository/index", headers=AUTH).status_code == 403
    finally:
        server.stop()


def test_load_unload_cycles_return_file_descriptors(repo, tmp_path):
    server = serve(repo, tmp_path)
    http = httpx.Client(base_url=server.url, timeout=30)
    try:
        def fds() -> int:
            return len(os.listdir(f"/proc/{server.proc.pid}/fd"))

        for _ in range(3):  # let lazily created resources (thread pools, arenas) exist first
            http.post("/v2/repository/models/tiny/unload", headers=AUTH)
            http.post("/v2/repository/models/tiny/load", headers=AUTH)
        before = fds()
        for _ in range(20):
            assert http.post("/v2/repository/models/tiny/unload", headers=AUTH).status_code == 200
            assert http.post("/v2/repository/models/tiny/load", headers=AUTH).status_code == 200
            assert http.post(v2(), json=BODY).status_code == 200
        assert abs(fds() - before) <= 5
    finally:
        http.close()
        server.stop()
