"""KServe V2 / Open Inference Protocol (REST), with the binary tensor and classification extensions.

An image model takes either its graph input (e.g. ``image``: UINT8 [-1, 224, 224, 3]) or encoded
images as the BYTES input ``image_bytes`` [-1]: JPEG/PNG bytes, raw in the binary extension, or
base64 strings in JSON.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import struct
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import modelport
from modelport import untrusted
from modelport.lifecycle.states import State
from modelport.errors import BadInput, Forbidden, Unauthorized
from modelport.runtime import NUMPY_TO_V2, V2_TO_NUMPY
from modelport.server.http import begin, deadline, json_response, unless_disconnected
from modelport.engine.service import ModelService

ENCODED_INPUT = "image_bytes"
BINARY_HEADER = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_repository"]


# -- health and metadata ------------------------------------------------------------------------

async def server_metadata(request: Request) -> Response:
    return json_response({"name": "modelport", "version": modelport.__version__, "extensions": EXTENSIONS,
                          "worker": request.app.state.config.worker_id})


async def live(request: Request) -> Response:
    return Response(status_code=200)


async def ready(request: Request) -> Response:
    if request.app.state.ready:
        return Response(status_code=200)
    routing = request.app.state.models
    if routing.ready:  # was ready: it is shutting down
        return json_response({"error": "not ready: the server is shutting down"}, 503)
    # Not yet: which versions are still loading, and which pipelines wait for a step, and why.
    loading = [e for e in routing.index() if e["state"] == State.LOADING]
    return json_response({"error": "not ready: models are still loading", "loading": loading}, 503)


async def model_ready(request: Request) -> Response:
    _service(request)  # 404 for an unknown model or version
    return Response(status_code=200 if request.app.state.ready else 503)


async def model_metadata(request: Request) -> Response:
    service = _service(request)
    model = service.model
    inputs = [_tensor_meta(model.input),
              {"name": ENCODED_INPUT, "datatype": "BYTES", "shape": [-1],
               "parameters": {"content": f"encoded image (JPEG, PNG, ...); an alternative to {model.input.name!r}"}}]
    return json_response({
        "name": service.name,
        "versions": [str(v) for v, s in request.app.state.models.versions(service.name).items() if s.state == State.READY],
        "platform": model.platform,
        "inputs": inputs,
        "outputs": [_tensor_meta(o) for o in model.runtime.outputs],
        "parameters": {"labels": len(model.labels), "max_batch_size": service.serving.max_batch_size,
                       "device": getattr(model.runtime, "device", "cpu"),
                       **({"engine": model.engine, "precision": model.precision,
                           "precision_reason": model.precision_reason} if hasattr(model, "engine") else {}),
                       **({"metadata": _plain(bundle.metadata)} if (bundle := getattr(model, "bundle", None))
                          and bundle.metadata else {})},
    })


def _plain(metadata: dict) -> dict:
    """A bundle's [metadata] as JSON can carry it (TOML dates become strings)."""
    return json.loads(json.dumps(metadata, default=str))


async def model_stats(request: Request) -> Response:
    services = [_service(request)] if "model" in request.path_params else list(request.app.state.models)
    return json_response({"model_stats": [_stats(s) for s in services]})


# -- inference -----------------------------------------------------------------------------------

async def infer(request: Request) -> Response:
    _service(request).batcher.check()  # refuse before reading a body in vain (see upload.predict)
    body = await request.body()
    # The version is picked after the body has arrived: a version switch during a slow upload
    # sends the request to the new version instead of failing it.
    service = _service(request, routed=True)
    timing = begin(request, service)
    header, binary = _split_binary(request, body)
    payload = untrusted.json_body(header)
    if not isinstance(payload, dict):
        raise BadInput("request body must be a JSON object")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInput("'inputs' must be a non-empty list")
    if len(inputs) != 1:
        raise BadInput(f"model {service.name!r} takes one input ({service.model.input.name!r} or "
                       f"{ENCODED_INPUT!r}), got {len(inputs)}")
    parameters = untrusted.mapping(payload.get("parameters"), "parameters")
    binary_default = untrusted.flag(parameters.get("binary_data_output"), "parameters.binary_data_output")
    requested = _requested_outputs(payload, service, binary_default)
    request_id = untrusted.request_id(payload["id"]) if "id" in payload else None

    tensor = inputs[0]
    name, array = _decode_input(tensor, binary, service)
    request_deadline = deadline(request, request.app.state.config, timing)
    if name == ENCODED_INPUT:
        work = service.infer_images(list(array), deadline=request_deadline, timing=timing, input_name=ENCODED_INPUT)
    else:
        work = service.infer_tensor(array, deadline=request_deadline, timing=timing)
    outputs = await unless_disconnected(request, work)

    response: dict[str, Any] = {"model_name": service.name, "model_version": str(service.version)}
    if request_id is not None:
        response["id"] = request_id
    if timing.answered_by:  # a cascade: which step answered each image
        response["parameters"] = {"answered_by": ",".join(timing.answered_by)}
    out_entries, chunks = [], []
    for out_name, k, binary in requested:
        value = outputs[out_name] if k is None else _classification(service, outputs[out_name], k)
        entry, chunk = _encode_output(out_name, value, binary)
        out_entries.append(entry)
        if chunk is not None:
            chunks.append(chunk)
    response["outputs"] = out_entries
    if not chunks:
        return json_response(response)
    header_bytes = json_response(response).body
    return Response(header_bytes + b"".join(chunks), media_type="application/octet-stream",
                    headers={BINARY_HEADER: str(len(header_bytes))})


def _requested_outputs(payload: dict, service: ModelService,
                       binary_default: bool) -> list[tuple[str, int | None, bool]]:
    """(name, classification k or None, binary) for each output asked for."""
    outputs = payload.get("outputs")
    if outputs is None:
        return [(name, None, binary_default) for name in service.output_names]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise BadInput("'outputs' must be a list of objects with a 'name'")
    result = []
    for o in outputs:
        service.resolve_outputs([o["name"]])
        params = untrusted.mapping(o.get("parameters"), f"output {o['name']!r}: parameters")
        k = untrusted.optional_integer(params.get("classification"), f"output {o['name']!r}: classification",
                                       minimum=1)
        binary = untrusted.flag(params.get("binary_data"), f"output {o['name']!r}: binary_data", binary_default)
        result.append((o["name"], k, binary))
    return result


def _split_binary(request: Request, body: bytes) -> tuple[bytes, bytes]:
    raw = request.headers.get(BINARY_HEADER)
    if raw is None:
        return body, b""
    n = untrusted.content_length(raw, BINARY_HEADER, len(body))
    return body[:n], body[n:]


def _decode_input(tensor: Any, binary: bytes, service: ModelService) -> tuple[str, Any]:
    if not isinstance(tensor, dict):
        raise BadInput("each input must be an object")
    name = tensor.get("name")
    datatype = tensor.get("datatype")
    shape = tensor.get("shape")
    graph_input = service.model.input
    if name not in (graph_input.name, ENCODED_INPUT):
        raise BadInput(f"unknown input {untrusted.show(name)}; model {service.name!r} takes {graph_input.name!r} or "
                       f"{ENCODED_INPUT!r}", input_name=name if isinstance(name, str) and len(name) < 128 else None)
    shape = untrusted.shape(shape, f"input {name!r}: shape", input_name=name)
    count = math.prod(shape)  # exact: a huge declared shape is just a big int, nothing allocated
    params = untrusted.mapping(tensor.get("parameters"), f"input {name!r}: parameters", input_name=name)
    binary_size = params.get("binary_data_size")

    if name == ENCODED_INPUT:
        if datatype != "BYTES":
            raise BadInput(f"input {name!r} must be BYTES, got {untrusted.show(datatype)}", input_name=name)
        service.check_rows(count, name)  # before splitting or decoding anything
        if binary_size is not None:
            images = _bytes_elements(_take_binary(binary, binary_size, name), name, count)
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


def _take_binary(binary: bytes, size: Any, name: str) -> bytes:
    # Inputs are laid out in order; with one input per request, it is the whole binary part.
    if untrusted.integer(size, f"input {name!r}: binary_data_size", input_name=name) != len(binary):
        raise BadInput(f"input {name!r}: binary_data_size {size} does not match the {len(binary)} bytes after "
                       f"the JSON header", input_name=name)
    return binary


def _bytes_elements(raw: bytes, name: str, expected: int) -> list[bytes]:
    """BYTES tensor in the binary extension: each element is a 4-byte little-endian length, then the bytes.

    Stops past ``expected`` elements: a body of empty elements must not become millions of objects.
    """
    elements, offset = [], 0
    while offset < len(raw) and len(elements) <= expected:
        if offset + 4 > len(raw):
            raise BadInput(f"input {name!r}: truncated BYTES element length", input_name=name)
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise BadInput(f"input {name!r}: BYTES element of {n} bytes runs past the body", input_name=name)
        elements.append(raw[offset:offset + n])
        offset += n
    return elements


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


def _classification(service: ModelService, values: np.ndarray, k: int) -> np.ndarray:
    rows = service.model.top_k(service.model.probabilities(values), k)
    return np.array([[f"{p.score!r}:{p.index}:{p.label}" for p in row] for row in rows], dtype=object)


def _encode_output(name: str, value: np.ndarray, binary: bool) -> tuple[dict, bytes | None]:
    if value.dtype == object:
        datatype = "BYTES"
    else:
        datatype = NUMPY_TO_V2[value.dtype]
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
    if not binary:
        entry["data"] = value.ravel().tolist()
        return entry, None
    if datatype == "BYTES":
        chunk = b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in value.ravel()))
    else:
        chunk = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    entry["parameters"] = {"binary_data_size": len(chunk)}
    return entry, chunk


def _tensor_meta(spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _service(request: Request, *, routed: bool = False) -> ModelService:
    params = request.path_params
    return request.app.state.models.get(params["model"], params.get("version"), routed=routed)


# -- model repository extension (needs --admin-token) ---------------------------------------------

def _authorise(request: Request) -> None:
    token = request.app.state.config.admin_token
    if token is None:
        raise Forbidden("the model repository API is off; start the server with --admin-token to enable it")
    offered = request.headers.get("authorization", "")
    scheme, _, value = offered.partition(" ")
    # Constant-time comparison: the time taken says nothing about how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        raise Unauthorized("missing or wrong bearer token")


def _reloader(request: Request):
    reloader = request.app.state.reloader
    if reloader is None:
        raise BadInput("this server serves fixed bundles, not a repository: nothing to load or unload")
    return reloader


async def repository_index(request: Request) -> Response:
    _authorise(request)
    body = await request.body()
    options = untrusted.mapping(untrusted.json_body(body), "request body") if body.strip() else {}
    ready_only = untrusted.flag(options.get("ready"), "ready")
    entries = request.app.state.models.index()
    if ready_only:
        entries = [e for e in entries if e["state"] == State.READY]
    return json_response(entries)


async def repository_load(request: Request) -> Response:
    _authorise(request)
    await _reloader(request).load_model(request.path_params["model"])
    return json_response({})


async def repository_unload(request: Request) -> Response:
    _authorise(request)
    await _reloader(request).unload_model(request.path_params["model"])
    return json_response({})


def _stats(service: ModelService) -> dict:
    s = service.stats
    return {
        "name": service.name, "version": str(service.version),
        "last_inference": s.last_inference_ms, "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": {"count": s.success_count, "ns": s.success_ns},
            "fail": {"count": s.fail_count, "ns": s.fail_ns},
            "queue": {"count": s.success_count, "ns": s.queue_ns},
            "compute_infer": {"count": s.execution_count, "ns": s.compute_infer_ns},
        },
    }


def routes() -> list[Route]:
    model = "/v2/models/{model}"
    version = model + "/versions/{version}"
    return [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/stats", model_stats),  # before {model}: "stats" is not a model name here
        Route(model, model_metadata), Route(version, model_metadata),
        Route(model + "/ready", model_ready), Route(version + "/ready", model_ready),
        Route(model + "/stats", model_stats), Route(version + "/stats", model_stats),
        Route(model + "/infer", infer, methods=["POST"]), Route(version + "/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        # {model:path}: a name with '/' or '..' reaches the name check (400) instead of missing the route.
        Route("/v2/repository/models/{model:path}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model:path}/unload", repository_unload, methods=["POST"]),
    ]
