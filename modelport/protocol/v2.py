"""KServe V2 (Open Inference Protocol) bodies, for the client and the server alike.

The binary tensor extension: the body is the JSON header, then the raw tensors in order; the
header ``Inference-Header-Content-Length`` gives the JSON's length. Numbers are little-endian and
row-major; each BYTES element is a 4-byte little-endian length, then its bytes. The classification
extension turns an output into BYTES ``"score:index:label"`` strings.

The client side builds requests (``encode_request``) and reads responses (``decode_response``);
the server side splits a body (``split_binary``), decodes an input (``decode_input``) and encodes
an output (``encode_output``). What the server trusts nothing of goes through ``untrusted``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from modelport import untrusted
from modelport.engine.predictions import Prediction
from modelport.errors import BadInput
from modelport.runtime import NUMPY_TO_V2, V2_TO_NUMPY, TensorSpec

# Header names are case-insensitive; this spelling is the one error messages quote.
BINARY_HEADER = "inference-header-content-length"
ENCODED_INPUT = "image_bytes"  # the BYTES input of encoded images (JPEG, PNG, ...) beside the graph's input


# -- BYTES elements and classification strings ---------------------------------------------------

def encode_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def decode_bytes(raw: bytes, name: str, expected: int | None = None, *, what: str = "input") -> list[bytes]:
    """The elements of a BYTES tensor in the binary extension; ``BadInput`` if one runs past the end.

    Stops past ``expected`` elements: a body of empty elements must not become millions of objects.
    ``what`` names the tensor's side in messages ("input" or "output").
    """
    input_name = name if what == "input" else None
    elements, offset = [], 0
    while offset < len(raw) and (expected is None or len(elements) <= expected):
        if offset + 4 > len(raw):
            raise BadInput(f"{what} {name!r}: truncated BYTES element length", input_name=input_name)
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise BadInput(f"{what} {name!r}: BYTES element of {n} bytes runs past the body", input_name=input_name)
        elements.append(raw[offset:offset + n])
        offset += n
    return elements


def format_classification(rows: Sequence[Sequence[Prediction]]) -> np.ndarray:
    """Predictions -> the BYTES tensor ``[batch, k]`` of ``"score:index:label"`` strings."""
    # repr() of a float reads back as the same float.
    return np.array([[f"{p.score!r}:{p.index}:{p.label}" for p in row] for row in rows], dtype=object)


def parse_classification(values: np.ndarray) -> list[list[Prediction]]:
    """``"score:index:label"`` strings -> predictions, per row. A label may hold ':'."""
    rows = []
    for row in values:
        predictions = []
        for entry in row:
            score, index, label = str(entry).split(":", 2)
            predictions.append(Prediction(label, int(index), float(score)))
        rows.append(predictions)
    return rows


# -- client side: requests out, responses in ----------------------------------------------------

def encode_request(inputs: Mapping[str, np.ndarray] | Sequence[bytes], outputs: list[dict]) -> tuple[bytes, dict]:
    """(body, headers) of a request in the binary extension: one raw tensor, or encoded images as
    ``image_bytes``. No ``outputs`` asks for every output, in binary."""
    if isinstance(inputs, Mapping):
        (name, array), = inputs.items()
        array = np.ascontiguousarray(array)
        raw = _little_endian(array)
        entry = {"name": name, "shape": list(array.shape), "datatype": NUMPY_TO_V2[array.dtype]}
    else:
        raw = encode_bytes(inputs)
        entry = {"name": ENCODED_INPUT, "shape": [len(inputs)], "datatype": "BYTES"}
    entry["parameters"] = {"binary_data_size": len(raw)}
    request: dict[str, Any] = {"inputs": [entry]}
    if outputs:
        request["outputs"] = outputs
    else:
        request["parameters"] = {"binary_data_output": True}
    header = json.dumps(request).encode()
    return header + raw, {BINARY_HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def binary_outputs(names: Sequence[str] | None) -> list[dict]:
    """The ``outputs`` of a request for these outputs in binary; none named: every output."""
    return [{"name": n, "parameters": {"binary_data": True}} for n in names or ()]


def classification_output(name: str, top_k: int) -> list[dict]:
    """The ``outputs`` of a request for the top ``top_k`` classes of output ``name``."""
    return [{"name": name, "parameters": {"classification": top_k, "binary_data": True}}]


def decode_response(body: bytes, headers: Mapping[str, str]) -> dict[str, np.ndarray]:
    """A response, binary or JSON -> its outputs by name (BYTES outputs as arrays of str)."""
    header, raw = split_binary(body, headers)
    outputs, offset = {}, 0
    for out in json.loads(header)["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if out["datatype"] == "BYTES":
            if size is not None:
                values = [e.decode() for e in decode_bytes(raw[offset:offset + size], out["name"], what="output")]
            else:
                values = out["data"]
            outputs[out["name"]] = np.array(values, dtype=object).reshape(out["shape"])
        elif size is not None:
            dtype = V2_TO_NUMPY[out["datatype"]].newbyteorder("<")
            outputs[out["name"]] = np.frombuffer(raw[offset:offset + size], dtype=dtype).reshape(out["shape"])
        else:
            outputs[out["name"]] = np.array(out["data"], dtype=V2_TO_NUMPY[out["datatype"]]).reshape(out["shape"])
        offset += size or 0
    return outputs


# -- server side: requests in, outputs out ------------------------------------------------------

def split_binary(body: bytes, headers: Mapping[str, str]) -> tuple[bytes, bytes]:
    """(JSON header, binary part) of a body; all JSON without the binary header."""
    raw = headers.get(BINARY_HEADER)
    if raw is None:
        return body, b""
    n = untrusted.content_length(raw, BINARY_HEADER, len(body))
    return body[:n], body[n:]


def decode_input(tensor: Any, binary: bytes, graph_input: TensorSpec, *, model: str,
                 check_rows: Callable[[int, str], None]) -> tuple[str, np.ndarray | list[bytes]]:
    """One request input -> (its name, the array of ``graph_input``) or (``image_bytes``, encoded images).

    ``binary`` is the body after the JSON header; ``check_rows(count, name)`` refuses too many
    images before any is split or decoded. ``model`` names the model in messages.
    """
    if not isinstance(tensor, dict):
        raise BadInput("each input must be an object")
    name = tensor.get("name")
    datatype = tensor.get("datatype")
    shape = tensor.get("shape")
    if name not in (graph_input.name, ENCODED_INPUT):
        raise BadInput(f"unknown input {untrusted.show(name)}; model {model!r} takes {graph_input.name!r} or "
                       f"{ENCODED_INPUT!r}", input_name=name if isinstance(name, str) and len(name) < 128 else None)
    shape = untrusted.shape(shape, f"input {name!r}: shape", input_name=name)
    count = math.prod(shape)  # exact: a huge declared shape is just a big int, nothing allocated
    params = untrusted.mapping(tensor.get("parameters"), f"input {name!r}: parameters", input_name=name)
    binary_size = params.get("binary_data_size")

    if name == ENCODED_INPUT:
        if datatype != "BYTES":
            raise BadInput(f"input {name!r} must be BYTES, got {untrusted.show(datatype)}", input_name=name)
        check_rows(count, name)  # before splitting or decoding anything
        if binary_size is not None:
            images = decode_bytes(_take_binary(binary, binary_size, name), name, count)
        else:
            images = [_base64(e, name) for e in _flat(tensor.get("data"), name)]
        if count != len(images):
            raise BadInput(f"input {name!r}: shape {shape} says {count} elements, data has {len(images)}", input_name=name)
        return name, images

    dtype = V2_TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise BadInput(f"input {name!r}: unknown datatype {untrusted.show(datatype)}", input_name=name)
    if datatype != graph_input.datatype:
        raise BadInput(f"input {name!r} must be {graph_input.datatype}, got {datatype}", input_name=name)
    if binary_size is not None:
        raw = _take_binary(binary, binary_size, name)
        if count * dtype.itemsize != len(raw):
            raise BadInput(f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
                           f"got {len(raw)}", input_name=name)
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    else:
        data = tensor.get("data")
        if data is None:
            raise BadInput(f"input {name!r}: no 'data'", input_name=name)
        try:
            array = np.asarray(data, dtype=dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise BadInput(f"input {name!r}: data is not {datatype}: {exc}", input_name=name) from None
        # Compared before any reshape: a huge declared shape never allocates anything.
        if array.size != count:
            raise BadInput(f"input {name!r}: shape {shape} says {count} elements, data has {array.size}",
                           input_name=name)
    return name, array.reshape(shape)


def encode_output(name: str, value: np.ndarray, binary: bool) -> tuple[dict, bytes | None]:
    """(the output's entry in the JSON header, its bytes after the header or None when in JSON).
    An object array is BYTES of str (classification strings)."""
    datatype = "BYTES" if value.dtype == object else NUMPY_TO_V2[value.dtype]
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
    if not binary:
        entry["data"] = value.ravel().tolist()
        return entry, None
    if datatype == "BYTES":
        chunk = encode_bytes(s.encode() for s in value.ravel())
    else:
        chunk = _little_endian(np.ascontiguousarray(value))
    entry["parameters"] = {"binary_data_size": len(chunk)}
    return entry, chunk


def _little_endian(array: np.ndarray) -> bytes:
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _take_binary(binary: bytes, size: Any, name: str) -> bytes:
    # Inputs are laid out in order; with one input per request, it is the whole binary part.
    if untrusted.integer(size, f"input {name!r}: binary_data_size", input_name=name) != len(binary):
        raise BadInput(f"input {name!r}: binary_data_size {size} does not match the {len(binary)} bytes after "
                       f"the JSON header", input_name=name)
    return binary


def _flat(data: Any, name: str) -> list:
    if not isinstance(data, list):
        raise BadInput(f"input {name!r}: 'data' must be a list", input_name=name)
    flat = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            flat.append(element)
        else:
            stack.pop()
    return flat


def _base64(element: Any, name: str) -> bytes:
    if isinstance(element, dict) and isinstance(element.get("b64"), str):
        element = element["b64"]
    if not isinstance(element, str):
        raise BadInput(f"input {name!r}: in JSON, each image is a base64 string", input_name=name)
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"input {name!r}: not valid base64 (send raw bytes with the binary tensor extension)",
                       input_name=name) from None
