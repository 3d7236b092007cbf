"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, Triton's and KServe's),
in the messages of the protos that ``tritonclient[grpc]`` ships: a request's tensor -> the same
input the REST codec (``v2.py``) decodes, and answers -> a response.

A tensor comes in ``raw_input_contents`` (bytes; BYTES elements with the 4-byte length prefix, as
in REST's binary extension) or in its typed ``contents``; both become the binary form, so one
decoder checks both. Outputs go back in ``raw_output_contents``, as Triton answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelport.errors import BadInput, MissingExtra, ModelportError
from modelport.protocol import v2, wire
from modelport.runtime import NUMPY_TO_V2, V2_TO_NUMPY

# A gRPC status per error kind: the same kinds as HTTP's statuses and ZeroMQ's error names.
STATUS_BY_KIND = {"bad_input": "INVALID_ARGUMENT", "not_found": "NOT_FOUND", "too_large": "RESOURCE_EXHAUSTED",
                  "overloaded": "UNAVAILABLE", "quota_exceeded": "RESOURCE_EXHAUSTED", "unavailable": "UNAVAILABLE", "deadline_exceeded": "DEADLINE_EXCEEDED",
                  "unauthorized": "UNAUTHENTICATED", "forbidden": "PERMISSION_DENIED", "bad_bundle": "INTERNAL",
                  "missing_extra": "FAILED_PRECONDITION", "internal": "INTERNAL"}
_TYPED = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
          "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
          "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def messages():
    """The generated message and service modules (imported on first use: gRPC is optional)."""
    try:
        from tritonclient.grpc import service_pb2, service_pb2_grpc
    except ImportError:
        raise MissingExtra("gRPC needs the grpc extra: pip install 'modelport[grpc]'") from None
    return service_pb2, service_pb2_grpc


def parameters(entries) -> dict[str, Any]:
    """A map of ``InferParameter`` -> plain values."""
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in entries.items()
            if value.WhichOneof("parameter_choice")}


def request_input(request) -> tuple[dict, bytes]:
    """The request's one input as REST's codec takes it: (tensor entry, its bytes)."""
    if len(request.inputs) != 1:
        raise BadInput(f"model {request.model_name!r} takes one input, got {len(request.inputs)}")
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise BadInput(f"{len(request.raw_input_contents)} raw_input_contents for one input")
        raw = request.raw_input_contents[0]
    else:
        raw = _typed_bytes(tensor)
    entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
             "parameters": {"binary_data_size": len(raw)}}
    return entry, raw


def requested_outputs(request, names: list[str]) -> list[tuple[str, int | None]]:
    """(output name, classification k or None) for each output asked for; all of them when none is."""
    if not request.outputs:
        return [(name, None) for name in names]
    asked = []
    for output in request.outputs:
        k = parameters(output.parameters).get("classification")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise BadInput(f"output {output.name!r}: classification must be a whole number of at least 1, got {k!r}")
        asked.append((output.name, k))
    return asked


def response(model: str, version: int | str, outputs: list[tuple[str, np.ndarray]], *, request_id: str = "",
             answered_by: str = ""):
    service_pb2, _ = messages()
    message = service_pb2.ModelInferResponse(model_name=model, model_version=str(version), id=request_id)
    if answered_by:
        message.parameters["answered_by"].string_param = answered_by
    for name, value in outputs:
        entry, raw = v2.encode_output(name, value, binary=True)
        message.outputs.add(name=name, datatype=entry["datatype"], shape=entry["shape"])
        message.raw_output_contents.append(raw)
    return message


def status_of(exc: ModelportError) -> str:
    return STATUS_BY_KIND.get(exc.kind, "UNKNOWN")


def _typed_bytes(tensor) -> bytes:
    field = _TYPED.get(tensor.datatype)
    if field is None:
        raise BadInput(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}", input_name=tensor.name)
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        return v2.encode_bytes(list(values))
    try:
        array = np.asarray(values, dtype=V2_TO_NUMPY[tensor.datatype])
    except (OverflowError, ValueError) as exc:
        raise BadInput(f"input {tensor.name!r}: contents are not {tensor.datatype}: {exc}", input_name=tensor.name) from None
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


# -- client side ------------------------------------------------------------------------------------

def infer_request(model: str, version: str | int | None, inputs, outputs: list[tuple[str, int | None]]):
    """Raw tensors (``{"image": array}``) or encoded images (a list of bytes) -> a ModelInferRequest,
    its tensor in ``raw_input_contents``; no ``outputs``: every output."""
    service_pb2, _ = messages()
    request = service_pb2.ModelInferRequest(model_name=model, model_version="" if version is None else str(version))
    if isinstance(inputs, dict):
        (name, array), = inputs.items()
        array = np.ascontiguousarray(array)
        request.inputs.add(name=name, datatype=NUMPY_TO_V2[array.dtype], shape=list(array.shape))
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    else:
        request.inputs.add(name=v2.ENCODED_INPUT, datatype="BYTES", shape=[len(inputs)])
        request.raw_input_contents.append(v2.encode_bytes(inputs))
    for name, k in outputs:
        output = request.outputs.add(name=name)
        if k is not None:
            output.parameters["classification"].int64_param = k
    return request


def infer_outputs(response) -> dict[str, np.ndarray]:
    """A ModelInferResponse -> arrays by output name (BYTES as str)."""
    outputs = {}
    for output, raw in zip(response.outputs, response.raw_output_contents):
        shape = list(output.shape)
        if output.datatype == "BYTES":
            values = [e.decode() for e in v2.decode_bytes(raw, output.name, what="output")]
            outputs[output.name] = np.array(values, dtype=object).reshape(shape)
        else:
            dtype = V2_TO_NUMPY[output.datatype].newbyteorder("<")
            outputs[output.name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return outputs


def error_from_grpc(exc) -> ModelportError:
    """A failed call -> the ``modelport.errors`` class of its kind (trailing metadata, else its status)."""
    trailing = dict(exc.trailing_metadata() or ())
    status = exc.code().name
    kind = trailing.get("kind") or next((k for k, s in STATUS_BY_KIND.items() if s == status), "internal")
    try:
        retry_after_s = float(trailing.get("retry-after", 1))
    except ValueError:  # another server's way of saying it
        retry_after_s = 1.0
    return wire.error_from_wire({"kind": kind, "message": exc.details() or status, "retry_after_s": retry_after_s})
