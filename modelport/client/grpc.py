"""The gRPC transport of ``Client`` and ``AsyncClient`` (``grpc://host:port``): the Open Inference
Protocol's ``ModelInfer``, in the messages of ``protocol/grpc.py``; errors come back as the same
``modelport.errors`` classes as over HTTP and ZeroMQ."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from modelport.client.common import ClientTimeout, ImageLike, http_inputs
from modelport import telemetry
from modelport.engine.predictions import Prediction
from modelport.protocol import grpc as codec
from modelport.protocol import v2
from modelport.protocol.load import HEADER, Load, from_text

_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def _load(metadata) -> Load | None:
    for key, value in metadata or ():
        if key == HEADER:
            return from_text(value)
    return None


def _outputs(outputs: Sequence[str] | None) -> list[tuple[str, int | None]]:
    return [(name, None) for name in outputs or ()]


class GrpcTransport:
    """Blocking calls on one channel (thread-safe, as gRPC channels are)."""

    def __init__(self, address: str, timeout_s: float, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        import grpc

        self._grpc = grpc
        self._metadata = metadata  # the caller's key and priority, on every call
        self.address, self.timeout_s = address, timeout_s
        self._channel = grpc.insecure_channel(address, options=_OPTIONS)
        self._stub = codec.messages()[1].GRPCInferenceServiceStub(self._channel)
        self._primary: dict[str, str] = {}

    def infer(self, model: str, inputs: Mapping[str, np.ndarray] | Sequence[ImageLike], outputs: Sequence[str] | None,
              version) -> dict[str, np.ndarray]:
        request = codec.infer_request(model, version, dict(inputs) if isinstance(inputs, Mapping)
                                      else http_inputs(inputs), _outputs(outputs))
        return codec.infer_outputs(self._call(self._stub.ModelInfer, request))

    def classify(self, model: str, images: list[bytes], top_k: int, version) -> list[list[Prediction]]:
        request = codec.infer_request(model, version, images, [(self._primary_output(model, version), top_k)])
        outputs = codec.infer_outputs(self._call(self._stub.ModelInfer, request))
        return v2.parse_classification(next(iter(outputs.values())))

    def ping(self) -> bool:
        messages = codec.messages()[0]
        return self._call(self._stub.ServerReady, messages.ServerReadyRequest()).ready

    def close(self) -> None:
        self._channel.close()

    def _primary_output(self, model: str, version) -> str:
        """The output a classification reads: the model's first (asked once per model)."""
        if model not in self._primary:
            messages = codec.messages()[0]
            request = messages.ModelMetadataRequest(name=model, version="" if version is None else str(version))
            self._primary[model] = self._call(self._stub.ModelMetadata, request).outputs[0].name
        return self._primary[model]

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s,
                          metadata=self._metadata + tuple(telemetry.inject({}).items()))
        except self._grpc.RpcError as exc:
            if exc.code() == self._grpc.StatusCode.DEADLINE_EXCEEDED and not exc.trailing_metadata():
                raise ClientTimeout(f"no reply from {self.address} in {self.timeout_s} s") from None
            raise codec.error_from_grpc(exc) from None


class AsyncGrpcTransport(GrpcTransport):
    """The same calls on a ``grpc.aio`` channel, for ``AsyncClient``: many requests in flight."""

    def __init__(self, address: str, timeout_s: float, on_load: Callable[[Load | None], None] = lambda load: None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        import grpc
        import grpc.aio

        self._grpc = grpc
        self._metadata = metadata
        self._on_load = on_load  # gets the load each answer reports (trailing metadata)
        self.address, self.timeout_s = address, timeout_s
        self._channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
        self._stub = codec.messages()[1].GRPCInferenceServiceStub(self._channel)
        self._primary: dict[str, str] = {}

    async def infer(self, model, inputs, outputs, version) -> dict[str, np.ndarray]:
        request = codec.infer_request(model, version, dict(inputs) if isinstance(inputs, Mapping)
                                      else http_inputs(inputs), _outputs(outputs))
        return codec.infer_outputs(await self._call(self._stub.ModelInfer, request))

    async def classify(self, model, images, top_k, version) -> list[list[Prediction]]:
        request = codec.infer_request(model, version, images, [(await self._primary_output(model, version), top_k)])
        outputs = codec.infer_outputs(await self._call(self._stub.ModelInfer, request))
        return v2.parse_classification(next(iter(outputs.values())))

    async def ping(self) -> bool:
        messages = codec.messages()[0]
        return (await self._call(self._stub.ServerReady, messages.ServerReadyRequest())).ready

    async def close(self) -> None:
        await self._channel.close()

    async def _primary_output(self, model: str, version) -> str:
        if model not in self._primary:
            messages = codec.messages()[0]
            request = messages.ModelMetadataRequest(name=model, version="" if version is None else str(version))
            self._primary[model] = (await self._call(self._stub.ModelMetadata, request)).outputs[0].name
        return self._primary[model]

    async def _call(self, method, request):
        call = method(request, timeout=self.timeout_s, metadata=self._metadata + tuple(telemetry.inject({}).items()))
        try:
            response = await call
            self._on_load(_load(await call.trailing_metadata()))
            return response
        except self._grpc.RpcError as exc:
            self._on_load(_load(exc.trailing_metadata()))
            if exc.code() == self._grpc.StatusCode.DEADLINE_EXCEEDED and not exc.trailing_metadata():
                raise ClientTimeout(f"no reply from {self.address} in {self.timeout_s} s") from None
            raise codec.error_from_grpc(exc) from None
