"""What the blocking and asyncio clients share: URLs, request building and reply parsing.

A ZeroMQ request is a msgpack map (``modelport/protocol/wire.py``); an HTTP request is KServe V2
with the binary tensor extension (``modelport/protocol/v2.py``). Errors of either come back as the
same ``modelport.errors`` classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from modelport.engine.predictions import Prediction
from modelport.errors import ModelportError, ServerUnreachable
from modelport.protocol import wire

DEFAULT_MODEL = "efficientnet-lite0"
ImageLike = str | os.PathLike | bytes


class ClientTimeout(ModelportError):
    kind = "timeout"


def http_request(http, address: str, timeout_s: float, method: str, path: str, **kwargs):
    """An ``httpx.Client`` request whose transport failures are modelport errors, not httpx's."""
    import httpx

    try:
        return http.request(method, path, **kwargs)
    except httpx.TimeoutException:
        raise ClientTimeout(f"no reply from {address} in {timeout_s} s") from None
    except httpx.TransportError as exc:
        raise ServerUnreachable(f"cannot reach {address}: {exc}") from None


def image_bytes(image: ImageLike) -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else Path(image).read_bytes()


def parse_url(url: str) -> tuple[str, str]:
    """(kind, address) of a server URL: ("zmq", "tcp://..."), ("http", url), ("grpc", "host:port") or
    ("discovery", url)."""
    parts = urlsplit(url)
    if parts.scheme == "zmq":
        return "zmq", f"tcp://{parts.netloc}"
    if parts.scheme in ("http", "https"):
        return "http", url.rstrip("/")
    if parts.scheme == "grpc":
        return "grpc", parts.netloc
    if parts.scheme == "etcd":
        return "discovery", url
    raise ValueError(f"unsupported URL {url!r}: use zmq://host:port, http://host:port, grpc://host:port or "
                     f"etcd://host:port/cluster")


# -- ZeroMQ --------------------------------------------------------------------------------------

def credentials(api_key: str | None, priority: str | None) -> dict[str, str]:
    """What names the caller's tenant (``serve --keys``; ``$MODELPORT_API_KEY`` when no key is given)
    and lowers its requests' class, as HTTP headers."""
    headers = {}
    key = api_key if api_key is not None else os.environ.get("MODELPORT_API_KEY")
    if key:
        headers["authorization"] = f"Bearer {key}"
    if priority:
        headers["x-modelport-priority"] = priority
    return headers


def grpc_metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The same as gRPC metadata (the priority key is ``modelport-priority`` there)."""
    return tuple((("modelport-priority" if k == "x-modelport-priority" else k), v) for k, v in headers.items())


def zmq_fields(headers: dict[str, str]) -> dict[str, str]:
    """The same as ZeroMQ request fields (``key``, ``priority``)."""
    fields = {}
    if "authorization" in headers:
        fields["key"] = headers["authorization"].removeprefix("Bearer ")
    if "x-modelport-priority" in headers:
        fields["priority"] = headers["x-modelport-priority"]
    return fields


def zmq_request(op: str, model: str | None, version: str | int | None, **fields: Any) -> dict:
    request = {"op": op, **{k: v for k, v in fields.items() if v is not None}}
    if model is not None:
        request["model"] = model
    if version is not None:
        request["version"] = str(version)
    return request


def zmq_inputs(inputs: Mapping[str, np.ndarray] | Sequence[ImageLike]) -> dict:
    if isinstance(inputs, Mapping):
        return {"inputs": {k: wire.tensor_to_wire(np.asarray(v)) for k, v in inputs.items()}}
    return {"images": [image_bytes(i) for i in inputs]}


def zmq_result(reply: Any) -> dict:
    """The reply if it is a success; else the error it carries, raised."""
    if not isinstance(reply, dict):
        raise ModelportError(f"malformed reply: {reply!r}")
    if not reply.get("ok"):
        raise wire.error_from_wire(reply.get("error"))
    return reply


def zmq_predictions(reply: dict) -> list[list[Prediction]]:
    return [[Prediction(label, int(index), float(score)) for label, index, score in row] for row in reply["predictions"]]


def zmq_outputs(reply: dict) -> dict[str, np.ndarray]:
    return {name: wire.tensor_from_wire(value, name) for name, value in reply["outputs"].items()}


# -- HTTP (KServe V2) ----------------------------------------------------------------------------

def http_inputs(inputs: Mapping[str, np.ndarray] | Sequence[ImageLike]) -> Mapping[str, np.ndarray] | list[bytes]:
    return inputs if isinstance(inputs, Mapping) else [image_bytes(i) for i in inputs]


def metadata_path(model: str, version: str | int | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "")


def infer_path(model: str, version: str | int | None) -> str:
    return metadata_path(model, version) + "/infer"


def client_span(operation: str, model: str, kind: str, address: str):
    """A client span per call (``modelport.client classify``): over etcd://, one for the call and
    one per attempt on a worker (the worker's own client)."""
    from modelport import telemetry

    return telemetry.span(f"modelport.client {operation}", kind="client", attributes={
        "modelport.model": model, "modelport.transport": kind,
        **({} if kind == "discovery" else {"server.address": address})})
