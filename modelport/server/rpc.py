"""The ZeroMQ front-end: a ROUTER socket feeding the same model services as HTTP.

Frame layout: ``modelport/wire.py``. Runs on the server's event loop; every request is its own
task, so many are in flight on one socket, and replies go back in completion order.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Callable

import zmq
import zmq.asyncio

from modelport import untrusted

from modelport.protocol import wire
from modelport.protocol.load import Load
from modelport.engine import priority
from modelport.engine.priority import Priority
from modelport.server.access import requested
from modelport.server.tenants import Grant, Tenant, Tenants
from modelport.server.tracing import traced_request
from modelport.errors import BadInput, ModelportError, PayloadTooLarge
from modelport.lifecycle.routing import RoutingTable
from modelport.engine.servable import Servable, Timing

logger = logging.getLogger("modelport.rpc")

_OVERHEAD_BYTES = 64 * 1024  # room for the msgpack envelope around a body of the HTTP limit


class RpcServer:
    def __init__(self, models: Callable[[], RoutingTable], *, address: str, max_body_bytes: int, timeout_ms: float,
                 metrics=None, load: Callable[[int], Load] | None = None,
                 tenants: Callable[[], Tenants | None] = lambda: None) -> None:
        self._models = models
        self._load = load  # the worker's load besides N answering, sent back with every reply (protocol/load.py)
        self._tenants = tenants  # with --keys: every inference request needs its tenant's key
        self._timeout_ms = timeout_ms
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        # Over this, ZeroMQ drops the message and disconnects the sender: nothing is buffered.
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_body_bytes + _OVERHEAD_BYTES)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a peer that left is dropped quietly
        self._socket.bind(address)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tasks: set[asyncio.Task] = set()
        self._receiver: asyncio.Task | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def start(self) -> None:
        self._receiver = asyncio.get_running_loop().create_task(self._receive(), name="zmq-receive")

    async def close(self, timeout_s: float) -> None:
        """Stop taking requests, let those in flight finish (at most ``timeout_s``), close the socket."""
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)
        self._socket.close()
        self._context.term()

    async def _receive(self) -> None:
        while True:
            frames = await self._socket.recv_multipart(copy=True)
            if len(frames) != 2:  # identity + one payload frame; anything else is not our protocol
                if frames:
                    await self._reply(frames[0], {"id": None, "ok": False,
                                                  "error": wire.error_to_wire(BadInput("expected exactly one frame"))})
                continue
            task = asyncio.ensure_future(self._handle(frames[0], frames[1]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, identity: bytes, frame: bytes) -> None:
        start = time.monotonic()
        request_id = None
        service = tenant = None
        counted = False
        try:
            if len(frame) > self._max_body_bytes:
                raise PayloadTooLarge(f"message of {len(frame)} bytes is over the limit of {self._max_body_bytes}")
            try:
                request = wire.unpack(frame)
            except Exception:  # msgpack raises a family of errors for bad bytes
                raise BadInput("frame is not msgpack") from None
            if not isinstance(request, dict):
                raise BadInput("frame must hold a msgpack map")
            request_id = request.get("id")
            op = request.get("op")
            if op == "ping":
                reply = {"id": request_id, "ok": True}
            else:
                grant, tenant = self._access(request)
                counted = True  # an inference request: in the load the worker reports
                self._count(1)
                try:
                    service = self._models().get(request["model"], untrusted.version(request.get("version"))) \
                        if request.get("model") else self._models().default()
                    with traced_request(service, "zmq", request.items):
                        reply = await self._infer(service, op, request)
                finally:
                    if grant is not None:
                        grant.release()
            status = 200
        except ModelportError as exc:
            reply = {"id": request_id, "ok": False, "error": wire.error_to_wire(exc)}
            status = exc.status
        except Exception:
            error_id = uuid.uuid4().hex
            logger.exception("zmq request %s failed", error_id)
            reply = {"id": request_id, "ok": False,
                     "error": {"kind": "internal", "status": 500, "message": f"internal error (request id {error_id})"}}
            status = 500
        await self._reply(identity, reply, answering=int(counted))
        if counted:
            self._count(-1)
        if tenant is not None and self._metrics is not None:
            self._metrics.observe_tenant(tenant.name, service.name if service is not None else "-", status)
        if service is not None and self._metrics is not None:
            self._metrics.observe_request(service.name, service.version, "zmq", status, time.monotonic() - start)

    async def _infer(self, service: Servable, op: Any, request: dict) -> dict:
        timing = Timing()
        timeout_ms = self._timeout_ms
        if "timeout_ms" in request:
            timeout_ms = min(timeout_ms, untrusted.positive_number(request["timeout_ms"], "timeout_ms"))
        deadline = timing.arrived + timeout_ms / 1000
        images = request.get("images")
        if images is not None and (not isinstance(images, list) or not all(isinstance(i, bytes) for i in images)):
            raise BadInput("images must be a list of byte strings", input_name="images")
        if op == "classify":
            if images is None:
                raise BadInput("classify needs images", input_name="images")
            k = untrusted.optional_integer(request.get("top_k"), "top_k", minimum=1)
            rows = await service.classify(images, k=k, deadline=deadline, timing=timing, input_name="images")
            return _answered_by(timing, {"id": request.get("id"), "ok": True, "model": service.name,
                                         "version": str(service.version),
                                         "predictions": [[[p.label, p.index, p.score] for p in row] for row in rows]})
        if op != "infer":
            raise BadInput(f"unknown op {untrusted.show(op)}; expected one of {', '.join(wire.PROTOCOL_OPS)}")
        names = request.get("outputs")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise BadInput("outputs must be a list of output names")
        names = service.resolve_outputs(names)
        if images is not None:
            outputs = await service.infer_images(images, deadline=deadline, timing=timing, input_name="images")
        else:
            inputs = request.get("inputs")
            graph_input = service.model.input.name
            if not isinstance(inputs, dict) or list(inputs) != [graph_input]:
                raise BadInput(f"infer needs images, or inputs with exactly {graph_input!r}")
            array = wire.tensor_from_wire(inputs[graph_input], graph_input)
            outputs = await service.infer_tensor(array, deadline=deadline, timing=timing)
        return _answered_by(timing, {"id": request.get("id"), "ok": True, "model": service.name,
                                     "version": str(service.version),
                                     "outputs": {name: wire.tensor_to_wire(outputs[name]) for name in names}})

    def _access(self, request: dict) -> tuple[Grant | None, Tenant | None]:
        """With --keys: the request's ``key`` field names its tenant (401), who may use the model
        (403, whether or not it exists) within its quota (429); its ``priority`` field may lower
        its class below the tenant's."""
        tenants = self._tenants()
        tenant = grant = None
        if tenants is not None:
            tenant = tenants.identify_key(request.get("key"))
            model = request.get("model") or self._models().default(routed=False).name
            tenants.check_model(tenant, str(model))
            grant = tenants.admit(tenant)
        asked = request.get("priority")
        if asked is not None and not isinstance(asked, str):
            raise BadInput("priority must be a string: high, normal or batch")
        priority.set_current(requested(tenant.priority if tenant is not None else Priority.NORMAL, asked))
        return grant, tenant

    def _count(self, step: int) -> None:
        if self._metrics is not None:
            self._metrics.in_flight.inc(step)

    async def _reply(self, identity: bytes, reply: dict, answering: int = 0) -> None:
        if self._load is not None:
            reply["load"] = self._load(answering).to_wire()
        try:
            await self._socket.send_multipart([identity, wire.pack(reply)])
        except zmq.ZMQError as exc:  # the socket is closing, or the peer vanished
            logger.debug("zmq reply dropped: %s", exc)


def _answered_by(timing: Timing, reply: dict) -> dict:
    if timing.answered_by:  # a cascade: which step answered each image
        reply["answered_by"] = timing.answered_by
    return reply
