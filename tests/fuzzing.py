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
import functools
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


# -- gRPC (inference.GRPCInferenceService) -------------------------------------------------------------

GRPC_SERVICE = "/inference.GRPCInferenceService/"
# What the server may answer over gRPC: success, a client's error, load shedding or a deadline;
# never INTERNAL or UNKNOWN (gRPC's 5xx).
GRPC_ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
V2_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                "FP64", "BF16", "BYTES"]


def _messages():
    """Triton's generated messages, imported when a gRPC case is drawn (gRPC is an extra)."""
    from tritonclient.grpc import service_pb2

    return service_pb2


_png = functools.lru_cache(maxsize=None)(png)  # drawn thousands of times: encode each once


def _mostly(good: st.SearchStrategy, other: st.SearchStrategy, odds: int = 4) -> st.SearchStrategy:
    """``good`` ``odds`` times in ``odds + 1``: a request wrong in one place at a time reaches deeper."""
    return st.sampled_from([True] * odds + [False]).flatmap(lambda ok: good if ok else other)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


int64s = st.integers(-(2 ** 63), 2 ** 63 - 1)
grpc_shapes = (st.lists(st.integers(0, 8), min_size=1, max_size=4)
               | st.lists(st.just(1), min_size=60, max_size=80)  # more dimensions than numpy can hold
               | st.lists(int64s, max_size=4)  # negative, and products past any memory
               | st.lists(st.sampled_from([0, 2 ** 31, 2 ** 32 + 1, 2 ** 62, 2 ** 63 - 1]), min_size=1, max_size=4))
grpc_names = st.sampled_from(["nope", "", "tiny/1", "../tiny", "TINY", "tiny\x00", "x" * 300]) | st.text(max_size=12)
# The typed contents fields, each with values its protobuf type holds (the field may not be the datatype's).
typed_values = {
    "bool_contents": st.lists(st.booleans(), max_size=200),
    "int_contents": st.lists(st.integers(-(2 ** 31), 2 ** 31 - 1), max_size=200),
    "int64_contents": st.lists(int64s, max_size=200),
    "uint_contents": st.lists(st.integers(0, 2 ** 32 - 1), max_size=200),
    "uint64_contents": st.lists(st.integers(0, 2 ** 64 - 1), max_size=200),
    "fp32_contents": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=200),
    "fp64_contents": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=200),
    "bytes_contents": st.lists(st.integers(0, 3).map(_png) | st.binary(max_size=40), max_size=8),
}
parameter_values = st.one_of(
    st.booleans().map(lambda v: ("bool_param", v)), int64s.map(lambda v: ("int64_param", v)),
    st.integers(0, 2 ** 64 - 1).map(lambda v: ("uint64_param", v)),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: ("double_param", v)),
    (strings | odd_digits).map(lambda v: ("string_param", v)))
parameter_keys = st.sampled_from(["classification", "binary_data", "binary_data_size", "priority", "timeout",
                                  "sequence_id", "answered_by", ""]) | st.text(max_size=8)
grpc_parameters = st.dictionaries(parameter_keys, parameter_values, max_size=3)


def _set_parameters(target, drawn: dict) -> None:
    for key, (field_name, value) in drawn.items():
        setattr(target[key], field_name, value)


def _length_prefixed(draw, elements: list[bytes]) -> bytes:
    """BYTES elements with their 4-byte lengths, the lengths right or broken."""
    how = draw(_mostly(st.just("right"), st.sampled_from(["too long", "huge", "short prefix", "trailing", "empty"]), 2))
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    if how == "too long" and elements:
        raw = struct.pack("<I", len(elements[0]) + draw(st.integers(1, 10 ** 6))) + raw[4:]
    elif how == "huge":
        raw = struct.pack("<I", 2 ** 32 - 1) + raw
    elif how == "short prefix":
        raw += draw(st.binary(min_size=1, max_size=3))
    elif how == "trailing":
        raw += draw(st.binary(max_size=20))
    elif how == "empty":
        raw = struct.pack("<I", 0) * draw(st.integers(1, 5000))  # many empty elements in a few bytes
    return raw


@st.composite
def grpc_tensor(draw, message) -> bytes | None:
    """Fills one input tensor of ``message``; returns its raw contents (None: typed contents, or none)."""
    kind = draw(st.sampled_from(["tensor", "tensor", "images", "images", "wild"]))
    if kind == "tensor":  # the graph's input, FP32 NCHW, right to begin with
        rows = draw(_mostly(st.integers(1, 5), st.sampled_from([0, 70])))  # 70: more rows than a request may hold
        array = np.random.default_rng(draw(st.integers(0, 3))).normal(size=(rows, 3, 8, 8)).astype("<f4")
        message.name = draw(_mostly(st.just("image"), grpc_names))
        message.datatype = draw(_mostly(st.just("FP32"), st.sampled_from(V2_DATATYPES) | st.text(max_size=6)))
        message.shape.extend(draw(_mostly(st.just(list(array.shape)), grpc_shapes)))
        if draw(st.booleans()):
            message.contents.fp32_contents.extend(array.ravel().tolist())
            return None
        raw = array.tobytes()
        return draw(_mostly(st.just(raw), st.sampled_from([raw[:-1], raw + b"\0", b""])))
    if kind == "images":  # encoded images in a BYTES tensor
        elements = draw(_mostly(st.lists(_mostly(st.integers(0, 3).map(_png), st.binary(max_size=30)), min_size=1,
                                         max_size=6), st.sampled_from([[], [_png(0)] * 70])))
        message.name = draw(_mostly(st.just("image_bytes"), grpc_names))
        message.datatype = draw(_mostly(st.just("BYTES"), st.sampled_from(V2_DATATYPES) | st.text(max_size=6)))
        message.shape.extend(draw(_mostly(st.just([len(elements)]), grpc_shapes)))
        if draw(st.booleans()):
            message.contents.bytes_contents.extend(elements)
            return None
        return _length_prefixed(draw, elements)
    message.name = draw(st.sampled_from(["image", "image_bytes"]) | grpc_names)
    message.datatype = draw(st.sampled_from(V2_DATATYPES) | st.text(max_size=6))
    message.shape.extend(draw(grpc_shapes))
    _set_parameters(message.parameters, draw(grpc_parameters))
    if draw(st.booleans()):
        field_name = draw(st.sampled_from(sorted(typed_values)))  # often not the datatype's field
        getattr(message.contents, field_name).extend(draw(typed_values[field_name]))
        return None
    return draw(st.binary(max_size=800))


@st.composite
def grpc_infer_request(draw):
    """A well-formed ``ModelInferRequest``, wrong where it hurts: datatypes, shapes against the data,
    huge declared shapes, broken BYTES lengths, typed contents in the wrong field, many inputs,
    unknown parameters, unknown models and versions."""
    request = _messages().ModelInferRequest(
        model_name=draw(_mostly(st.just(MODEL), grpc_names)),
        model_version=draw(_mostly(st.sampled_from(["", "1"]), versions)),
        id=draw(_mostly(st.text(max_size=8), st.just("i" * 3000))))
    raws = []
    count = draw(_mostly(st.just(1), st.sampled_from([0, 2]) | st.integers(3, 40)))  # many inputs, sometimes
    for n in range(count):
        tensor = request.inputs.add()
        if n < 2:
            raw = draw(grpc_tensor(tensor))
        else:  # many inputs: copies of the first (drawing each costs more than it finds)
            tensor.CopyFrom(request.inputs[0])
            raw = raws[0] if raws else None
        if raw is not None:
            raws.append(raw)
    how = draw(_mostly(st.just("as drawn"), st.sampled_from(["one more", "one less", "both"])))
    if how == "one more":
        raws.append(draw(st.binary(max_size=100)))
    elif how == "one less":
        raws = raws[:-1]
    elif how == "both" and request.inputs:  # typed contents and raw contents for the same tensor
        request.inputs[0].contents.fp32_contents.extend([0.0] * 4)
        raws = raws or [bytes(768)]
    request.raw_input_contents.extend(raws)
    for name in draw(st.lists(_mostly(st.just("logits"), grpc_names), max_size=3)):
        _set_parameters(request.outputs.add(name=name).parameters, draw(grpc_parameters))
    _set_parameters(request.parameters, draw(grpc_parameters))
    return request


@st.composite
def grpc_malformed_body(draw) -> bytes:
    """Bytes that are not a ModelInferRequest, or only nearly one."""
    good = draw(grpc_infer_request()).SerializeToString()
    how = draw(st.sampled_from(["random", "truncated", "flipped", "inserted", "appended", "not UTF-8",
                                "length past the end", "wrong wire type", "endless varint"]))
    at = draw(st.integers(0, len(good)))
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "truncated":
        return good[:at]
    if how == "flipped":
        return good[:at] + bytes([draw(st.integers(0, 255))]) + good[at + 1:]
    if how == "inserted":
        return good[:at] + draw(st.binary(min_size=1, max_size=8)) + good[at:]
    if how == "appended":
        return good + draw(st.binary(min_size=1, max_size=40))
    if how == "not UTF-8":  # model_name (field 1, a proto3 string) with bytes that decode to nothing
        name = draw(st.sampled_from([b"\xff\xfe", b"tiny\xc3", b"\xed\xa0\x80"]))
        return b"\x0a" + _varint(len(name)) + name + good
    if how == "length past the end":  # an input (field 5) declaring 4 GiB
        return good + b"\x2a" + _varint(2 ** 32 - 1) + draw(st.binary(max_size=20))
    if how == "wrong wire type":  # model_name as a fixed32
        return b"\x0d\x00\x00\x00\x00" + good
    return good + b"\x08" + b"\xff" * draw(st.integers(10, 20))  # a varint longer than 64 bits


# (method, body) for the unary RPCs a client without the admin token may call.
grpc_raw_calls = st.tuples(st.sampled_from(["ModelInfer"] * 4 + ["ModelMetadata", "ModelReady", "ModelStatistics",
                                                                  "ServerMetadata"]), grpc_malformed_body())
