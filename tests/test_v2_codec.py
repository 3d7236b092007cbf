"""The KServe V2 codec (``modelport/protocol/v2.py``) and HTTP error mapping, in-process: what the
client builds, the server reads back; what the server writes, the client reads back."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np
import pytest

from modelport import errors
from modelport.engine.predictions import Prediction
from modelport.protocol import v2
from modelport.protocol.errors import error_from_http
from modelport.runtime import TensorSpec

IMAGE = TensorSpec("image", "UINT8", (-1, 4, 4, 3))


def no_limit(rows: int, name: str) -> None:
    pass


def server_decode(body: bytes, headers: dict, graph_input: TensorSpec = IMAGE, check_rows=no_limit):
    """What ``kserve.infer`` does with a body: split it, parse the header, decode the one input."""
    header, binary = v2.split_binary(body, headers)
    (tensor,) = json.loads(header)["inputs"]
    return v2.decode_input(tensor, binary, graph_input, model="tiny", check_rows=check_rows)


def server_encode(outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, dict]:
    """What ``kserve.infer`` sends back: the JSON header, then the binary outputs in order."""
    entries, chunks = [], []
    for name, value, binary in outputs:
        entry, chunk = v2.encode_output(name, value, binary)
        entries.append(entry)
        if chunk is not None:
            chunks.append(chunk)
    header = json.dumps({"model_name": "tiny", "model_version": "1", "outputs": entries}).encode()
    return header + b"".join(chunks), {v2.BINARY_HEADER: str(len(header))} if chunks else {}


def binary_body(entry: dict, raw: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [entry]}).encode()
    return header + raw, {v2.BINARY_HEADER: str(len(header))}


# -- requests: client -> server ------------------------------------------------------------------

@pytest.mark.parametrize("datatype, dtype", [("UINT8", np.uint8), ("FP32", np.float32), ("INT64", np.int64)])
def test_a_client_tensor_decodes_to_the_same_array(datatype, dtype):
    array = (np.arange(2 * 4 * 4 * 3) - 7).reshape(2, 4, 4, 3).astype(dtype)
    body, headers = v2.encode_request({"image": array}, v2.binary_outputs(["logits"]))
    assert headers["Content-Type"] == "application/octet-stream"
    name, decoded = server_decode(body, headers, TensorSpec("image", datatype, (-1, 4, 4, 3)))
    assert name == "image" and decoded.dtype == dtype and decoded.shape == array.shape
    assert np.array_equal(decoded, array)


def test_a_client_request_asks_for_what_it_names():
    body, headers = v2.encode_request({"image": np.zeros((1, 4, 4, 3), np.uint8)}, v2.binary_outputs(None))
    header = json.loads(v2.split_binary(body, headers)[0])
    assert "outputs" not in header and header["parameters"] == {"binary_data_output": True}
    body, headers = v2.encode_request([b"x"], v2.classification_output("logits", 3))
    header = json.loads(v2.split_binary(body, headers)[0])
    assert header["outputs"] == [{"name": "logits", "parameters": {"classification": 3, "binary_data": True}}]


def test_client_images_decode_to_the_same_bytes():
    images = [b"\xff\xd8jpeg", b"", b"png:" * 100]
    body, headers = v2.encode_request(images, [])
    name, decoded = server_decode(body, headers)
    assert name == v2.ENCODED_INPUT and decoded == images


def test_json_tensor_and_base64_images_decode():
    array = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 4, 4, 3], "data": array.tolist()}
    name, decoded = v2.decode_input(tensor, b"", IMAGE, model="tiny", check_rows=no_limit)
    assert name == "image" and np.array_equal(decoded, array)

    images = [b"one", b"two"]
    data = [base64.b64encode(images[0]).decode(), {"b64": base64.b64encode(images[1]).decode()}]
    tensor = {"name": "image_bytes", "datatype": "BYTES", "shape": [2], "data": data}
    assert v2.decode_input(tensor, b"", IMAGE, model="tiny", check_rows=no_limit) == ("image_bytes", images)


def test_too_many_images_are_refused_before_any_is_split():
    def at_most_2(rows: int, name: str) -> None:
        if rows > 2:
            raise errors.PayloadTooLarge(f"{rows} images", input_name=name)

    entry = {"name": "image_bytes", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": 3}}
    with pytest.raises(errors.PayloadTooLarge):  # the 3 bytes after the header are not even valid elements
        server_decode(*binary_body(entry, b"\x01\x02\x03"), check_rows=at_most_2)
    entry = dict(entry, shape=[2], parameters={"binary_data_size": 10})
    assert server_decode(*binary_body(entry, v2.encode_bytes([b"a", b"b"])), check_rows=at_most_2)[1] == [b"a", b"b"]


# -- responses: server -> client -----------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_server_outputs_decode_to_the_same_arrays(binary):
    outputs = {"probabilities": np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4),
               "ids": np.array([[1, -2], [2 ** 40, 0]], dtype=np.int64),
               "mask": np.array([[0, 255]], dtype=np.uint8),
               "labels": np.array([["a", "b:c"], ["", "é"]], dtype=object)}
    body, headers = server_encode([(name, value, binary) for name, value in outputs.items()])
    assert (v2.BINARY_HEADER in headers) == binary
    decoded = v2.decode_response(body, headers)
    assert decoded.keys() == outputs.keys()
    for name, value in outputs.items():
        assert decoded[name].shape == value.shape and decoded[name].dtype == value.dtype
        assert np.array_equal(decoded[name], value)


def test_binary_and_json_outputs_mix_in_one_response():
    probabilities = np.array([[0.25, 0.75]], dtype=np.float32)
    body, headers = server_encode([("json", probabilities, False), ("binary", probabilities * 2, True)])
    decoded = v2.decode_response(body, httpx.Headers(headers))  # as the client gets them: any case
    assert np.array_equal(decoded["json"], probabilities) and np.array_equal(decoded["binary"], probabilities * 2)


def test_classification_strings_round_trip():
    rows = [[Prediction("espresso", 967, 0.9512345678901234), Prediction("a:b: c", 1, 1e-12)],
            [Prediction("", 0, 0.0), Prediction("ratio 1:2", 2, 1 / 3)]]
    values = v2.format_classification(rows)
    assert values.shape == (2, 2) and values[0, 0] == "0.9512345678901234:967:espresso"
    assert v2.parse_classification(values) == rows
    body, headers = server_encode([("probabilities", values, True)])
    assert v2.parse_classification(v2.decode_response(body, headers)["probabilities"]) == rows


# -- malformed bodies -----------------------------------------------------------------------------

def images_entry(count: int, raw: bytes) -> tuple[bytes, dict]:
    return binary_body({"name": "image_bytes", "datatype": "BYTES", "shape": [count],
                        "parameters": {"binary_data_size": len(raw)}}, raw)


@pytest.mark.parametrize("raw, message", [
    (b"\x05\x00\x00", "truncated BYTES element length"),
    (struct.pack("<I", 4) + b"abc", "BYTES element of 4 bytes runs past the body"),
    (struct.pack("<I", 2 ** 32 - 1) + b"abc", "runs past the body"),
    (v2.encode_bytes([b"a"]) + b"\x01\x00", "truncated BYTES element length"),
], ids=["short-length", "one-byte-short", "huge-length", "short-second-length"])
def test_truncated_bytes_elements_are_bad_input(raw, message):
    with pytest.raises(errors.BadInput, match=message) as caught:
        server_decode(*images_entry(2, raw))
    assert caught.value.input_name == "image_bytes"


def test_more_or_fewer_elements_than_the_shape_are_bad_input():
    with pytest.raises(errors.BadInput, match=r"says 2 elements, data has 3"):
        server_decode(*images_entry(2, v2.encode_bytes([b"a", b"b", b"c"])))
    with pytest.raises(errors.BadInput, match=r"says 2 elements, data has 1"):
        server_decode(*images_entry(2, v2.encode_bytes([b"a"])))


def test_a_body_of_empty_elements_is_not_split_past_the_shape():
    elements = v2.decode_bytes(v2.encode_bytes([b""] * 100_000), "image_bytes", expected=2)
    assert len(elements) == 3  # one past: enough to say "too many", no more


@pytest.mark.parametrize("declared, actual", [(9, 10), (11, 10), (0, 10)])
def test_binary_data_size_that_does_not_match_is_bad_input(declared, actual):
    entry = {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": declared}}
    with pytest.raises(errors.BadInput, match=f"binary_data_size {declared} does not match the {actual} bytes"):
        server_decode(*binary_body(entry, v2.encode_bytes([b"x" * (actual - 4)])))
    entry = {"name": "image", "datatype": "UINT8", "shape": [1, 4, 4, 3], "parameters": {"binary_data_size": declared}}
    with pytest.raises(errors.BadInput, match="does not match"):
        server_decode(*binary_body(entry, b"\x00" * actual))


def test_a_tensor_of_the_wrong_byte_size_is_bad_input():
    entry = {"name": "image", "datatype": "UINT8", "shape": [1, 4, 4, 3], "parameters": {"binary_data_size": 47}}
    with pytest.raises(errors.BadInput, match="needs 48 bytes, got 47"):
        server_decode(*binary_body(entry, b"\x00" * 47))


@pytest.mark.parametrize("length", ["x", "-1", "²", "99999"])
def test_a_bad_header_length_is_bad_input(length):
    with pytest.raises(errors.BadInput, match=v2.BINARY_HEADER):
        v2.split_binary(b'{"inputs": []}', {v2.BINARY_HEADER: length})


def test_unknown_input_and_wrong_datatype_are_bad_input():
    with pytest.raises(errors.BadInput, match="model 'tiny' takes 'image' or 'image_bytes'"):
        v2.decode_input({"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [0]}, b"", IMAGE,
                        model="tiny", check_rows=no_limit)
    with pytest.raises(errors.BadInput, match="must be UINT8, got FP32"):
        v2.decode_input({"name": "image", "datatype": "FP32", "shape": [1], "data": [0]}, b"", IMAGE,
                        model="tiny", check_rows=no_limit)


# -- HTTP errors -> modelport errors -------------------------------------------------------------

@pytest.mark.parametrize("status, body, cls", [
    (400, b'{"error": "bad", "kind": "bad_input"}', errors.BadInput),
    (503, b'{"error": "full", "kind": "overloaded"}', errors.Overloaded),  # the kind wins over the status
    (404, b'{"error": "no such model"}', errors.NotFound),  # another server: no kind, the status says
    (413, b"", errors.PayloadTooLarge),
    (429, b"slow down", errors.QuotaExceeded),  # another server's 429: its quota, not retried elsewhere
    (503, b"[1, 2]", errors.Unavailable),
    (504, b"{}", errors.DeadlineExceeded),
    (500, b"oops", errors.ModelportError),
    (418, b"teapot", errors.ModelportError),
])
def test_http_errors_map_to_modelport_errors(status, body, cls):
    error = error_from_http(status, body, {})
    assert type(error) is cls


def test_http_error_messages_inputs_and_retry_after():
    error = error_from_http(400, b'{"error": "bad image", "kind": "bad_input", "input": "image_bytes"}', {})
    assert error.message == "bad image" and error.input_name == "image_bytes"
    assert error_from_http(500, b"", {}).message == "HTTP 500"
    assert error_from_http(502, b"bad gateway", {}).message == "bad gateway"
    assert error_from_http(503, b"", httpx.Headers({"Retry-After": "7"})).retry_after_s == 7.0
    assert error_from_http(429, b"", {}).retry_after_s == 1.0
