"""The PyTorch runtime: TorchScript bundles, the refusal of pickles, build-model, and an ONNX-only
process that never imports torch."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import make_tiny_bundle
from modelport.repository.bundle import write_config
from modelport.errors import BundleError
from modelport.engine.model import Model
from servers import Server

torch = pytest.importorskip("torch")  # the torch extra is part of the test install


class TinyNet(torch.nn.Module):
    """Mean pixel per channel (uint8 NHWC in), then a linear layer: logits, and the pooled features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, pixels):
        features = pixels.float().mean(dim=(1, 2)) / 255.0
        return self.fc(features), features


def torch_bundle(directory: Path, *, outputs=("logits", "features"), module=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    module = module or torch.jit.script(TinyNet())
    torch.jit.save(module, str(directory / "model.pt"))
    (directory / "labels.txt").write_text("a\nb\nc\nd\n")
    write_config(directory, {
        "format": 1, "runtime": "torch", "model_file": "model.pt", "outputs": list(outputs),
        "input": {"name": "pixels", "height": 8, "width": 8, "resize_shorter": 0, "dtype": "uint8", "layout": "NHWC"},
        "output": {"name": "logits", "kind": "logits"},
        "serving": {"top_k": 3},
    })
    return directory


def test_a_torchscript_bundle_answers_like_the_module_run_by_hand(tmp_path):
    bundle = torch_bundle(tmp_path / "tiny" / "1")
    model = Model.load(bundle)
    assert model.platform == "pytorch_torchscript"
    assert [o.name for o in model.runtime.outputs] == ["logits", "features"]
    assert model.runtime.outputs[1].shape == (-1, 3)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    got = model.run({"pixels": pixels})
    by_hand = torch.jit.load(str(bundle / "model.pt"))(torch.from_numpy(pixels))
    assert np.allclose(got["logits"], by_hand[0].detach().numpy(), atol=1e-6)
    assert np.allclose(got["features"], by_hand[1].detach().numpy(), atol=1e-6)


def test_pickles_are_refused_before_torch_sees_them(tmp_path):
    bundle = torch_bundle(tmp_path / "m" / "1")
    torch.save(TinyNet().state_dict(), bundle / "model.pt")  # a zip of pickles, no TorchScript code
    with pytest.raises(BundleError, match="not a TorchScript archive"):
        Model.load(bundle)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (bundle / "model.pt").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(BundleError, match="pickles"):
        Model.load(bundle)
    assert not marker.exists()  # never unpickled


def test_a_forward_that_returns_other_outputs_fails_at_load(tmp_path):
    bundle = torch_bundle(tmp_path / "m" / "1", outputs=("logits", "features", "extra"))
    with pytest.raises(BundleError, match="names 3"):
        Model.load(bundle)


def test_a_torch_bundle_is_served_like_any_model(tmp_path):
    torch_bundle(tmp_path / "repo" / "tiny" / "1")
    server = Server(str(tmp_path / "repo"), log=tmp_path / "server.log").wait_ready()
    try:
        meta = httpx.get(server.url + "/v2/models/tiny").json()
        assert meta["platform"] == "pytorch_torchscript" and meta["inputs"][0]["name"] == "pixels"
        pixels = np.full((1, 8, 8, 3), 200, np.uint8)
        reply = httpx.post(server.url + "/v2/models/tiny/infer", json={"inputs": [
            {"name": "pixels", "shape": [1, 8, 8, 3], "datatype": "UINT8", "data": pixels.ravel().tolist()}]})
        assert reply.status_code == 200, reply.text
        logits = np.array(reply.json()["outputs"][0]["data"]).reshape(1, 4)
        expected = TinyNet()(torch.from_numpy(pixels))[0].detach().numpy()
        assert np.allclose(logits, expected, atol=1e-5)
    finally:
        server.stop()


def test_an_onnx_only_process_never_imports_torch(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "tiny" / "1")
    code = ("import sys, numpy as np; from modelport.engine.model import Model; "
            f"m = Model.load({str(bundle)!r}); m.run({{'image': np.zeros((1, 3, 8, 8), np.float32)}}); "
            "import modelport.server.app, modelport.cli; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_build_model_torch_answers_like_the_onnx_default_model(tmp_path, default_model, images):
    result = subprocess.run([sys.executable, "-m", "modelport", "build-model", "efficientnet-lite0", "--runtime", "torch",
                             "--output", str(tmp_path)], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(tmp_path / "efficientnet-lite0" / "1")
    scripted = Model.load(tmp_path / "efficientnet-lite0" / "1")
    for path in images.values():
        data = path.read_bytes()
        ours, reference = scripted.classify([data], 3)[0], default_model.classify([data], 3)[0]
        assert [p.index for p in ours] == [p.index for p in reference]
        assert abs(ours[0].score - reference[0].score) < 1e-3
