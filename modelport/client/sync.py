"""The blocking client: ``Client(url)``, for scripts and threads.

Over ``etcd://`` it runs the asyncio client (``aio.py``) on an event loop of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Mapping, Sequence

import numpy as np

from modelport.client.aio import AsyncClient
from modelport.client.common import (ClientTimeout, DEFAULT_MODEL, credentials, grpc_metadata, zmq_fields, ImageLike, client_span, http_inputs, image_bytes,
                                     http_request, infer_path, metadata_path, parse_url, zmq_inputs, zmq_outputs, zmq_predictions,
                                     zmq_request, zmq_result)
from modelport import telemetry
from modelport.engine.predictions import Prediction
from modelport.protocol import v2, wire
from modelport.protocol.errors import error_from_http


class LoopThread:
    """An event loop in a daemon thread: the blocking client runs the asyncio discovery client there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="modelport-client", daemon=True)
        self._thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class Client:
    """Blocking client; thread-safe (one request at a time per client over ZeroMQ)."""

    def __init__(self, url: str, *, model: str = DEFAULT_MODEL, timeout_s: float = 30.0, transport: str = "http",
                 hedge_after_ms: float | str | None = None, retry_ratio: float = 0.2, api_key: str | None = None,
                 priority: str | None = None) -> None:
        """``api_key`` names the caller's tenant on a server with ``--keys`` (default
        ``$MODELPORT_API_KEY``); ``priority`` ("normal", "batch") lowers its requests' class."""
        self.kind, self._address = parse_url(url)
        self._credentials = credentials(api_key, priority)
        self.model = model
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        if self.kind == "discovery":  # the asyncio client, run on a loop of its own
            self._loop = LoopThread()
            self._async = AsyncClient(url, model=model, timeout_s=timeout_s, transport=transport,
                                      hedge_after_ms=hedge_after_ms, retry_ratio=retry_ratio, api_key=api_key,
                                      priority=priority)
        elif self.kind == "grpc":
            from modelport.client.grpc import GrpcTransport

            self._grpc = GrpcTransport(self._address, timeout_s, metadata=grpc_metadata(self._credentials))
        elif self.kind == "zmq":
            import zmq

            self._zmq = zmq
            self._context = zmq.Context()
            self._socket = self._new_socket()
        else:
            import httpx

            self._http = httpx.Client(base_url=self._address, timeout=timeout_s, headers=self._credentials)
            self._primary: dict[str, str] = {}

    def classify(self, image: ImageLike, *, top_k: int = 5, model: str | None = None,
                 version: str | int | None = None) -> list[Prediction]:
        return self.classify_many([image], top_k=top_k, model=model, version=version)[0]

    def classify_many(self, images: Sequence[ImageLike], *, top_k: int = 5, model: str | None = None,
                      version: str | int | None = None) -> list[list[Prediction]]:
        data = [image_bytes(i) for i in images]
        model = model or self.model
        with self._span("classify", model):
            return self._classify_many(data, top_k, model, version)

    def _span(self, operation: str, model: str):
        return client_span(operation, model, self.kind, self._address)

    def _classify_many(self, data: list[bytes], top_k: int, model: str, version) -> list[list[Prediction]]:
        if self.kind == "discovery":
            return self._loop.run(self._async.classify_many(data, top_k=top_k, model=model, version=version))
        if self.kind == "grpc":
            return self._grpc.classify(model, data, top_k, version)
        if self.kind == "zmq":
            return zmq_predictions(self._call(zmq_request("classify", model, version, images=data, top_k=top_k)))
        outputs = self._v2(model, version, *v2.encode_request(data, v2.classification_output(
            self._primary_output(model, version), top_k)))
        return v2.parse_classification(next(iter(outputs.values())))

    def infer(self, model: str, inputs: Mapping[str, np.ndarray] | Sequence[ImageLike], *,
              outputs: Sequence[str] | None = None, version: str | int | None = None) -> dict[str, np.ndarray]:
        """Raw tensors in (``{"image": array}``) or encoded images in (a list), arrays out."""
        with self._span("infer", model):
            return self._infer(model, inputs, outputs, version)

    def _infer(self, model: str, inputs, outputs, version) -> dict[str, np.ndarray]:
        if self.kind == "discovery":
            return self._loop.run(self._async.infer(model, inputs, outputs=outputs, version=version))
        if self.kind == "grpc":
            return self._grpc.infer(model, inputs, outputs, version)
        if self.kind == "zmq":
            return zmq_outputs(self._call(zmq_request("infer", model, version, outputs=list(outputs) if outputs else None,
                                                    **zmq_inputs(inputs))))
        return self._v2(model, version, *v2.encode_request(http_inputs(inputs), v2.binary_outputs(outputs)))

    def ping(self) -> bool:
        if self.kind == "discovery":
            return self._loop.run(self._async.ping())
        if self.kind == "grpc":
            return self._grpc.ping()
        if self.kind == "zmq":
            return bool(self._call({"op": "ping"}).get("ok"))
        return self._request("GET", "/v2/health/ready").status_code == 200

    @property
    def discovery(self):
        """The discovery state (workers, stats) of an ``etcd://`` client."""
        return self._async.discovery

    def close(self) -> None:
        if self.kind == "discovery":
            self._loop.run(self._async.close())
            self._loop.close()
        elif self.kind == "grpc":
            self._grpc.close()
        elif self.kind == "zmq":
            self._socket.close(linger=0)
            self._context.term()
        else:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transports ---------------------------------------------------------------------------

    def _new_socket(self):
        socket = self._context.socket(self._zmq.DEALER)
        socket.setsockopt(self._zmq.LINGER, 0)
        socket.connect(self._address)
        return socket

    def _call(self, request: dict) -> dict:
        with self._lock:
            request["id"] = request_id = next(self._ids)
            request.update(zmq_fields(self._credentials))
            telemetry.inject(request)  # the trace goes on in the worker (the frame's traceparent field)
            self._socket.send(wire.pack(request))
            deadline = time.monotonic() + self.timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._socket.poll(int(remaining * 1000) + 1):
                    # The request may be queued in a dead connection: start over with a fresh socket
                    # so that a late reply can never be taken for the next request's.
                    self._socket.close(linger=0)
                    self._socket = self._new_socket()
                    raise ClientTimeout(f"no reply from {self._address} in {self.timeout_s} s")
                reply = wire.unpack(self._socket.recv())
                if isinstance(reply, dict) and reply.get("id") in (request_id, None):
                    return zmq_result(reply)
                # A reply to an earlier request that timed out: not ours, drop it.

    def _request(self, method: str, path: str, **kwargs):
        return http_request(self._http, self._address, self.timeout_s, method, path, **kwargs)

    def _v2(self, model: str, version, body: bytes, headers: dict) -> dict[str, np.ndarray]:
        response = self._request("POST", infer_path(model, version), content=body, headers=telemetry.inject(dict(headers)))
        if response.status_code != 200:
            raise error_from_http(response.status_code, response.content, response.headers)
        return v2.decode_response(response.content, response.headers)

    def _primary_output(self, model: str, version) -> str:
        """The output a classification reads: the model's first (fetched once per model)."""
        if model not in self._primary:
            response = self._request("GET", metadata_path(model, version))
            if response.status_code != 200:
                raise error_from_http(response.status_code, response.content, response.headers)
            self._primary[model] = response.json()["outputs"][0]["name"]
        return self._primary[model]
