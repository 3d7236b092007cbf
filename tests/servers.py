"""Real ``modelport serve`` processes for the tests, and the gate model that holds requests."""

from __future__ import annotations

import contextlib
import functools

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from modelport.repository.bundle import write_config

GATE_MODEL = '''
import os
import time
from pathlib import Path

import numpy as np

from modelport.runtime import TensorSpec

WEIGHTS = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)


class Model:
    """Counts every batch it runs; blocks while the file "gate" exists; raises while "fail" exists."""

    inputs = [TensorSpec("image", "UINT8", (-1, 8, 8, 3))]
    outputs = [TensorSpec("logits", "FP32", (-1, 4))]

    def __init__(self, bundle_dir):
        # The gate and the log live beside the bundle unless the test puts them elsewhere (a test
        # that deletes the version directory keeps them outside it).
        self.dir = Path(os.environ.get("GATE_DIR") or bundle_dir)

    def run(self, feeds):
        x = feeds["image"]
        with open(self.dir / "executed.log", "a") as log:
            log.write(f"{len(x)}\\n")
        while (self.dir / "gate").exists():
            time.sleep(0.002)
        if (self.dir / "fail").exists():
            raise RuntimeError("a bug in model code")
        mean = ((x.astype(np.float32) - 127.5) / 127.5).reshape(len(x), -1, 3).mean(axis=1)
        return {"logits": mean @ WEIGHTS}
'''


def make_gate_bundle(directory: Path, **serving) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(GATE_MODEL)
    (directory / "labels.txt").write_text("a\nb\nc\nd\n")
    write_config(directory, {
        "format": 1, "runtime": "python", "model_file": "model.py",
        "input": {"height": 8, "width": 8, "resize_shorter": 0, "dtype": "uint8", "layout": "NHWC"},
        "output": {"name": "logits", "kind": "logits"},
        "serving": {"top_k": 2, **serving},
    })
    return directory


class Gate:
    """Create after the server is ready: ``batches()`` then counts only requests, not the warm-up."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self._skip = len(self._all())

    def close(self) -> None:
        (self.bundle / "gate").touch()

    def open(self) -> None:
        (self.bundle / "gate").unlink(missing_ok=True)

    def batches(self) -> list[int]:
        """Rows of every batch the model ran since this gate was made."""
        return self._all()[self._skip:]

    def _all(self) -> list[int]:
        log = self.bundle / "executed.log"
        return [int(n) for n in log.read_text().split()] if log.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``modelport serve`` in its own process, on a free loopback port."""

    def __init__(self, *args: str, log: Path, env: dict | None = None, port: int | None = None,
                 zmq_port: int | None = None, grpc_port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.zmq_port = zmq_port
        self.zmq_url = f"zmq://127.0.0.1:{zmq_port}" if zmq_port else None
        self.grpc_address = f"127.0.0.1:{grpc_port}" if grpc_port else None
        self.log = log
        self._log_file = open(log, "ab")
        command = [sys.executable, "-m", "modelport", "serve", *args, "--port", str(self.port)]
        if zmq_port:
            command += ["--zmq-port", str(zmq_port)]
        if grpc_port:
            command += ["--grpc-port", str(grpc_port)]
        self.proc = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=env or os.environ.copy())

    def wait_ready(self, timeout_s: float = 60) -> "Server":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.log.read_text()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def stop_all(servers: list[Server]) -> None:
    """SIGTERM every server at once (a cluster worker drains for a while), then wait for each;
    a frozen (SIGSTOPped) one is woken first."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
            server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        server.stop()


def metric(url: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_until(predicate, timeout_s: float = 15, every_s: float = 0.02, what: str = "condition") -> float:
    """Seconds it took; TimeoutError after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what} not met within {timeout_s} s")
        time.sleep(every_s)
    return time.monotonic() - start


@contextlib.contextmanager
def raw_dealer(port: int, timeout_ms: int = 5000):
    """A bare DEALER socket, for frames no client would send (and replies no client shows)."""
    import zmq

    context = zmq.Context()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.RCVTIMEO, timeout_ms)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield raw
    finally:
        raw.close()
        context.term()


_FRESH = "MODELPORT_TEST_IN_FRESH_PROCESS"


def in_fresh_process(test):
    """Run ``test`` in a Python process of its own (pytest on that one test): for tests that measure
    the process itself (its RSS, its timing), which a pytest process grown through hundreds of other
    tests would distort. In that child the test runs as written."""
    if os.environ.get(_FRESH):
        return test

    @functools.wraps(test)
    def in_child(*args, **kwargs) -> None:
        where = f"{test.__code__.co_filename}::{test.__name__}"
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", where],
                                env={**os.environ, _FRESH: "1"}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]

    return in_child
