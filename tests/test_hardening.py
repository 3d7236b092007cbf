"""One regression test per class of input that fuzzing found answered with a 500 (or a memory
blow-up), on HTTP and ZeroMQ. Each failed before the fix; ``test_fuzz.py`` searches for more."""

from __future__ import annotations

import json
import socket
import struct
import time

import httpx
import msgpack
import numpy as np
import pytest

import fuzzing
from fuzzing import MODEL, png
from servers import metric
from test_rpc import raw_dealer

INFER = f"/v2/models/{MODEL}/infer"


def tensor_input(**changes) -> dict:
    entry = {"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.5] * 192}
    entry.update(changes)
    return entry


def post_json(server, path: str, body, **headers) -> httpx.Response:
    text = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=text, headers={"content-type": "application/json", **headers})


def zmq_call(server, request: dict) -> dict:
    with raw_dealer(server.zmq_port) as raw:
        raw.send(msgpack.packb({"id": 1, "model": MODEL, **request}, use_bin_type=True))
        return msgpack.unpackb(raw.recv(), raw=False)


def assert_bad(reply: httpx.Response, *words: str) -> None:
    assert reply.status_code == 400, (reply.status_code, reply.text)
    body = reply.json()
    assert body["kind"] == "bad_input"
    for word in words:
        assert word in body["error"], body


def assert_zmq_bad(reply: dict, *words: str) -> None:
    assert reply["ok"] is False and reply["error"]["kind"] == "bad_input", reply
    for word in words:
        assert word in reply["error"]["message"], reply


# 1. Request fields of the wrong JSON type

@pytest.mark.parametrize("value", [[1, 2], 7, "yes", True])
def test_wrong_json_type_of_parameters_is_400_naming_the_field(hardened_server, value):
    server, _ = hardened_server
    assert_bad(post_json(server, INFER, {"parameters": value, "inputs": [tensor_input()]}), "parameters")
    assert_bad(post_json(server, INFER, {"inputs": [tensor_input(parameters=value)]}), "parameters")
    assert_bad(post_json(server, INFER, {"inputs": [tensor_input()], "outputs": [{"name": "logits",
                                                                                 "parameters": value}]}), "parameters")


def test_wrong_json_types_elsewhere_are_400(hardened_server):
    server, _ = hardened_server
    assert_bad(post_json(server, INFER, {"inputs": [tensor_input()], "parameters": {"binary_data_output": "no"}}),
               "binary_data_output")
    assert_bad(post_json(server, INFER, {"inputs": [tensor_input()], "outputs": [
        {"name": "logits", "parameters": {"binary_data": 1}}]}), "binary_data")
    reply = post_json(server, "/v2/repository/index", [1, 2], authorization=f"Bearer {fuzzing.ADMIN_TOKEN}")
    assert_bad(reply, "request body")
    assert_bad(post_json(server, f"/v1/models/{MODEL}:classify", {"instances": [[0.5]], "top_k": [3]}), "top_k")


# 2. Non-finite numbers in JSON

@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_in_json_are_400(hardened_server, literal):
    server, _ = hardened_server
    body = '{"id": %s, "inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": %s}]}'
    assert_bad(post_json(server, INFER, body % (literal, json.dumps([0.5] * 192))), literal)
    assert_bad(post_json(server, INFER, body % ('"ok"', json.dumps([0.5] * 191)[:-1] + f", {literal}]")), literal)


def test_overflowing_and_non_finite_tensor_values_are_400_on_every_protocol(hardened_server):
    server, _ = hardened_server
    data = "[" + ", ".join(["0.5"] * 191 + ["1e999"]) + "]"  # a finite literal that overflows to inf
    body = '{"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": %s}]}' % data
    assert_bad(post_json(server, INFER, body), "NaN or infinite")
    instances = json.dumps({"instances": [np.full((3, 8, 8), 0.5).tolist()]}).replace("0.5", "1e999", 1)
    assert_bad(post_json(server, f"/v1/models/{MODEL}:predict", instances), "infinite")
    tensor = np.full((1, 3, 8, 8), np.nan, np.float32)
    header = json.dumps({"inputs": [tensor_input(data=None, parameters={"binary_data_size": tensor.nbytes})]}).encode()
    reply = httpx.post(server.url + INFER, content=header + tensor.tobytes(),
                       headers={"inference-header-content-length": str(len(header))})
    assert_bad(reply, "NaN")
    reply = zmq_call(server, {"op": "infer", "inputs": {"image": {"dtype": "float32", "shape": [1, 3, 8, 8],
                                                                  "data": tensor.tobytes()}}})
    assert_zmq_bad(reply, "NaN")


def test_an_echoed_id_must_be_a_string_or_an_integer(hardened_server):
    server, _ = hardened_server
    for good in ("req-1", 42):
        reply = post_json(server, INFER, {"id": good, "inputs": [tensor_input()]})
        assert reply.status_code == 200 and reply.json()["id"] == good
    assert_bad(post_json(server, INFER, {"id": 1.5, "inputs": [tensor_input()]}), "id")
    assert_bad(post_json(server, INFER, {"id": {"a": 1}, "inputs": [tensor_input()]}), "id")


# 3. "Digits" that are not ASCII digits, and 4. huge numbers

ODD = ["²", "١", "１２", "9" * 5000, "9" * 19]


def short(value) -> str:
    return repr(value)[:12]


@pytest.mark.parametrize("version", ODD, ids=short)
def test_odd_versions_are_4xx_on_every_protocol(hardened_server, version):
    server, _ = hardened_server
    for method, path in [("GET", f"/v2/models/{MODEL}/versions/{version}"),
                         ("GET", f"/v2/models/{MODEL}/versions/{version}/ready"),
                         ("POST", f"/v2/models/{MODEL}/versions/{version}/infer"),
                         ("GET", f"/v1/models/{MODEL}/versions/{version}"),
                         ("GET", f"/v1/models/{MODEL}/labels/{version}"),
                         ("POST", f"/v1/models/{MODEL}/versions/{version}:predict")]:
        reply = httpx.request(method, server.url + path, json={"inputs": [tensor_input()]})
        assert reply.status_code in (400, 404), (path, reply.status_code, reply.text)
        assert "error" in reply.json()
    reply = httpx.post(server.url + f"/?model={MODEL}&version={version}", files={"data": png(0)})
    assert reply.status_code in (400, 404), reply.text
    reply = zmq_call(server, {"op": "classify", "version": version, "images": [png(0)]})
    assert reply["ok"] is False and reply["error"]["status"] in (400, 404), reply


@pytest.mark.parametrize("path", [f"/v2/models/{MODEL}/versions/0%2F", f"/v2/models/{MODEL}/versions/1/",
                                  f"/v2/models/{MODEL}/", f"/v2/models/{MODEL}%2F", "/v2/", f"/v1/models/{MODEL}/",
                                  f"/v2/models/{MODEL}/ready/", f"/v2/models/{MODEL}/infer/"])
def test_trailing_and_encoded_slashes_are_404_never_a_redirect(hardened_server, path):
    server, _ = hardened_server
    for method in ("GET", "POST"):
        reply = httpx.request(method, server.url + path, follow_redirects=False)
        assert reply.status_code == 404 and "location" not in reply.headers, (method, path, reply.status_code)
        assert "trailing slash" in reply.json()["error"]
    # The pair's other half: without the slash, the route itself answers (200, 405, or its own 404).
    bare = httpx.get(server.url + path.removesuffix("/").removesuffix("%2F"))
    assert bare.status_code < 500 and "trailing slash" not in bare.text, (path, bare.text)


@pytest.mark.parametrize("k", ["²", "１", "9" * 5000, "0", "-1"], ids=short)
def test_odd_k_is_400(hardened_server, k):
    server, _ = hardened_server
    assert_bad(httpx.post(server.url + f"/?k={k}", files={"data": png(0)}), "k must be")
    assert_bad(post_json(server, INFER, {"inputs": [tensor_input()], "outputs": [
        {"name": "logits", "parameters": {"classification": k}}]}), "classification")
    assert_zmq_bad(zmq_call(server, {"op": "classify", "top_k": k, "images": [png(0)]}), "top_k")


@pytest.mark.parametrize("length", ["²", "١٢", "9" * 5000, "-1"], ids=short)
def test_odd_binary_header_length_is_400(hardened_server, length):
    server, _ = hardened_server
    assert_bad(httpx.post(server.url + INFER, content=b'{"inputs": []}',
                          headers={"inference-header-content-length": header_bytes(length)}),
               "inference-header-content-length")


def header_bytes(text: str) -> bytes:
    """Headers are bytes on the wire: Latin-1 where it can hold the text (so "²" arrives as "²"), else UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


@pytest.mark.parametrize("value", ["²", "nan", "inf", float("nan"), float("inf"), 0, -5, 2 ** 64 - 1])
def test_odd_zmq_timeouts_are_400(hardened_server, value):
    server, _ = hardened_server
    reply = zmq_call(server, {"op": "classify", "timeout_ms": value, "images": [png(0)]})
    if value == 2 ** 64 - 1:  # a very long deadline is still a deadline: the server's default wins
        assert reply["ok"] is True, reply
    else:
        assert_zmq_bad(reply, "timeout_ms")


@pytest.mark.parametrize("dtype", ["f" * 5000, "²", "object", "U10", "V8", "datetime64", ">f4", 7], ids=short)
def test_odd_zmq_dtypes_are_400(hardened_server, dtype):
    server, _ = hardened_server
    reply = zmq_call(server, {"op": "infer", "inputs": {"image": {"dtype": dtype, "shape": [1, 3, 8, 8],
                                                                  "data": bytes(768)}}})
    assert_zmq_bad(reply, "dtype")


# 5. Shapes numpy cannot represent

def test_shapes_of_more_than_64_dimensions_are_400(hardened_server):
    server, _ = hardened_server
    shape = [1] * 70
    assert_bad(post_json(server, INFER, {"inputs": [tensor_input(shape=shape, data=[0.5])]}), "shape")
    header = json.dumps({"inputs": [tensor_input(shape=shape, data=None, parameters={"binary_data_size": 4})]}).encode()
    assert_bad(httpx.post(server.url + INFER, content=header + bytes(4),
                          headers={"inference-header-content-length": str(len(header))}), "shape")
    reply = zmq_call(server, {"op": "infer", "inputs": {"image": {"dtype": "float32", "shape": shape, "data": bytes(4)}}})
    assert_zmq_bad(reply, "shape")


# 6. Images per request: split into batches of max_batch_size, refused above the limit

def v2_images(images: list[bytes]) -> tuple[bytes, dict]:
    raw = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = json.dumps({"inputs": [{"name": "image_bytes", "shape": [len(images)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"inference-header-content-length": str(len(header))}


def stats(server) -> dict:
    return httpx.get(server.url + f"/v2/models/{MODEL}/stats").json()["model_stats"][0]


def test_a_request_runs_as_batches_of_at_most_max_batch_size(hardened_server):
    server, _ = hardened_server
    images = [png(i) for i in range(10)]
    one_by_one = [httpx.post(server.url + INFER, content=v2_images([i])[0], headers=v2_images([i])[1]).json()
                  for i in images]
    before, sizes_before = stats(server), batch_sizes(server)
    body, headers = v2_images(images)
    reply = httpx.post(server.url + INFER, content=body, headers=headers)
    after, sizes_after = stats(server), batch_sizes(server)
    assert reply.status_code == 200, reply.text
    rows = np.array(reply.json()["outputs"][0]["data"]).reshape(10, 4)
    assert np.allclose(rows, [np.array(r["outputs"][0]["data"]) for r in one_by_one], atol=1e-5)  # order kept
    assert after["inference_count"] - before["inference_count"] == 10
    batches = after["execution_count"] - before["execution_count"]
    assert batches >= 3  # never one batch of 10 (4 + 4 + 2 at the least)
    # Every one of them at most 4 rows: the histogram's "le 4" bucket grew by all of them.
    assert [a - b for a, b in zip(sizes_after, sizes_before)] == [batches, batches]


def batch_sizes(server) -> tuple[float, float]:
    """The model's batches so far: those of at most 4 rows, and all of them (/metrics)."""
    return (metric(server.url, "modelport_batch_size_bucket", model=MODEL, le="4.0"),
            metric(server.url, "modelport_batch_size_count", model=MODEL))


def test_more_images_than_the_limit_are_413_on_every_protocol(hardened_server):
    server, _ = hardened_server
    before = stats(server)["inference_count"]
    for count, status in ((64, 200), (65, 413)):  # the limit is 64: just under works, just over is refused
        body, headers = v2_images([png(0)] * count)
        reply = httpx.post(server.url + INFER, content=body, headers=headers)
        assert reply.status_code == status, reply.text
    assert reply.json()["kind"] == "too_large" and "65 images" in reply.json()["error"]
    reply = post_json(server, f"/v1/models/{MODEL}:predict", {"instances": [{"b64": "aGk="}] * 65})
    assert reply.status_code == 413, reply.text
    tensor = np.zeros((65, 3, 8, 8), np.float32)
    header = json.dumps({"inputs": [tensor_input(shape=[65, 3, 8, 8], data=None,
                                                 parameters={"binary_data_size": tensor.nbytes})]}).encode()
    reply = httpx.post(server.url + INFER, content=header + tensor.tobytes(),
                       headers={"inference-header-content-length": str(len(header))})
    assert reply.status_code == 413, reply.text
    reply = zmq_call(server, {"op": "classify", "images": [png(0)] * 65})
    assert reply["error"]["kind"] == "too_large", reply
    assert stats(server)["inference_count"] - before == 64  # only the request under the limit ran


def test_a_body_of_many_empty_images_is_refused_before_it_is_split(hardened_server):
    server, _ = hardened_server
    raw = b"\x00\x00\x00\x00" * 1_000_000  # a million empty BYTES elements in 4 MB
    header = json.dumps({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    start = time.monotonic()
    reply = httpx.post(server.url + INFER, content=header + raw,
                       headers={"inference-header-content-length": str(len(header))})
    assert reply.status_code == 400 and time.monotonic() - start < 2, reply.text


# 8. Smaller: unknown methods, media type case, a client leaving mid-upload

def test_unknown_method_gets_our_json_error(hardened_server):
    server, _ = hardened_server
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"BREW /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = s.recv(4096)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["kind"] == "bad_input"
    reply = httpx.request("PATCH", server.url + "/v2")  # a method the parser knows, no route takes
    assert reply.status_code == 405 and "error" in reply.json()


@pytest.mark.parametrize("media", ["Multipart/Form-Data", "MULTIPART/FORM-DATA"])
def test_multipart_media_type_is_case_insensitive(hardened_server, media):
    server, _ = hardened_server
    request = httpx.Request("POST", server.url + f"/?model={MODEL}", files={"data": png(1)})
    body = request.read()
    content_type = request.headers["content-type"].replace("multipart/form-data", media)
    reply = httpx.post(server.url + f"/?model={MODEL}", content=body, headers={"content-type": content_type})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()) == 3


def test_client_leaving_mid_upload_is_one_log_line(hardened_server):
    server, _ = hardened_server
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /?model=tiny HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nabc")
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while "client disconnected before its request body arrived" not in server.log.read_text():
        assert time.monotonic() < deadline, server.log.read_text()[-2000:]
        time.sleep(0.05)
    assert "Traceback" not in server.log.read_text()
