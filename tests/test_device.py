"""--device: cpu, cuda[:N], auto. Without a GPU, asking for one fails at start with what is missing;
only auto falls back to the CPU. (The CUDA path itself runs on a GPU machine: BENCHMARKS.md.)"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from conftest import make_tiny_bundle
from modelport.runtime.device import Device, _cuda_devices_onnx
from modelport.errors import BundleError
from modelport.engine.model import Model
from servers import Server

NO_GPU = _cuda_devices_onnx() == 0


@pytest.mark.parametrize("text, expected", [("cpu", "cpu"), ("cuda", "cuda:0"), ("CUDA:1", "cuda:1"),
                                            ("auto", "auto")])
def test_device_names(text, expected):
    assert str(Device.parse(text)) == expected


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "tpu:0", "", "cuda:123"])
def test_unknown_device_names_are_refused(text):
    with pytest.raises(BundleError, match="is not one of cpu, cuda, cuda:N, auto"):
        Device.parse(text)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_at_start_with_what_is_missing(tmp_path):
    make_tiny_bundle(tmp_path / "m" / "1")
    done = subprocess.run([sys.executable, "-m", "modelport", "serve", str(tmp_path / "m"), "--device", "cuda",
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--device cuda:0" in done.stderr and ("onnxruntime-gpu" in done.stderr or "no such NVIDIA GPU" in done.stderr)
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_auto_falls_back_to_the_cpu_and_says_so(tmp_path):
    make_tiny_bundle(tmp_path / "m" / "1")
    server = Server(str(tmp_path / "m"), "--device", "auto", log=tmp_path / "server.log").wait_ready()
    try:
        metadata = httpx.get(server.url + "/v2/models/m").json()
        assert metadata["parameters"]["device"] == "cpu"
    finally:
        server.stop()


def test_device_in_the_bundle_is_checked(tmp_path):
    with pytest.raises(BundleError, match=r"modelport\.toml: serving\.device 'tpu'"):
        Model.load(make_tiny_bundle(tmp_path / "a" / "1", serving__device="tpu"))
    assert Model.load(make_tiny_bundle(tmp_path / "b" / "1", serving__device="auto")).runtime.device in ("cpu", "cuda:0")


def test_python_models_choose_their_own_device(tmp_path):
    from servers import make_gate_bundle

    bundle = make_gate_bundle(tmp_path / "gate" / "1")
    with pytest.raises(BundleError, match="chooses its own device"):
        Model.load(bundle, device="cuda")
