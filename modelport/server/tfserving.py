"""TensorFlow Serving REST: model status, ``:predict`` (row and columnar) and ``:classify``.

An image classifier takes ``{"instances": [{"b64": "<jpeg>"}]}``; named inputs
(``{"instances": [{"image_bytes": {"b64": ...}}]}``) and raw tensors of the graph's input
(nested lists) work too. ``predictions`` hold the model's class scores.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelport import untrusted
from modelport.errors import BadInput
from modelport.lifecycle.states import State
from modelport.runtime import V2_TO_NUMPY
from modelport.server.http import json_response, start, unless_disconnected
from modelport.engine.servable import Servable


_TF_STATES = {State.LOADING: "LOADING", State.READY: "AVAILABLE", State.UNLOADING: "UNLOADING", State.FAILED: "END",
              State.ROLLED_BACK: "END"}


async def status(request: Request) -> Response:
    """Every version of the model (TF Serving lists them all), or the one named."""
    params = request.path_params
    routing = request.app.state.models
    if "version" in params or "label" in params:
        service = _service(request)
        versions = {service.version: routing.versions(service.name)[service.version]}
    else:
        versions = routing.versions(params["model"])
    return json_response({"model_version_status": [{
        "version": str(v),
        "state": _TF_STATES.get(s.state, s.state),
        "status": {"error_code": "UNKNOWN" if s.state in (State.FAILED, State.ROLLED_BACK) else "OK", "error_message": s.reason},
    } for v, s in sorted(versions.items())]})


async def metadata(request: Request) -> Response:
    service = _service(request)
    model = service.model
    return json_response({
        "model_spec": {"name": service.name, "version": str(service.version)},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": {model.input.name: _tensor_info(model.input),
                       "image_bytes": {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1"}]}}},
            "outputs": {o.name: _tensor_info(o) for o in model.outputs},
            "method_name": "tensorflow/serving/predict",
        }}}},
    })


async def predict(request: Request) -> Response:
    service, payload, timing, request_deadline = await _start(request)
    if "instances" in payload:
        rows, columnar = payload["instances"], False
    elif "inputs" in payload:
        rows, columnar = payload["inputs"], True
    else:
        raise BadInput("body needs 'instances' (row format) or 'inputs' (columnar format)")
    outputs = await _infer(request, service, _parse(rows, service, columnar), request_deadline, timing)
    scores = service.model.probabilities(outputs[service.model.output.name]).tolist()
    return json_response({"outputs": scores} if columnar else {"predictions": scores})


async def classify(request: Request) -> Response:
    service, payload, timing, request_deadline = await _start(request)
    rows = payload.get("examples", payload.get("instances"))
    if rows is None:
        raise BadInput("body needs 'examples' (or 'instances'): a list of {\"b64\": ...} images")
    k = untrusted.optional_integer(payload.get("top_k"), "top_k", minimum=1)
    outputs = await _infer(request, service, _parse(rows, service, columnar=False), request_deadline, timing)
    result = [[[p.label, p.score] for p in row] for row in service.top_k(outputs, k)]
    return json_response({"result": result})


async def _infer(request: Request, service: Servable, parsed, request_deadline: float, timing) -> dict:
    images, tensor = parsed
    if images is not None:
        work = service.infer_images(images, deadline=request_deadline, timing=timing, input_name="b64")
    else:
        work = service.infer_tensor(tensor, deadline=request_deadline, timing=timing)
    return await unless_disconnected(request, work)


async def _start(request: Request):
    started = await start(request, functools.partial(_service, request), Request.body)
    payload = untrusted.json_body(started.body)
    if not isinstance(payload, dict):
        raise BadInput("request body must be a JSON object")
    return started.service, payload, started.timing, started.deadline()


def _parse(rows: Any, service: Servable, columnar: bool) -> tuple[list[bytes] | None, np.ndarray | None]:
    """Instances -> encoded images, or one tensor of the graph's input."""
    graph_input = service.model.input
    if columnar:
        if isinstance(rows, dict):
            rows = rows.get("image_bytes", rows.get(graph_input.name, rows))
        if isinstance(rows, dict) and "b64" in rows:
            rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise BadInput("instances must be a non-empty list")
    service.check_rows(len(rows), "instances")  # before decoding or converting any of them
    first = rows[0]
    if isinstance(first, dict) and "b64" not in first:
        # Named inputs: {"image_bytes": {"b64": ...}} or {"image": [[...]]}, one key per instance.
        if len(first) != 1:
            raise BadInput(f"each instance names one input ({graph_input.name!r} or 'image_bytes')")
        key = next(iter(first))
        if key not in (graph_input.name, "image_bytes"):
            raise BadInput(f"unknown input {untrusted.show(key)}; the model takes {graph_input.name!r} or 'image_bytes'")
        try:
            rows = [row[key] for row in rows]
        except (TypeError, KeyError):
            raise BadInput(f"every instance must name input {key!r}", input_name=key) from None
        first = rows[0]
    if isinstance(first, dict):
        return [_b64(row) for row in rows], None
    try:
        tensor = np.asarray(rows, dtype=V2_TO_NUMPY.get(graph_input.datatype, np.float32))
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadInput(f"instances are neither {{\"b64\": ...}} images nor a {graph_input.datatype} tensor: {exc}",
                       input_name=graph_input.name) from None
    return None, tensor


def _b64(row: Any) -> bytes:
    if not isinstance(row, dict) or not isinstance(row.get("b64"), str):
        raise BadInput("every image instance must be {\"b64\": \"<base64 bytes>\"}", input_name="b64")
    text = row["b64"]
    try:
        # TF Serving's clients send standard or web-safe base64; accept both, nothing looser.
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("not valid base64", input_name="b64") from None


def _tensor_info(spec) -> dict:
    dtype = {"UINT8": "DT_UINT8", "FP32": "DT_FLOAT", "FP16": "DT_HALF", "INT64": "DT_INT64",
             "INT32": "DT_INT32", "FP64": "DT_DOUBLE", "BYTES": "DT_STRING"}.get(spec.datatype, spec.datatype)
    return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d)} for d in spec.shape]}}


def _service(request: Request, *, routed: bool = False) -> Servable:
    params = request.path_params
    return request.app.state.models.get(params["model"], params.get("label", params.get("version")), routed=routed)


def routes() -> list[Route]:
    routes = []
    for suffix in ("", "/versions/{version}", "/labels/{label}"):
        base = "/v1/models/{model}" + suffix
        routes += [
            Route(base, status),
            Route(base + "/metadata", metadata),
            Route(base + ":predict", predict, methods=["POST"]),
            Route(base + ":classify", classify, methods=["POST"]),
        ]
    return routes
