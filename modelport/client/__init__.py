"""One client for both transports: ``Client("zmq://host:12490")`` or ``Client("http://host:12480")``,
or for a whole cluster: ``Client("etcd://host:2379/prod")`` finds the workers in the member directory and
calls them directly (``modelport/cluster/discovery.py``: choice of worker, failover, hedging).

    from modelport import Client
    with Client("zmq://127.0.0.1:12490") as c:
        c.classify("cat.jpg", top_k=5)                    # -> [Prediction(label, index, score), ...]
        c.infer("efficientnet-lite0", {"image": array})   # -> {"probabilities": array, "features": array}

    async with AsyncClient("zmq://127.0.0.1:12490") as c:  # many requests in flight on one socket
        await asyncio.gather(*(c.classify(p) for p in paths))

Server errors come back as the ``modelport.errors`` classes (``BadInput``, ``NotFound``,
``Overloaded`` with ``retry_after_s``, ``DeadlineExceeded``, ...); a reply that does not arrive in
``timeout_s`` raises ``ClientTimeout``. Both transports reconnect by themselves after a server
restart (ZeroMQ's DEALER reconnects; the HTTP clients open a new connection).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from modelport.protocol import wire
from modelport.errors import ModelportError
from modelport.engine.predictions import Prediction

DEFAULT_MODEL = "efficientnet-lite0"
ImageLike = str | os.PathLike | bytes


class ClientTimeout(ModelportError):
    kind = "timeout"


def _image_bytes(image: ImageLike) -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else Path(image).read_bytes()


def _transport(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme == "zmq":
        return "zmq", f"tcp://{parts.netloc}"
    if parts.scheme in ("http", "https"):
        return "http", url.rstrip("/")
    if parts.scheme == "etcd":
        return "discovery", url
    raise ValueError(f"unsupported URL {url!r}: use zmq://host:port, http://host:port or etcd://host:port/cluster")


class _LoopThread:
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


# -- request building and reply parsing, shared by the sync and async clients ------------------

def _zmq_request(op: str, model: str | None, version: str | int | None, **fields: Any) -> dict:
    request = {"op": op, **{k: v for k, v in fields.items() if v is not None}}
    if model is not None:
        request["model"] = model
    if version is not None:
        request["version"] = str(version)
    return request


def _zmq_result(reply: Any) -> dict:
    if not isinstance(reply, dict):
        raise ModelportError(f"malformed reply: {reply!r}")
    if not reply.get("ok"):
        raise wire.error_from_wire(reply.get("error"))
    return reply


def _predictions(reply: dict) -> list[list[Prediction]]:
    return [[Prediction(label, int(index), float(score)) for label, index, score in row] for row in reply["predictions"]]


def _outputs(reply: dict) -> dict[str, np.ndarray]:
    return {name: wire.tensor_from_wire(value, name) for name, value in reply["outputs"].items()}


# For servers that send no "kind" (another V2 or TF Serving server): the closest kind by status.
_KIND_BY_STATUS = {400: "bad_input", 404: "not_found", 413: "too_large", 429: "overloaded", 503: "unavailable",
                   504: "deadline_exceeded"}


def _http_error(status: int, body: bytes, headers: Mapping[str, str]) -> ModelportError:
    """An HTTP error reply -> the same exception class a ZeroMQ reply of that kind gives."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        parsed = {"error": body.decode(errors="replace") or f"HTTP {status}"}
    return wire.error_from_wire({"kind": parsed.get("kind", _KIND_BY_STATUS.get(status, "internal")),
                                 "message": parsed.get("error", ""), "input": parsed.get("input"),
                                 "retry_after_s": float(headers.get("retry-after", 1))})


def _v2_request(inputs: Mapping[str, np.ndarray] | Sequence[bytes], outputs: list[dict]) -> tuple[bytes, dict]:
    """A V2 request in the binary tensor extension: raw tensors or encoded images in, binary out.

    No ``outputs`` asks for every output, in binary.
    """
    from modelport.runtime import NUMPY_TO_V2

    if isinstance(inputs, Mapping):
        (name, array), = inputs.items()
        array = np.ascontiguousarray(array)
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        entry = {"name": name, "shape": list(array.shape), "datatype": NUMPY_TO_V2[array.dtype]}
    else:
        raw = b"".join(struct.pack("<I", len(i)) + i for i in inputs)
        entry = {"name": "image_bytes", "shape": [len(inputs)], "datatype": "BYTES"}
    entry["parameters"] = {"binary_data_size": len(raw)}
    request: dict[str, Any] = {"inputs": [entry]}
    if outputs:
        request["outputs"] = outputs
    else:
        request["parameters"] = {"binary_data_output": True}
    header = json.dumps(request).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


def _zmq_inputs(inputs: Mapping[str, np.ndarray] | Sequence[ImageLike]) -> dict:
    if isinstance(inputs, Mapping):
        return {"inputs": {k: wire.tensor_to_wire(np.asarray(v)) for k, v in inputs.items()}}
    return {"images": [_image_bytes(i) for i in inputs]}


def _http_inputs(inputs: Mapping[str, np.ndarray] | Sequence[ImageLike]) -> Mapping[str, np.ndarray] | list[bytes]:
    return inputs if isinstance(inputs, Mapping) else [_image_bytes(i) for i in inputs]


def _wanted(outputs: Sequence[str] | None) -> list[dict]:
    return [{"name": n, "parameters": {"binary_data": True}} for n in outputs or ()]


def _classification_output(name: str, top_k: int) -> list[dict]:
    return [{"name": name, "parameters": {"classification": top_k, "binary_data": True}}]


def _v2_outputs(body: bytes, headers: Mapping[str, str]) -> dict[str, np.ndarray]:
    from modelport.runtime import V2_TO_NUMPY

    n = int(headers.get("inference-header-content-length", len(body)))
    header, raw = json.loads(body[:n]), body[n:]
    outputs, offset = {}, 0
    for out in header["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if out["datatype"] == "BYTES":
            chunk = raw[offset:offset + size] if size is not None else None
            values = _bytes_elements(chunk) if chunk is not None else out["data"]
            outputs[out["name"]] = np.array(values, dtype=object).reshape(out["shape"])
        elif size is not None:
            dtype = V2_TO_NUMPY[out["datatype"]].newbyteorder("<")
            outputs[out["name"]] = np.frombuffer(raw[offset:offset + size], dtype=dtype).reshape(out["shape"])
        else:
            outputs[out["name"]] = np.array(out["data"], dtype=V2_TO_NUMPY[out["datatype"]]).reshape(out["shape"])
        offset += size or 0
    return outputs


def _bytes_elements(raw: bytes) -> list[str]:
    values, offset = [], 0
    while offset < len(raw):
        (n,) = struct.unpack_from("<I", raw, offset)
        values.append(raw[offset + 4:offset + 4 + n].decode())
        offset += 4 + n
    return values


def _classification_predictions(values: np.ndarray) -> list[list[Prediction]]:
    rows = []
    for row in values:
        predictions = []
        for entry in row:
            score, index, label = str(entry).split(":", 2)
            predictions.append(Prediction(label, int(index), float(score)))
        rows.append(predictions)
    return rows


def _metadata_path(model: str, version: str | int | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "")


def _v2_path(model: str, version: str | int | None) -> str:
    return _metadata_path(model, version) + "/infer"


# -- the clients ----------------------------------------------------------------------------------

class Client:
    """Blocking client; thread-safe (one request at a time per client over ZeroMQ)."""

    def __init__(self, url: str, *, model: str = DEFAULT_MODEL, timeout_s: float = 30.0, transport: str = "http",
                 hedge_after_ms: float | str | None = None, retry_ratio: float = 0.2) -> None:
        self.kind, self._address = _transport(url)
        self.model = model
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        if self.kind == "discovery":  # the asyncio client, run on a loop of its own
            self._loop = _LoopThread()
            self._async = AsyncClient(url, model=model, timeout_s=timeout_s, transport=transport,
                                      hedge_after_ms=hedge_after_ms, retry_ratio=retry_ratio)
        elif self.kind == "zmq":
            import zmq

            self._zmq = zmq
            self._context = zmq.Context()
            self._socket = self._new_socket()
        else:
            import httpx

            self._http = httpx.Client(base_url=self._address, timeout=timeout_s)
            self._primary: dict[str, str] = {}

    def classify(self, image: ImageLike, *, top_k: int = 5, model: str | None = None,
                 version: str | int | None = None) -> list[Prediction]:
        return self.classify_many([image], top_k=top_k, model=model, version=version)[0]

    def classify_many(self, images: Sequence[ImageLike], *, top_k: int = 5, model: str | None = None,
                      version: str | int | None = None) -> list[list[Prediction]]:
        data = [_image_bytes(i) for i in images]
        model = model or self.model
        if self.kind == "discovery":
            return self._loop.run(self._async.classify_many(data, top_k=top_k, model=model, version=version))
        if self.kind == "zmq":
            return _predictions(self._call(_zmq_request("classify", model, version, images=data, top_k=top_k)))
        outputs = self._v2(model, version, *_v2_request(data, _classification_output(
            self._primary_output(model, version), top_k)))
        return _classification_predictions(next(iter(outputs.values())))

    def infer(self, model: str, inputs: Mapping[str, np.ndarray] | Sequence[ImageLike], *,
              outputs: Sequence[str] | None = None, version: str | int | None = None) -> dict[str, np.ndarray]:
        """Raw tensors in (``{"image": array}``) or encoded images in (a list), arrays out."""
        if self.kind == "discovery":
            return self._loop.run(self._async.infer(model, inputs, outputs=outputs, version=version))
        if self.kind == "zmq":
            return _outputs(self._call(_zmq_request("infer", model, version, outputs=list(outputs) if outputs else None,
                                                    **_zmq_inputs(inputs))))
        return self._v2(model, version, *_v2_request(_http_inputs(inputs), _wanted(outputs)))

    def ping(self) -> bool:
        if self.kind == "discovery":
            return self._loop.run(self._async.ping())
        if self.kind == "zmq":
            return bool(self._call({"op": "ping"}).get("ok"))
        return self._http.get("/v2/health/ready").status_code == 200

    @property
    def discovery(self):
        """The discovery state (workers, stats) of an ``etcd://`` client."""
        return self._async.discovery

    def close(self) -> None:
        if self.kind == "discovery":
            self._loop.run(self._async.close())
            self._loop.close()
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
                    return _zmq_result(reply)
                # A reply to an earlier request that timed out: not ours, drop it.

    def _v2(self, model: str, version, body: bytes, headers: dict) -> dict[str, np.ndarray]:
        import httpx

        try:
            response = self._http.post(_v2_path(model, version), content=body, headers=headers)
        except httpx.TimeoutException:
            raise ClientTimeout(f"no reply from {self._address} in {self.timeout_s} s") from None
        if response.status_code != 200:
            raise _http_error(response.status_code, response.content, response.headers)
        return _v2_outputs(response.content, response.headers)

    def _primary_output(self, model: str, version) -> str:
        """The output a classification reads: the model's first (fetched once per model)."""
        if model not in self._primary:
            response = self._http.get(_metadata_path(model, version))
            if response.status_code != 200:
                raise _http_error(response.status_code, response.content, response.headers)
            self._primary[model] = response.json()["outputs"][0]["name"]
        return self._primary[model]


class AsyncClient:
    """asyncio client: any number of requests in flight on one connection."""

    def __init__(self, url: str, *, model: str = DEFAULT_MODEL, timeout_s: float = 30.0, transport: str = "http",
                 hedge_after_ms: float | str | None = None, retry_ratio: float = 0.2) -> None:
        """``transport``, ``hedge_after_ms`` (a number of ms, or "p95") and ``retry_ratio`` apply to
        ``etcd://`` URLs: which protocol to speak to the workers, when to send a second copy, and
        how many extra requests failover and hedging may add."""
        self.kind, self._address = _transport(url)
        self.model = model
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._receiver: asyncio.Task | None = None
        if self.kind == "discovery":
            from modelport.cluster.discovery import Discovery
            from modelport.cluster.members import ClusterURL

            self.discovery = Discovery(ClusterURL.parse(url), transport=transport, timeout_s=timeout_s,
                                       hedge_after_ms=hedge_after_ms, retry_ratio=retry_ratio,
                                       connect=lambda address: AsyncClient(address, model=model, timeout_s=timeout_s))
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
        data = [_image_bytes(i) for i in images]
        model = model or self.model
        if self.kind == "discovery":
            return await self.discovery.call(model, version, lambda worker: worker.classify_many(
                data, top_k=top_k, model=model, version=version))
        if self.kind == "zmq":
            return _predictions(await self._call(_zmq_request("classify", model, version, images=data, top_k=top_k)))
        primary = await self._primary_output(model, version)
        outputs = await self._v2(model, version, *_v2_request(data, _classification_output(primary, top_k)))
        return _classification_predictions(next(iter(outputs.values())))

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray] | Sequence[ImageLike], *,
                    outputs: Sequence[str] | None = None, version: str | int | None = None) -> dict[str, np.ndarray]:
        if self.kind == "discovery":
            if not isinstance(inputs, Mapping):
                inputs = [_image_bytes(i) for i in inputs]  # read files once, whatever the retries
            return await self.discovery.call(model, version, lambda worker: worker.infer(
                model, inputs, outputs=outputs, version=version))
        if self.kind == "zmq":
            return _outputs(await self._call(_zmq_request("infer", model, version,
                                                          outputs=list(outputs) if outputs else None,
                                                          **_zmq_inputs(inputs))))
        return await self._v2(model, version, *_v2_request(_http_inputs(inputs), _wanted(outputs)))

    async def ping(self) -> bool:
        """True when some worker is ready (discovery) or the server answers."""
        if self.kind == "discovery":
            await self.discovery.start()
            return any(m.state == "ready" for m in self.discovery.directory.members.values())
        if self.kind == "zmq":
            return bool((await self._call({"op": "ping"})).get("ok"))
        async with self._open_session().get(self._address + "/v2/health/ready") as response:
            return response.status == 200

    async def close(self) -> None:
        if self.kind == "discovery":
            await self.discovery.close()
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
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._socket.send(wire.pack(request))
            reply = await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            raise ClientTimeout(f"no reply from {self._address} in {self.timeout_s} s") from None
        finally:
            self._pending.pop(request_id, None)
        return _zmq_result(reply)

    async def _receive(self) -> None:
        while True:
            reply = wire.unpack(await self._socket.recv())
            future = self._pending.get(reply.get("id")) if isinstance(reply, dict) else None
            if future is not None and not future.done():
                future.set_result(reply)

    def _open_session(self):
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=None), skip_auto_headers=("User-Agent",))
        return self._session

    async def _request(self, method: str, path: str, **kwargs) -> tuple[int, bytes, Mapping[str, str]]:
        session = self._open_session()
        try:
            async with session.request(method, self._address + path, **kwargs) as response:
                return response.status, await response.read(), response.headers
        except asyncio.TimeoutError:  # aiohttp's timeouts are asyncio's
            raise ClientTimeout(f"no reply from {self._address} in {self.timeout_s} s") from None

    async def _v2(self, model: str, version, body: bytes, headers: dict) -> dict[str, np.ndarray]:
        status, content, reply_headers = await self._request("POST", _v2_path(model, version), data=body,
                                                             headers=headers)
        if status != 200:
            raise _http_error(status, content, reply_headers)
        return _v2_outputs(content, reply_headers)

    async def _primary_output(self, model: str, version) -> str:
        if model not in self._primary:
            status, content, headers = await self._request("GET", _metadata_path(model, version))
            if status != 200:
                raise _http_error(status, content, headers)
            self._primary[model] = json.loads(content)["outputs"][0]["name"]
        return self._primary[model]
