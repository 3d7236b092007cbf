"""KServe V2 / Open Inference Protocol (REST), with the binary tensor and classification extensions.

An image model takes either its graph input (e.g. ``image``: UINT8 [-1, 224, 224, 3]) or encoded
images as the BYTES input ``image_bytes`` [-1]: JPEG/PNG bytes, raw in the binary extension, or
base64 strings in JSON.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Awaitable

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import modelport
from modelport import untrusted
from modelport.engine.servable import Servable
from modelport.errors import BadInput
from modelport.lifecycle.states import State
from modelport.protocol import v2
from modelport.server.access import visible
from modelport.server.admin import authorise, version_manager
from modelport.server.http import json_response, start, unless_disconnected

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
    return json_response(metadata(request.app.state.models, _service(request)))


def metadata(routing, service: Servable) -> dict:
    """A model version's V2 metadata (gRPC's ModelMetadataResponse has the same fields but parameters)."""
    model = service.model
    inputs = [_tensor_meta(model.input),
              {"name": v2.ENCODED_INPUT, "datatype": "BYTES", "shape": [-1],
               "parameters": {"content": f"encoded image (JPEG, PNG, ...); an alternative to {model.input.name!r}"}}]
    return {
        "name": service.name,
        "versions": [str(v) for v, s in routing.versions(service.name).items() if s.state == State.READY],
        "platform": model.platform,
        "inputs": inputs,
        "outputs": [_tensor_meta(o) for o in model.outputs],
        "parameters": {"labels": len(model.labels), "max_batch_size": service.serving.max_batch_size,
                       **_plain(model.describe())},
    }


def _plain(metadata: dict) -> dict:
    """As JSON can carry it (a bundle's [metadata]: TOML dates become strings)."""
    return json.loads(json.dumps(metadata, default=str))


async def model_stats(request: Request) -> Response:
    services = [_service(request)] if "model" in request.path_params else \
        [s for s in request.app.state.models if visible(request, s.name)]
    return json_response({"model_stats": [stats(s) for s in services]})


# -- inference -----------------------------------------------------------------------------------

async def infer(request: Request) -> Response:
    started = await start(request, functools.partial(_service, request), Request.body)
    service, timing = started.service, started.timing
    header, binary = v2.split_binary(started.body, request.headers)
    payload = untrusted.json_body(header)
    if not isinstance(payload, dict):
        raise BadInput("request body must be a JSON object")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInput("'inputs' must be a non-empty list")
    if len(inputs) != 1:
        raise BadInput(f"model {service.name!r} takes one input ({service.model.input.name!r} or "
                       f"{v2.ENCODED_INPUT!r}), got {len(inputs)}")
    parameters = untrusted.mapping(payload.get("parameters"), "parameters")
    binary_default = untrusted.flag(parameters.get("binary_data_output"), "parameters.binary_data_output")
    requested = _requested_outputs(payload, service, binary_default)
    request_id = untrusted.request_id(payload["id"]) if "id" in payload else None

    tensor = inputs[0]
    name, array = v2.decode_input(tensor, binary, service.model.input, model=service.name,
                                  check_rows=service.check_rows)
    outputs = await unless_disconnected(request, run(service, name, array, started.deadline(), timing))

    response: dict[str, Any] = {"model_name": service.name, "model_version": str(service.version)}
    if request_id is not None:
        response["id"] = request_id
    if timing.answered_by:  # a cascade: which step answered each image
        response["parameters"] = {"answered_by": ",".join(timing.answered_by)}
    out_entries, chunks = [], []
    for out_name, k, binary in requested:
        value = outputs[out_name] if k is None else classification(service, outputs[out_name], k)
        entry, chunk = v2.encode_output(out_name, value, binary)
        out_entries.append(entry)
        if chunk is not None:
            chunks.append(chunk)
    response["outputs"] = out_entries
    if not chunks:
        return json_response(response)
    header_bytes = json_response(response).body
    return Response(header_bytes + b"".join(chunks), media_type="application/octet-stream",
                    headers={v2.BINARY_HEADER: str(len(header_bytes))})


def _requested_outputs(payload: dict, service: Servable,
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


def run(service: Servable, name: str, value, deadline: float, timing) -> Awaitable[dict[str, np.ndarray]]:
    """A decoded V2 input (REST or gRPC) through the model: encoded images, or its graph input."""
    if name == v2.ENCODED_INPUT:
        return service.infer_images(list(value), deadline=deadline, timing=timing, input_name=v2.ENCODED_INPUT)
    return service.infer_tensor(value, deadline=deadline, timing=timing)


def classification(service: Servable, values: np.ndarray, k: int) -> np.ndarray:
    """The classification extension: the top ``k`` of each row as ``score:index:label`` strings."""
    return v2.format_classification(service.model.top_k(service.model.probabilities(values), k))


def _tensor_meta(spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _service(request: Request, *, routed: bool = False) -> Servable:
    params = request.path_params
    return request.app.state.models.get(params["model"], params.get("version"), routed=routed)


# -- model repository extension (needs --admin-token) ---------------------------------------------

async def repository_index(request: Request) -> Response:
    authorise(request)
    body = await request.body()
    options = untrusted.mapping(untrusted.json_body(body), "request body") if body.strip() else {}
    ready_only = untrusted.flag(options.get("ready"), "ready")
    entries = request.app.state.models.index(resident=True)  # resident: in memory, or on disk (--memory-budget-mb)
    if ready_only:
        entries = [e for e in entries if e["state"] == State.READY]
    return json_response(entries)


async def repository_load(request: Request) -> Response:
    authorise(request)
    await version_manager(request).load_model(request.path_params["model"])
    return json_response({})


async def repository_unload(request: Request) -> Response:
    authorise(request)
    await version_manager(request).unload_model(request.path_params["model"])
    return json_response({})


def stats(service: Servable) -> dict:
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
