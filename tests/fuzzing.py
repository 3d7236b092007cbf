"""Malformed requests for every endpoint family and the ZeroMQ socket, as hypothesis strategies.

Shared by ``test_fuzz.py`` (a few thousand cases inside the suite) and
``benchmarks/fuzz_memory.py`` (a long run with an RSS check). Requests are well-formed enough to
get past the first checks and typed wrongly where it hurts: values of the wrong JSON type,
NaN/Infinity, non-ASCII digits, numbers of thousands of digits, shapes numpy cannot represent,
more images than a batch holds. The server they target serves ``tiny`` (the float NCHW test
graph of ``conftest.make_tiny_bundle``) with ``--admin-token`` ``ADMIN_TOKEN``.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import dataclass, field
from urllib.parse import quote

import msgpack
import numpy as np
from hypothesis import strategies as st
from PIL import Image

MODEL = "tiny"
ADMIN_TOKEN = "fuzz-token"
# What the server may answer a malformed request: success, any client error, or load shedding.
ALLOWED = set(range(200, 300)) | set(range(400, 500)) | {503}
DEADLINE_EXCEEDED = 504  # allowed too, for a request that set its own (tiny) deadline


def allowed_http(case: "HttpCase", status: int) -> bool:
    return status in ALLOWED or (status == DEADLINE_EXCEEDED and "x-request-timeout-ms" in case.headers)


def allowed_zmq(frame: bytes, reply: dict) -> bool:
    if reply["ok"]:
        return True
    status = reply["error"]["status"]
    if status == DEADLINE_EXCEEDED:
        request = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        return isinstance(request, dict) and "timeout_ms" in request
    return status in ALLOWED


@dataclass
class HttpCase:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str | bytes] = field(default_factory=dict)


def png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# -- values --------------------------------------------------------------------------------------

odd_digits = st.sampled_from(["²", "١٢", "１２", "³³", "⁰", "৩", "0x10", "-1", "1e3", " 7", "7 ", "", "+3"])
huge_ints = st.integers(min_value=10 ** 19, max_value=10 ** 40) | st.sampled_from([4000, -30]).map(lambda n: 10 ** abs(n) * (1 if n > 0 else -1))
long_digits = st.integers(min_value=20, max_value=4000).map(lambda n: "9" * n)
numbers = (st.integers(-3, 300) | huge_ints
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([float("nan"), float("inf"), -0.0]))
strings = st.text(max_size=12) | odd_digits | long_digits | st.just(3000).map(lambda n: "x" * n)
scalars = st.none() | st.booleans() | numbers | strings
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
versions = st.sampled_from(["1", "2", "latest", "canary", "1/", "/", "/1", "0/"]) | odd_digits | long_digits | st.text(max_size=8)
shapes = (st.lists(st.integers(0, 8), min_size=1, max_size=4)
          | st.lists(st.just(1), min_size=60, max_size=80)  # more dimensions than numpy can hold
          | st.lists(st.integers(0, 2 ** 70), min_size=1, max_size=4)
          | json_values)
tensor_data = (st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=200)
               | st.lists(st.integers(0, 3).map(lambda i: base64.b64encode(png(i)).decode()), max_size=20)
               | json_values)


def _maybe(strategy: st.SearchStrategy, other: st.SearchStrategy = json_values) -> st.SearchStrategy:
    """A good value most of the time, anything else sometimes."""
    return st.one_of(strategy, strategy, other)


def _header(text: str) -> bytes:
    """A header value as bytes (HTTP headers are not text): printable characters only, UTF-8."""
    return "".join(c for c in text if c.isprintable()).strip().encode()


# -- KServe V2 --------------------------------------------------------------------------------------

v2_tensor = st.fixed_dictionaries({}, optional={
    "name": _maybe(st.sampled_from(["image", "image_bytes"])),
    "shape": shapes,
    "datatype": _maybe(st.sampled_from(["FP32", "BYTES", "UINT8", "FP16"])),
    "data": tensor_data,
    "parameters": _maybe(st.fixed_dictionaries({}, optional={"binary_data_size": numbers | strings})),
})
v2_output = st.fixed_dictionaries({"name": _maybe(st.just("logits"))}, optional={
    "parameters": _maybe(st.fixed_dictionaries({}, optional={"classification": numbers | strings,
                                                             "binary_data": json_values}))})
v2_body = st.fixed_dictionaries({}, optional={
    "id": json_values,
    "inputs": _maybe(st.lists(v2_tensor, min_size=1, max_size=2)),
    "outputs": _maybe(st.lists(v2_output, max_size=2)),
    "parameters": _maybe(st.fixed_dictionaries({}, optional={"binary_data_output": json_values})),
})
model_paths = st.builds(lambda v: f"/v2/models/{MODEL}/versions/{quote(v, safe='')}", versions) \
    | st.just(f"/v2/models/{MODEL}")


@st.composite
def v2_infer(draw) -> HttpCase:
    body = json.dumps(draw(v2_body)).encode()  # allow_nan: NaN and Infinity go out as bare words
    headers = {"content-type": "application/json"}
    if draw(st.booleans()):  # the binary tensor extension: a JSON header, then raw bytes
        images = draw(st.lists(st.integers(0, 3), max_size=40))
        raw = b"".join(struct.pack("<I", len(p)) + p for p in map(png, images)) if draw(st.booleans()) \
            else draw(st.binary(max_size=600))
        length = draw(st.sampled_from([str(len(body))]) | odd_digits | long_digits | st.integers(0, 10 ** 6).map(str))
        headers["inference-header-content-length"] = _header(length)
        body += raw
    if draw(st.booleans()):
        headers["x-request-timeout-ms"] = _header(draw(strings | st.sampled_from(["nan", "inf", "-1", "0", "1e999"])))
    return HttpCase("POST", draw(model_paths) + "/infer", body, headers)


# -- TF Serving ----------------------------------------------------------------------------------

tf_instance = (st.integers(0, 3).map(lambda i: {"b64": base64.b64encode(png(i)).decode()})
               | st.fixed_dictionaries({"image_bytes": st.fixed_dictionaries({"b64": _maybe(st.just("aGVsbG8="))})})
               | st.fixed_dictionaries({"image": tensor_data})
               | json_values)


@st.composite
def tf_request(draw) -> HttpCase:
    verb = draw(st.sampled_from([":predict", ":classify"]))
    prefix = draw(st.sampled_from(["", "/versions/", "/labels/"]))
    base = f"/v1/models/{MODEL}" + (prefix + quote(draw(versions), safe="") if prefix else "")
    key = draw(st.sampled_from(["instances", "inputs", "examples", "signature_name"]))
    rows = draw(st.lists(tf_instance, max_size=30) | json_values | st.lists(tf_instance, min_size=1, max_size=1).map(
        lambda one: one * 100))  # more images than the per-request limit
    body = {key: rows}
    if draw(st.booleans()):
        body["top_k"] = draw(numbers | strings)
    return HttpCase("POST", base + verb, json.dumps(body).encode(), {"content-type": "application/json"})


# -- the article's upload API ------------------------------------------------------------------------

@st.composite
def upload(draw) -> HttpCase:
    boundary = "fuzzboundary"
    media = draw(st.sampled_from(["multipart/form-data", "Multipart/Form-Data", "MULTIPART/FORM-DATA",
                                  "application/json", "text/plain"]))
    field_name = draw(st.sampled_from(["data", "file", ""]))
    content = png(draw(st.integers(0, 3))) if draw(st.booleans()) else draw(st.binary(max_size=300))
    parts = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"x.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    if draw(st.booleans()):
        parts = parts[:draw(st.integers(0, len(parts)))]  # truncated
    query = []
    if draw(st.booleans()):
        query.append("k=" + quote(draw(versions), safe=""))
    if draw(st.booleans()):
        query.append(f"model={MODEL}&version=" + quote(draw(versions), safe=""))
    path = "/" + ("?" + "&".join(query) if query else "")
    return HttpCase("POST", path, parts, {"content-type": f"{media}; boundary={boundary}"})


# -- reads, and the management API -------------------------------------------------------------------

@st.composite
def read(draw) -> HttpCase:
    version = quote(draw(versions), safe="")
    path = draw(st.sampled_from([
        f"/v2/models/{MODEL}/versions/{version}", f"/v2/models/{MODEL}/versions/{version}/ready",
        f"/v2/models/{MODEL}/versions/{version}/stats", f"/v1/models/{MODEL}/versions/{version}",
        f"/v1/models/{MODEL}/labels/{version}", f"/v1/models/{MODEL}/versions/{version}/metadata",
        f"/v2/models/{version}", "/v2/models/stats", "/v2", "/metrics",
    ]))
    return HttpCase("GET", path + draw(st.sampled_from(["", "", "", "/", "%2F"])))


@st.composite
def repository(draw) -> HttpCase:
    body = draw(st.sampled_from([b"", b"{}"]) | json_values.map(lambda v: json.dumps(v).encode())
                | st.binary(max_size=40))
    return HttpCase("POST", "/v2/repository/index", body, {"authorization": f"Bearer {ADMIN_TOKEN}"})


http_cases = st.one_of(v2_infer(), v2_infer(), tf_request(), upload(), read(), repository())


# -- ZeroMQ ----------------------------------------------------------------------------------------------

wire_numbers = (st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats(allow_nan=True, allow_infinity=True)
                | st.sampled_from([float("nan"), float("inf"), 0, 2 ** 64 - 1]))  # msgpack holds no more
msgpack_values = st.recursive(
    st.none() | st.booleans() | wire_numbers | strings | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
wire_shapes = (st.lists(st.integers(0, 8), min_size=1, max_size=4) | st.lists(st.just(1), min_size=60, max_size=80)
               | st.lists(st.integers(0, 2 ** 64 - 1), min_size=1, max_size=4) | msgpack_values)
wire_tensor = st.fixed_dictionaries({}, optional={
    "dtype": _maybe(st.sampled_from(["float32", "f4", "uint8", "float64"]), msgpack_values)
    | st.just(3000).map(lambda n: "f" * n) | odd_digits,
    "shape": wire_shapes,
    "data": st.binary(max_size=800) | msgpack_values,
})
zmq_request = st.fixed_dictionaries({"id": msgpack_values}, optional={
    "op": _maybe(st.sampled_from(["infer", "classify", "ping"]), msgpack_values),
    "model": _maybe(st.just(MODEL), msgpack_values),
    "version": versions | msgpack_values,
    "images": _maybe(st.lists(st.integers(0, 3).map(png), max_size=40), msgpack_values)
    | st.just(300).map(lambda n: [png(0)] * n),
    "inputs": _maybe(st.fixed_dictionaries({"image": wire_tensor}), msgpack_values),
    "outputs": _maybe(st.just(["logits"]), msgpack_values),
    "top_k": wire_numbers | strings,
    "timeout_ms": wire_numbers | strings,
})
zmq_frames = zmq_request.map(lambda r: msgpack.packb(r, use_bin_type=True)) | st.binary(max_size=200)
