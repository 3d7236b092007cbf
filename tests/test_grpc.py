"""gRPC (the Open Inference Protocol, as Triton and KServe serve it) against Triton's own gRPC client,
unchanged: the same models, answers, limits and errors as over HTTP."""

from __future__ import annotations

import asyncio
import queue

import numpy as np
import pytest

import tritonclient.grpc as grpcclient  # in the grpc extra: a missing install fails here, not silently
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import fuzzing
from modelport import samples

MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def triton(default_server):
    client = grpcclient.InferenceServerClient(default_server.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tiny(hardened_server):
    server, weights = hardened_server
    client = grpcclient.InferenceServerClient(server.grpc_address)
    yield client, weights
    client.close()


def images_input(*jpegs: bytes):
    tensor = grpcclient.InferInput("image_bytes", [len(jpegs)], "BYTES")
    tensor.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
    return tensor


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert triton.get_server_metadata().name == "modelport"
    metadata = triton.get_model_metadata(MODEL, as_json=True)
    assert metadata["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": ["-1", "224", "224", "3"]}
    assert {o["name"] for o in metadata["outputs"]} == {"probabilities", "features"}


def test_a_raw_tensor_gets_the_models_own_answer(triton, served_model, images):
    crop = served_model.decode(images["espresso"].read_bytes())[None]
    tensor = grpcclient.InferInput("image", list(crop.shape), "UINT8")
    tensor.set_data_from_numpy(crop)  # raw_input_contents
    result = triton.infer(MODEL, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    assert np.allclose(result.as_numpy("probabilities"), served_model.predict(crop), atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_encoded_images_with_classification_answer_alike_over_http_and_grpc(default_server, images, protocol):
    jpegs = np.array([images["espresso"].read_bytes(), images["cat"].read_bytes()], dtype=np.object_)
    client_module = grpcclient if protocol == "grpc" else httpclient
    address = default_server.grpc_address if protocol == "grpc" else default_server.url.removeprefix("http://")
    client = client_module.InferenceServerClient(address)
    tensor = client_module.InferInput("image_bytes", [2], "BYTES")
    tensor.set_data_from_numpy(jpegs)
    result = client.infer(MODEL, [tensor], outputs=[client_module.InferRequestedOutput("probabilities", class_count=3)])
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3)
    assert top[0][0].decode().split(":")[1:] == ["967", "espresso"]
    assert 281 <= int(top[1][0].decode().split(":")[1]) <= 285  # a cat
    client.close()


def test_typed_contents_and_statistics(tiny):
    client, weights = tiny
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    request = grpcclient.service_pb2.ModelInferRequest(model_name=fuzzing.MODEL)
    tensor = request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())  # typed contents, not raw
    before = client.get_inference_statistics(fuzzing.MODEL).model_stats[0].inference_count
    response = client._client_stub.ModelInfer(request)
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, -1)
    assert np.allclose(logits, x.mean(axis=(2, 3)) @ weights, atol=1e-5)  # the tiny graph: channel means x weights
    after = client.get_inference_statistics(fuzzing.MODEL).model_stats[0].inference_count
    assert after == before + 2


def test_a_stream_answers_each_request_matched_by_id_and_survives_a_bad_one(tiny):
    client, _ = tiny
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    photos = [fuzzing.png(seed) for seed in range(6)]
    for n, photo in enumerate([*photos, b"not an image"]):
        client.async_stream_infer(fuzzing.MODEL, [images_input(photo)], request_id=f"r{n}")
    got = [answers.get(timeout=20) for _ in range(len(photos) + 1)]
    client.stop_stream()
    ids = sorted(r.get_response().id for r, e in got if e is None)
    errors = [e.message() for r, e in got if e is not None]
    assert ids == sorted(f"r{n}" for n in range(len(photos)))
    assert len(errors) == 1 and "cannot decode image" in errors[0]


@pytest.mark.parametrize("call, status, says", [
    (lambda c: c.infer("nope", [images_input(b"x")]), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
    (lambda c: c.infer(fuzzing.MODEL, [grpcclient.InferInput("other", [1], "BYTES")]), "StatusCode.INVALID_ARGUMENT",
     "unknown input"),
    (lambda c: c.infer(fuzzing.MODEL, [images_input(*[b"x"] * 65)]), "StatusCode.RESOURCE_EXHAUSTED", "over the limit"),
    (lambda c: c.infer(fuzzing.MODEL, [images_input(b"not an image")]), "StatusCode.INVALID_ARGUMENT",
     "cannot decode image"),
    (lambda c: c.get_model_repository_index(), "StatusCode.UNAUTHENTICATED", "bearer token"),
    (lambda c: c.get_model_repository_index(headers={"authorization": "Bearer wrong"}), "StatusCode.UNAUTHENTICATED",
     "bearer token"),
])
def test_errors_are_grpc_status_codes_with_the_same_messages_as_http(tiny, call, status, says):
    client, _ = tiny
    with pytest.raises(InferenceServerException) as raised:
        call(client)
    assert raised.value.status() == status and says in raised.value.message()


def test_the_repository_rpcs_need_the_admin_token(tiny):
    client, _ = tiny
    bearer = {"authorization": f"Bearer {fuzzing.ADMIN_TOKEN}"}
    index = client.get_model_repository_index(headers=bearer, as_json=True)
    assert {"name": fuzzing.MODEL, "version": "1", "state": "READY"}.items() <= index["models"][0].items()
    client.load_model(fuzzing.MODEL, headers=bearer)  # already loaded: loading again keeps it serving
    assert client.is_model_ready(fuzzing.MODEL)
    with pytest.raises(InferenceServerException) as raised:
        client.unload_model("nope", headers=bearer)
    assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_a_cat_over_grpc(triton):
    result = triton.infer(MODEL, [images_input(samples.jpeg(samples.photo("chelsea")))],
                          outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=1)])
    assert 281 <= int(result.as_numpy("probabilities")[0][0].decode().split(":")[1]) <= 285


def test_modelports_own_client_speaks_grpc(default_server, hardened_server, images):
    from modelport import AsyncClient, Client
    from modelport.errors import BadInput, NotFound

    url = f"grpc://{default_server.grpc_address}"
    with Client(url) as client:
        assert client.ping()
        assert client.classify(images["espresso"], top_k=3)[0].label == "espresso"
        with pytest.raises(NotFound, match="unknown model"):
            client.infer("nope", [images["cat"].read_bytes()])
    tiny_server, weights = hardened_server
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)

    async def run():
        async with AsyncClient(f"grpc://{tiny_server.grpc_address}", model=fuzzing.MODEL) as client:
            answers = await asyncio.gather(*(client.infer(fuzzing.MODEL, {"image": x[i:i + 1]}) for i in range(3)))
            with pytest.raises(BadInput, match="cannot decode"):
                await client.classify(b"not an image")
            return answers

    answers = asyncio.run(run())
    assert np.allclose(np.concatenate([a["logits"] for a in answers]), x.mean(axis=(2, 3)) @ weights, atol=1e-5)
