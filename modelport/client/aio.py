"""The asyncio client: ``AsyncClient(url)``, any number of requests in flight on one connection.

Over ``etcd://`` it asks ``modelport.cluster.discovery`` which worker to call, and calls it with
another ``AsyncClient``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from modelport.client.common import (ClientTimeout, DEFAULT_MODEL, ServerUnreachable, credentials, grpc_metadata, zmq_fields, ImageLike, client_span, http_inputs, image_bytes,
                                     infer_path, metadata_path, parse_url, zmq_inputs, zmq_outputs, zmq_predictions,
                                     zmq_request, zmq_result)
from modelport import telemetry
from modelport.engine.predictions import Prediction
from modelport.protocol import v2, wire
from modelport.protocol.load import HEADER, Load, from_text, from_wire
from modelport.protocol.errors import error_from_http


class AsyncClient:
    """asyncio client: any number of requests in flight on one connection."""

    def __init__(self, url: str, *, model: str = DEFAULT_MODEL, timeout_s: float = 30.0, transport: str = "http",
                 hedge_after_ms: float | str | None = None, retry_ratio: float = 0.2, api_key: str | None = None,
                 priority: str | None = None) -> None:
        """``transport``, ``hedge_after_ms`` (a number of ms, or "p95") and ``retry_ratio`` apply to
        ``etcd://`` URLs: which protocol to speak to the workers, when to send a second copy, and
        how many extra requests failover and hedging may add. ``api_key`` names the caller's tenant
        on a server with ``--keys`` (default ``$MODELPORT_API_KEY``); ``priority`` ("normal",
        "batch") lowers its requests' class."""
        self.kind, self._address = parse_url(url)
        self._credentials = credentials(api_key, priority)
        self.model = model
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._receiver: asyncio.Task | None = None
        # The load the server reported with its latest answer (protocol/load.py), and when: what
        # discovery weighs a worker by. None until a server that reports it has answered.
        self.load: Load | None = None
        self.load_at = 0.0
        self.on_load: Callable[[Load], None] | None = None  # called with each report as it arrives
        if self.kind == "discovery":
            from modelport.cluster.discovery import Discovery
            from modelport.cluster.members import ClusterURL

            self.discovery = Discovery(ClusterURL.parse(url), transport=transport, timeout_s=timeout_s,
                                       hedge_after_ms=hedge_after_ms, retry_ratio=retry_ratio,
                                       connect=lambda address: AsyncClient(address, model=model, timeout_s=timeout_s,
                                                                           api_key=api_key, priority=priority))
        elif self.kind == "grpc":  # the channel is opened in the running loop, on first use
            self._grpc = None
        elif self.kind == "zmq":
            import zmq
            import zmq.asyncio

            self._context = zmq.asyncio.Context()
            self._socket = self._context.socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(self._address)
        else:  # aiohttp: a fifth of httpx's CPU per request (docs/decisions.md); opened in the running loop
            self._session = None
            self._primary: dict[str, str] = {}

    async def classify(self, image: ImageLike, *, top_k: int = 5, model: str | None = None,
                       version: str | int | None = None) -> list[Prediction]:
        return (await self.classify_many([image], top_k=top_k, model=model, version=version))[0]

    async def classify_many(self, images: Sequence[ImageLike], *, top_k: int = 5, model: str | None = None,
                            version: str | int | None = None) -> list[list[Prediction]]:
        data = [image_bytes(i) for i in images]
        model = model or self.model
        with self._span("classify", model):
            return await self._classify_many(data, top_k, model, version)

    async def _classify_many(self, data: list[bytes], top_k: int, model: str, version) -> list[list[Prediction]]:
        if self.kind == "discovery":
            return await self.discovery.call(model, version, lambda worker: worker.classify_many(
                data, top_k=top_k, model=model, version=version))
        if self.kind == "grpc":
            return await self._grpc_channel().classify(model, data, top_k, version)
        if self.kind == "zmq":
            return zmq_predictions(await self._call(zmq_request("classify", model, version, images=data, top_k=top_k)))
        primary = await self._primary_output(model, version)
        outputs = await self._v2(model, version, *v2.encode_request(data, v2.classification_output(primary, top_k)))
        return v2.parse_classification(next(iter(outputs.values())))

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray] | Sequence[ImageLike], *,
                    outputs: Sequence[str] | None = None, version: str | int | None = None) -> dict[str, np.ndarray]:
        with self._span("infer", model):
            return await self._infer(model, inputs, outputs, version)

    def _span(self, operation: str, model: str):
        return client_span(operation, model, self.kind, self._address)

    async def _infer(self, model: str, inputs, outputs, version) -> dict[str, np.ndarray]:
        if self.kind == "discovery":
            if not isinstance(inputs, Mapping):
                inputs = [image_bytes(i) for i in inputs]  # read files once, whatever the retries
            return await self.discovery.call(model, version, lambda worker: worker.infer(
                model, inputs, outputs=outputs, version=version))
        if self.kind == "grpc":
            return await self._grpc_channel().infer(model, inputs, outputs, version)
        if self.kind == "zmq":
            return zmq_outputs(await self._call(zmq_request("infer", model, version,
                                                          outputs=list(outputs) if outputs else None,
                                                          **zmq_inputs(inputs))))
        return await self._v2(model, version, *v2.encode_request(http_inputs(inputs), v2.binary_outputs(outputs)))

    async def ping(self) -> bool:
        """True when some worker is ready (discovery) or the server answers."""
        if self.kind == "discovery":
            await self.discovery.start()
            return any(m.state == "ready" for m in self.discovery.directory.members.values())
        if self.kind == "grpc":
            return await self._grpc_channel().ping()
        if self.kind == "zmq":
            return bool((await self._call({"op": "ping"})).get("ok"))
        return (await self._request("GET", "/v2/health/ready"))[0] == 200

    def _grpc_channel(self):
        if self._grpc is None:
            from modelport.client.grpc import AsyncGrpcTransport

            self._grpc = AsyncGrpcTransport(self._address, self.timeout_s, on_load=self._note_load,
                                            metadata=grpc_metadata(self._credentials))
        return self._grpc

    async def close(self) -> None:
        if self.kind == "discovery":
            await self.discovery.close()
        elif self.kind == "grpc":
            if self._grpc is not None:
                await self._grpc.close()
        elif self.kind == "zmq":
            if self._receiver is not None:
                self._receiver.cancel()
                await asyncio.gather(self._receiver, return_exceptions=True)
            for future in self._pending.values():
                future.cancel()
            self._socket.close(linger=0)
            self._context.term()
        elif self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, request: dict) -> dict:
        if self._receiver is None:
            self._receiver = asyncio.get_running_loop().create_task(self._receive())
        request["id"] = request_id = next(self._ids)
        request.update(zmq_fields(self._credentials))
        telemetry.inject(request)  # the trace goes on in the worker (the frame's traceparent field)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._socket.send(wire.pack(request))
            reply = await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            raise ClientTimeout(f"no reply from {self._address} in {self.timeout_s} s") from None
        finally:
            self._pending.pop(request_id, None)
        return zmq_result(reply)

    async def _receive(self) -> None:
        while True:
            reply = wire.unpack(await self._socket.recv())
            if isinstance(reply, dict):
                self._note_load(from_wire(reply.get("load")))
            future = self._pending.get(reply.get("id")) if isinstance(reply, dict) else None
            if future is not None and not future.done():
                future.set_result(reply)

    def _open_session(self):
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=None), skip_auto_headers=("User-Agent",),
                headers=self._credentials)
        return self._session

    async def _request(self, method: str, path: str, **kwargs) -> tuple[int, bytes, Mapping[str, str]]:
        import aiohttp

        session = self._open_session()
        try:
            async with session.request(method, self._address + path, **kwargs) as response:
                self._note_load(from_text(response.headers.get(HEADER)))
                return response.status, await response.read(), response.headers
        except asyncio.TimeoutError:  # aiohttp's timeouts are asyncio's
            raise ClientTimeout(f"no reply from {self._address} in {self.timeout_s} s") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:  # refused, reset, cut short
            raise ServerUnreachable(f"cannot reach {self._address}: {exc}") from exc

    def _note_load(self, load: Load | None) -> None:
        if load is not None:
            self.load, self.load_at = load, time.monotonic()
            if self.on_load is not None:
                self.on_load(load)

    async def _v2(self, model: str, version, body: bytes, headers: dict) -> dict[str, np.ndarray]:
        status, content, reply_headers = await self._request("POST", infer_path(model, version), data=body,
                                                             headers=telemetry.inject(dict(headers)))
        if status != 200:
            raise error_from_http(status, content, reply_headers)
        return v2.decode_response(content, reply_headers)

    async def _primary_output(self, model: str, version) -> str:
        if model not in self._primary:
            status, content, headers = await self._request("GET", metadata_path(model, version))
            if status != 200:
                raise error_from_http(status, content, headers)
            self._primary[model] = json.loads(content)["outputs"][0]["name"]
        return self._primary[model]
