"""One image in, one answer out, over each protocol ``modelport bench`` speaks.

Every protocol answers with the top-1 class as far as it says it: (index, label), either of them
None where the protocol does not carry it (the upload API gives labels, TF Serving's ``:predict``
gives scores). An error is a ``Failure`` with a kind (HTTP status or modelport's error kind).
These are requests other servers understand too: the upload API, KServe V2 with the binary tensor
extension, TF Serving REST ``:predict``, modelport's ZeroMQ, the Open Inference Protocol over gRPC.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from modelport.errors import BadInput
from modelport.protocol import v2

PROTOCOLS = ("upload", "v2", "tfserving", "zmq", "grpc", "discovery")


@dataclass
class Answer:
    index: int | None
    label: str | None


class Failure(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def default_protocol(url: str) -> str:
    scheme = urlsplit(url).scheme
    return {"zmq": "zmq", "grpc": "grpc", "etcd": "discovery"}.get(scheme, "upload")


class HttpTarget:
    def __init__(self, url: str, protocol: str, model: str) -> None:
        import aiohttp

        self.url = url.rstrip("/")
        self.protocol = protocol
        self.model = model
        self._aiohttp = aiohttp
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None), skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None))
        self._primary: str | None = None

    async def prepare(self) -> None:
        if self.protocol == "v2":
            async with self._session.get(f"{self.url}/v2/models/{self.model}") as response:
                if response.status != 200:
                    raise Failure(f"http {response.status} for the model's metadata")
                self._primary = (await response.json())["outputs"][0]["name"]

    def encode(self, image: bytes) -> tuple[str, bytes, dict]:
        """(path, body, headers) of one request: built once per image, before the run."""
        if self.protocol == "upload":
            boundary = "modelportbench7d9f"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"i.jpg\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
            return f"/?model={self.model}&k=1", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if self.protocol == "v2":
            body, headers = v2.encode_request([image], v2.classification_output(self._primary, 1))
            return f"/v2/models/{self.model}/infer", body, headers
        body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
        return f"/v1/models/{self.model}:predict", body, {"Content-Type": "application/json"}

    async def send(self, request: tuple[str, bytes, dict]) -> Answer:
        path, body, headers = request
        try:
            async with self._session.post(self.url + path, data=body, headers=headers) as response:
                content = await response.read()
                if response.status != 200:
                    raise Failure(_kind(response.status, content))
                return self._parse(content, response.headers)
        except self._aiohttp.ClientError as exc:
            raise Failure(f"connection: {type(exc).__name__}") from None

    def _parse(self, content: bytes, headers) -> Answer:
        try:
            if self.protocol == "upload":
                return Answer(None, json.loads(content)[0][0])
            if self.protocol == "v2":
                (row,) = v2.parse_classification(next(iter(v2.decode_response(content, headers).values())))
                return Answer(row[0].index, row[0].label)
            scores = json.loads(content)["predictions"][0]
            return Answer(max(range(len(scores)), key=scores.__getitem__), None)
        except (ValueError, KeyError, IndexError, TypeError, BadInput):  # BadInput: the V2 codec's checks
            raise Failure("unparseable answer") from None

    async def close(self) -> None:
        await self._session.close()


class ClientTarget:
    """ZeroMQ, gRPC and client-side discovery, through modelport's own asyncio client."""

    def __init__(self, url: str, protocol: str, model: str) -> None:
        from modelport.client import AsyncClient

        self.protocol = protocol
        self.model = model
        self._client = AsyncClient(url, model=model, timeout_s=3600)

    async def prepare(self) -> None:
        pass

    def encode(self, image: bytes) -> bytes:
        return image

    async def send(self, image: bytes) -> Answer:
        from modelport.errors import ModelportError

        try:
            top = (await self._client.classify(image, top_k=1, model=self.model))[0]
        except ModelportError as exc:
            raise Failure(exc.kind) from None
        return Answer(top.index, top.label)

    async def close(self) -> None:
        await self._client.close()


def target(url: str, protocol: str, model: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")
    cls = ClientTarget if protocol in ("zmq", "grpc", "discovery") else HttpTarget
    return cls(url, protocol, model)


def _kind(status: int, content: bytes) -> str:
    try:
        kind = json.loads(content).get("kind")
    except (ValueError, AttributeError):
        kind = None
    return f"http {status}" + (f" {kind}" if kind else "")

