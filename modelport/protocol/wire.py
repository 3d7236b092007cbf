"""The ZeroMQ frame layout, shared by the server (``rpc.py``) and the client.

Transport: the server binds a ROUTER socket, clients connect DEALER sockets. Each request and each
reply is ONE frame holding a msgpack map (the ROUTER adds and strips the peer's identity frame).
Tensors travel as raw bytes, never base64 or JSON.

Request::

    {"id": 17,                        # any int or str; echoed in the reply (many may be in flight)
     "op": "classify" | "infer" | "ping",
     "model": "efficientnet-lite0",   # optional: absent = the server's first model
     "version": "1",                  # optional
     "images": [b"<jpeg>", ...],      # encoded images (classify; or infer on an image model)
     "inputs": {"image": {"dtype": "uint8", "shape": [1, 224, 224, 3], "data": b"..."}},  # infer
     "outputs": ["probabilities"],    # optional, infer: default every output
     "top_k": 5,                      # optional, classify
     "timeout_ms": 1000}              # optional: may only lower the server's deadline

Reply::

    {"id": 17, "ok": true, "model": "efficientnet-lite0", "version": "1",
     "predictions": [[["espresso", 967, 0.95], ...], ...]}               # classify: per image
     "outputs": {"probabilities": {"dtype": "float32", "shape": [...], "data": b"..."}}   # infer

    {"id": 17, "ok": false, "error": {"kind": "bad_input", "status": 400, "message": "...",
                                      "input": "images", "retry_after_s": 1.0}}

Error kinds are ``modelport.errors`` kinds (bad_input, not_found, too_large, overloaded,
unavailable, deadline_exceeded, internal) with the HTTP status each one would have. A frame that
is not a msgpack map gets ``bad_input`` with id null; a frame over the socket's maximum message
size is dropped by ZeroMQ, which also disconnects that peer (its DEALER reconnects by itself).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from modelport import errors, untrusted

PROTOCOL_OPS = ("classify", "infer", "ping")
_KINDS = {cls.kind: cls for cls in (errors.BadInput, errors.NotFound, errors.PayloadTooLarge, errors.Overloaded,
                                    errors.Unavailable, errors.QuotaExceeded, errors.DeadlineExceeded, errors.Unauthorized, errors.Forbidden,
                                    errors.BundleError, errors.MissingExtra, errors.ModelportError)}


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def tensor_to_wire(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str.lstrip("<>=|"), "shape": list(array.shape),  # the bytes are little-endian
            "data": array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()}


def tensor_from_wire(value: Any, name: str) -> np.ndarray:
    """A wire tensor -> array; the declared shape is checked against the bytes before any allocation."""
    if not isinstance(value, dict):
        raise errors.BadInput(f"tensor {name!r} must be a map with dtype, shape and data", input_name=name)
    dtype = untrusted.dtype(value.get("dtype"), f"tensor {name!r}", input_name=name).newbyteorder("<")
    shape = untrusted.shape(value.get("shape"), f"tensor {name!r}: shape", input_name=name)
    data = value.get("data")
    if not isinstance(data, bytes):
        raise errors.BadInput(f"tensor {name!r}: data must be bytes", input_name=name)
    count = math.prod(shape)  # a big int for a huge declared shape: nothing allocated
    if count * dtype.itemsize != len(data):
        raise errors.BadInput(f"tensor {name!r}: shape {shape} of {dtype.name} needs {count * dtype.itemsize} bytes, "
                              f"got {len(data)}", input_name=name)
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def error_to_wire(exc: errors.ModelportError) -> dict:
    error = {"kind": exc.kind, "status": exc.status, "message": exc.message}
    if exc.input_name is not None:
        error["input"] = exc.input_name
    if hasattr(exc, "retry_after_s"):
        error["retry_after_s"] = exc.retry_after_s
    return error


def error_from_wire(error: Any) -> errors.ModelportError:
    if not isinstance(error, dict):
        return errors.ModelportError(f"malformed error reply: {error!r}")
    cls = _KINDS.get(error.get("kind"), errors.ModelportError)
    message = str(error.get("message", "error"))
    if issubclass(cls, (errors.Overloaded, errors.Unavailable, errors.QuotaExceeded)):
        return cls(message, retry_after_s=float(error.get("retry_after_s", 1.0)))
    return cls(message, input_name=error.get("input"))
