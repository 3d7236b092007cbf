"""Someone else's V2 client — Triton's own Python HTTP client — against modelport, unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import tritonclient.http as httpclient  # in the test extra: a missing install fails here, not silently

MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def triton(default_server):
    client = httpclient.InferenceServerClient(default_server.url.removeprefix("http://"))
    yield client
    client.close()


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert triton.get_server_metadata()["name"] == "modelport"
    metadata = triton.get_model_metadata(MODEL)
    assert metadata["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}


def test_binary_tensor_in_and_out(triton, served_model, images):
    default_model = served_model
    crop = default_model.decode(images["espresso"].read_bytes())[None]
    tensor = httpclient.InferInput("image", list(crop.shape), "UINT8")
    tensor.set_data_from_numpy(crop, binary_data=True)
    result = triton.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True)])
    assert np.allclose(result.as_numpy("probabilities"), default_model.predict(crop), atol=1e-5)


def test_encoded_image_with_classification(triton, images):
    data = np.array([images["espresso"].read_bytes(), images["cat"].read_bytes()], dtype=np.object_)
    tensor = httpclient.InferInput("image_bytes", [2], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=True)
    result = triton.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=3)])
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3)
    assert top[0][0].decode().split(":")[1:] == ["967", "espresso"]


def test_json_tensors_and_statistics(triton):
    tensor = httpclient.InferInput("image", [1, 224, 224, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 224, 224, 3), np.uint8), binary_data=False)
    before = triton.get_inference_statistics(MODEL)["model_stats"][0]["inference_count"]
    result = triton.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)])
    assert result.as_numpy("probabilities").shape == (1, 1000)
    assert triton.get_inference_statistics(MODEL)["model_stats"][0]["inference_count"] == before + 1


def test_errors_reach_the_client(triton):
    from tritonclient.utils import InferenceServerException

    tensor = httpclient.InferInput("image", [1, 2, 2, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(InferenceServerException, match="must have shape"):
        triton.infer(MODEL, [tensor])
    with pytest.raises(InferenceServerException):
        triton.get_model_metadata("no-such-model")
