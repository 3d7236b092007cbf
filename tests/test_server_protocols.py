"""Every protocol against a real server process with the real default model."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelport import samples

MODEL = "efficientnet-lite0"
CAT = samples.KNOWN["chelsea"]


@pytest.fixture(scope="module")
def http(default_server):
    with httpx.Client(base_url=default_server.url, timeout=30) as client:
        yield client


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def label_index(label: str) -> int:
    from modelport.packaged.default_model import default_model_dir

    return (default_model_dir() / "labels.txt").read_text().splitlines().index(label)


# -- the article's upload API --------------------------------------------------------------------

def test_upload_like_the_article(http, images):
    response = http.post("/", files={"data": images["cat"].open("rb")})
    assert response.status_code == 200
    body = response.json()
    assert len(body) == 5 and all(isinstance(label, str) and 0 <= score <= 1 for label, score in body)
    assert label_index(body[0][0]) in CAT
    assert response.headers["x-model-name"] == MODEL and response.headers["x-model-version"] == "1"
    timing = response.headers["server-timing"]
    assert "decode;dur=" in timing and "queue;dur=" in timing and "infer;dur=" in timing


def test_upload_top_k_query(http, images):
    body = http.post("/?k=2", files={"data": images["espresso"].open("rb")}).json()
    assert len(body) == 2 and body[0][0] == "espresso"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"files": {"image": b"x"}}, "missing form field 'data'"),
    ({"content": b"just bytes", "headers": {"content-type": "application/octet-stream"}}, "multipart"),
    ({"files": {"data": b"not an image"}}, "cannot decode image"),
])
def test_upload_errors_are_400_naming_the_field(http, kwargs, fragment):
    response = http.post("/", **kwargs)
    assert response.status_code == 400
    assert fragment in response.json()["error"] and response.json()["input"] == "data"


def test_truncated_jpeg_and_bomb_are_400(http, images):
    data = images["cat"].read_bytes()
    assert http.post("/", files={"data": data[: len(data) // 3]}).status_code == 400
    from test_imaging import _png_header_only

    response = http.post("/", files={"data": _png_header_only(60_000, 60_000)})
    assert response.status_code == 400
    assert http.get("/v2/health/live").status_code == 200


# -- KServe V2 ------------------------------------------------------------------------------------

def test_v2_server_metadata_and_health(http):
    meta = http.get("/v2").json()
    assert meta["name"] == "modelport" and "binary_tensor_data" in meta["extensions"]
    assert "classification" in meta["extensions"]
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get(f"/v2/models/{MODEL}/ready").status_code == 200
    assert http.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
    assert http.get(f"/v2/models/{MODEL}/versions/2/ready").status_code == 404


def test_v2_model_metadata(http):
    meta = http.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["versions"] == ["1"] and meta["platform"] == "onnx_onnxv1"
    assert {"name": "image", "datatype": "UINT8", "shape": [-1, 224, 224, 3]} in meta["inputs"]
    assert any(i["name"] == "image_bytes" and i["datatype"] == "BYTES" for i in meta["inputs"])
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]} in meta["outputs"]
    assert http.get(f"/v2/models/{MODEL}/versions/1").json() == meta


def test_unknown_model_or_version_is_404(http):
    for path in ("/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{MODEL}/versions/9",
                 "/v1/models/nope", f"/v1/models/{MODEL}/versions/9"):
        response = http.get(path)
        assert response.status_code == 404, path
        assert "error" in response.json()
    response = http.post("/v2/models/nope/infer", json={"inputs": []})
    assert response.status_code == 404


def test_v2_json_infer_with_base64_image(http, images):
    request = {"id": "req-7", "inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES",
                                          "data": [b64(images["cat"]), b64(images["espresso"])]}],
               "outputs": [{"name": "probabilities"}]}
    body = http.post(f"/v2/models/{MODEL}/infer", json=request).json()
    assert body["id"] == "req-7" and body["model_name"] == MODEL and body["model_version"] == "1"
    (out,) = body["outputs"]
    assert out["name"] == "probabilities" and out["shape"] == [2, 1000] and out["datatype"] == "FP32"
    probs = np.array(out["data"]).reshape(2, 1000)
    assert probs[0].argmax() in CAT and probs[1].argmax() == 967


def test_v2_all_outputs_by_default(http, images):
    request = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [b64(images["cat"])]}]}
    outputs = {o["name"]: o for o in http.post(f"/v2/models/{MODEL}/infer", json=request).json()["outputs"]}
    assert outputs["features"]["shape"] == [1, 1280] and outputs["probabilities"]["shape"] == [1, 1000]


def test_v2_classification_extension(http, images):
    request = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [b64(images["espresso"])]}],
               "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    (out,) = http.post(f"/v2/models/{MODEL}/infer", json=request).json()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 3]
    score, index, label = out["data"][0].split(":", 2)
    assert (index, label) == ("967", "espresso") and 0.5 < float(score) <= 1


def _binary_request(header: dict, blobs: list[bytes]) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head)),
                                    "Content-Type": "application/octet-stream"}


def _parse_binary(response) -> tuple[dict, bytes]:
    n = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:n]), response.content[n:]


def test_v2_binary_raw_jpeg_in_binary_probabilities_out(http, images):
    jpegs = [images["cat"].read_bytes(), images["espresso"].read_bytes()]
    blob = b"".join(struct.pack("<I", len(j)) + j for j in jpegs)
    body, headers = _binary_request({
        "inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }, [blob])
    response = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    header, raw = _parse_binary(response)
    (out,) = header["outputs"]
    assert out["parameters"]["binary_data_size"] == len(raw) == 2 * 1000 * 4
    probs = np.frombuffer(raw, dtype="<f4").reshape(2, 1000)
    assert probs[0].argmax() in CAT and probs[1].argmax() == 967


def test_v2_raw_tensor_matches_local_pipeline(http, images, served_model):
    default_model = served_model
    crop = default_model.decode(images["espresso"].read_bytes())[None]
    body, headers = _binary_request({
        "inputs": [{"name": "image", "shape": list(crop.shape), "datatype": "UINT8",
                    "parameters": {"binary_data_size": crop.nbytes}}],
        "parameters": {"binary_data_output": True},
    }, [crop.tobytes()])
    header, raw = _parse_binary(http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers))
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in header["outputs"]}
    probs = np.frombuffer(raw[: sizes["probabilities"]], dtype="<f4") if header["outputs"][0]["name"] == "probabilities" \
        else np.frombuffer(raw[sizes["features"]:], dtype="<f4")
    assert np.allclose(probs, default_model.predict(crop)[0], atol=1e-5)


@pytest.mark.parametrize("tensor, fragment", [
    ({"name": "image", "shape": [1, 224, 224, 3], "datatype": "FP32", "data": [0.0]}, "must be UINT8"),
    ({"name": "image", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12}, "must have shape"),
    ({"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": [1, 2, 3]}, "says 150528 elements"),
    ({"name": "image", "shape": [100000, 100000, 100000, 3], "datatype": "UINT8", "data": [1]}, "elements"),
    ({"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": [[1, 2], [3]]}, "not UINT8"),
    ({"name": "image", "shape": [1, 224, 224, 3], "datatype": "COMPLEX", "data": [1]}, "unknown datatype"),
    ({"name": "pixels", "shape": [1], "datatype": "UINT8", "data": [1]}, "unknown input 'pixels'"),
    ({"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["***"]}, "base64"),
    ({"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"nope").decode()]},
     "cannot decode image"),
    ({"name": "image", "shape": "big", "datatype": "UINT8", "data": [1]}, "shape must be"),
])
def test_v2_bad_tensors_are_400_naming_the_input(http, tensor, fragment):
    response = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": [tensor]})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]
    assert response.json()["input"] == tensor["name"]


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"inputs": 3}', b'{"inputs": []}', b"[" * 100_000 + b"]" * 100_000,
                                  json.dumps({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                                          "data": ["x"]}], "outputs": [{"name": "nope"}]}).encode()])
def test_v2_malformed_bodies_are_400(http, body):
    response = http.post(f"/v2/models/{MODEL}/infer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "error" in response.json()


def test_v2_binary_header_longer_than_body_is_400(http):
    response = http.post(f"/v2/models/{MODEL}/infer", content=b"{}",
                         headers={"Inference-Header-Content-Length": "500"})
    assert response.status_code == 400


def test_v2_stats_count_inferences(http, images):
    before = http.get(f"/v2/models/{MODEL}/stats").json()["model_stats"][0]
    http.post("/", files={"data": images["cat"].open("rb")})
    after = http.get(f"/v2/models/{MODEL}/stats").json()["model_stats"][0]
    assert after["name"] == MODEL and after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + 1
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1


# -- TensorFlow Serving REST -------------------------------------------------------------------

def test_tf_status(http):
    body = http.get(f"/v1/models/{MODEL}").json()
    assert body == {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                              "status": {"error_code": "OK", "error_message": ""}}]}
    assert http.get(f"/v1/models/{MODEL}/versions/1").status_code == 200
    assert http.get(f"/v1/models/{MODEL}/labels/stable").status_code == 404


def test_tf_predict_b64_instances(http, images):
    body = http.post(f"/v1/models/{MODEL}:predict",
                     json={"instances": [{"b64": b64(images["cat"])}, {"b64": b64(images["espresso"])}]}).json()
    predictions = np.array(body["predictions"])
    assert predictions.shape == (2, 1000)
    assert predictions[0].argmax() in CAT and predictions[1].argmax() == 967


def test_tf_predict_named_and_columnar_and_versioned(http, images):
    named = http.post(f"/v1/models/{MODEL}/versions/1:predict",
                      json={"instances": [{"image_bytes": {"b64": b64(images["espresso"])}}]}).json()
    assert np.argmax(named["predictions"][0]) == 967
    columnar = http.post(f"/v1/models/{MODEL}:predict", json={"inputs": {"b64": b64(images["espresso"])}}).json()
    assert np.argmax(columnar["outputs"][0]) == 967


def test_tf_classify(http, images):
    body = http.post(f"/v1/models/{MODEL}:classify", json={"examples": [{"b64": b64(images["espresso"])}]}).json()
    (row,) = body["result"]
    assert row[0][0] == "espresso" and len(row) == 5


@pytest.mark.parametrize("payload, fragment", [
    ({}, "instances"),
    ({"instances": []}, "non-empty"),
    ({"instances": [{"b64": "!!!"}]}, "base64"),
    ({"instances": [{"b64": "aGVsbG8="}]}, "cannot decode image"),
    ({"instances": [{"pixels": {"b64": "AAAA"}}]}, "unknown input 'pixels'"),
    ({"instances": [[1, 2, 3]]}, "must have shape"),
])
def test_tf_errors_are_400(http, payload, fragment):
    response = http.post(f"/v1/models/{MODEL}:predict", json=payload)
    assert response.status_code == 400
    assert fragment in response.json()["error"]


# -- metrics ----------------------------------------------------------------------------------

def test_metrics_parse_and_count(http, images):
    http.post("/", files={"data": images["cat"].open("rb")})
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    requests = [s for s in families["modelport_requests"].samples
                if s.name == "modelport_requests_total" and s.labels["protocol"] == "upload" and s.labels["status"] == "200"]
    assert requests and requests[0].value >= 1 and requests[0].labels["model"] == MODEL
    observed = {s.name: s.value for f in families.values() for s in f.samples if s.labels.get("model") == MODEL}
    for name in ("modelport_request_duration_seconds_count", "modelport_queue_duration_seconds_count",
                 "modelport_inference_duration_seconds_count", "modelport_batch_size_count",
                 "modelport_decode_duration_seconds_count", "modelport_batches_total"):
        assert observed.get(name, 0) >= 1, name
    assert "modelport_requests_in_flight" in families and "modelport_queue_depth" in families
